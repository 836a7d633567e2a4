"""A real DNS server for tests: Debian's dnsmasq on a loopback port, serving records the
test writes (A/AAAA from a hosts file, re-read on SIGHUP; SRV from its command line)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import dns.exception
import dns.resolver
from tritonmesh.workers.launcher import free_ports


class Dnsmasq:
    """dnsmasq answering for the names in ``hosts`` and ``srv`` only (no upstream, no
    /etc/hosts). ``srv`` entries are (name, target, port, priority)."""

    def __init__(self, directory: Path, ttl: int = 1):
        binary = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
        if not Path(binary).exists():
            raise RuntimeError("these tests need dnsmasq (apt-get install dnsmasq; .ci/run "
                               "installs it)")
        self.binary = binary
        self.hosts_file = directory / "hosts"
        self.hosts_file.write_text("")
        self.port = free_ports(1)[0]
        self.process: subprocess.Popen[bytes] | None = None
        self.srv: list[tuple[str, str, int, int]] = []
        self.ttl = ttl  # of every record served

    @property
    def resolver(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, srv: Sequence[tuple[str, str, int, int]] = ()) -> None:
        self.srv = list(srv)
        args = [
            self.binary, "--keep-in-foreground", "--conf-file=/dev/null", "--user=root",
            "--pid-file=", f"--port={self.port}", "--listen-address=127.0.0.1",
            "--bind-interfaces", "--no-resolv", "--no-hosts", f"--local-ttl={self.ttl}",
            # Authoritative for .test: an unknown name there is NXDOMAIN, not REFUSED.
            "--local=/test/", "--host-record=ready.test,127.0.0.254",
            f"--addn-hosts={self.hosts_file}",
            *(f"--srv-host={name},{target},{port},{priority},10"
              for name, target, port, priority in self.srv),
        ]
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._wait_answering()

    def _wait_answering(self, timeout: float = 10.0) -> None:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = ["127.0.0.1"]
        resolver.port = self.port
        deadline = time.monotonic() + timeout
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                err = self.process.stderr.read() if self.process.stderr else b""
                raise RuntimeError(f"dnsmasq exited: {err.decode(errors='replace')}")
            try:
                resolver.resolve("ready.test", "A", lifetime=0.5)
                return
            except dns.exception.DNSException:
                pass
            assert time.monotonic() < deadline, "dnsmasq did not answer"
            time.sleep(0.05)

    def set_hosts(self, entries: Sequence[tuple[str, str]]) -> None:
        """Replace the A/AAAA records (address, name) and have dnsmasq re-read them."""
        self.hosts_file.write_text("".join(f"{a} {n}\n" for a, n in entries))
        if self.process is not None:
            self.process.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            if self.process.stderr is not None:
                self.process.stderr.close()
            self.process = None
