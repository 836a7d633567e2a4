"""Instances from DNS: a Kubernetes headless Service's SRV or A/AAAA records.

A variant with ``discovery: {dns: ...}`` keeps the instances it finds there in step
with the records, beside any static ``instances``:

* ``_grpc._tcp.triton.ns.svc.cluster.local`` (a name starting with ``_``) is an SRV
  name: each record of the lowest priority gives a target and a port; the target's
  A/AAAA records give the addresses (a pod's IP is its identity, so instances are
  ``IP:PORT``).
* ``triton.ns.svc.cluster.local:8001`` resolves A and AAAA records, each at that port.

New addresses are probed (ServerReady) before they take traffic and join with slow
start; addresses that vanish drain (no new picks, in-flight requests finish) and
are then removed. A failed lookup or an empty answer keeps the last good set: a DNS
outage must not empty the fleet. The next lookup comes after ``interval_s`` or when
the answer's TTL runs out, whichever is first (never sooner than ``_MIN_WAIT_S``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Final

import dns.asyncresolver
import dns.exception
import dns.resolver
from tritonmesh.balancer import Instance, Variant
from tritonmesh.chore import Chore
from tritonmesh.config import DnsDiscovery
from tritonmesh.membership import Drains, Probe, reconcile

__all__ = ["Discovery", "Lookup", "resolve"]

log = logging.getLogger("tritonmesh.discovery")

# A TTL of 0 (or a resolver that answers instantly with nothing new) must not turn the
# loop into a flood of queries.
_MIN_WAIT_S: Final = 1.0


@dataclass(frozen=True)
class Lookup:
    """One answer: the instance addresses, and how long it may be trusted."""

    addresses: frozenset[str]
    ttl_s: float


def _resolver(spec: DnsDiscovery) -> dns.asyncresolver.Resolver:
    if spec.resolver is None:
        return dns.asyncresolver.Resolver()  # the system's (resolv.conf)
    resolver = dns.asyncresolver.Resolver(configure=False)
    host, port = spec.resolver
    resolver.nameservers = [host]
    resolver.port = port
    return resolver


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _addresses(resolver: dns.asyncresolver.Resolver, name: str, lifetime: float
                     ) -> tuple[list[str], float]:
    """A and AAAA records of ``name`` (either may be missing), with their lowest TTL."""
    found: list[str] = []
    ttl = float("inf")
    for kind in ("A", "AAAA"):
        try:
            answer = await resolver.resolve(name, kind, lifetime=lifetime)
        except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
            continue
        assert answer.rrset is not None
        ttl = min(ttl, answer.rrset.ttl)
        found += [r.address for r in answer]
    return found, ttl


async def resolve(spec: DnsDiscovery, resolver: dns.asyncresolver.Resolver | None = None,
                  lifetime: float = 5.0) -> Lookup:
    """Look ``spec.dns`` up once. Raises ``dns.exception.DNSException`` on failure
    (NXDOMAIN, timeout, SERVFAIL...); an answer with no usable record is empty."""
    resolver = resolver or _resolver(spec)
    if spec.port is not None:  # NAME:PORT
        hosts, ttl = await _addresses(resolver, spec.name, lifetime)
        return Lookup(frozenset(_join(h, spec.port) for h in hosts), ttl)
    answer = await resolver.resolve(spec.name, "SRV", lifetime=lifetime)
    assert answer.rrset is not None
    ttl = float(answer.rrset.ttl)
    records = list(answer)
    if not records:
        return Lookup(frozenset(), ttl)
    best = min(r.priority for r in records)  # higher priorities are backups (RFC 2782)
    targets = {(r.target.to_text(), r.port) for r in records if r.priority == best}
    found: set[str] = set()
    results = await asyncio.gather(*(_addresses(resolver, t, lifetime) for t, _ in targets))
    for (_, port), (hosts, host_ttl) in zip(targets, results, strict=True):
        ttl = min(ttl, host_ttl)
        found.update(_join(h, port) for h in hosts)
    return Lookup(frozenset(found), ttl)


class Discovery(Chore):
    """Keeps one variant's DNS-discovered instances in step with its records.

    ``probe`` says whether a new instance is ready to take traffic.
    """

    def __init__(self, variant: Variant, spec: DnsDiscovery, *, probe: Probe):
        self.variant = variant
        self.spec = spec
        self._probe = probe
        self._resolver = _resolver(spec)
        # address -> instance, for the instances this discovery added (never static ones).
        self.owned: dict[str, Instance] = {}
        self.last_good: frozenset[str] | None = None
        self.lookups = 0
        self.failures = 0  # lookups that failed or came back empty
        self.last_success = 0.0  # wall-clock time of the last good answer
        self._failing = False
        self._drains = Drains()

    async def refresh(self, *, slow_start: bool = True) -> float:
        """One lookup and the changes it calls for; returns seconds until the next."""
        self.lookups += 1
        try:
            lookup = await resolve(self.spec, self._resolver)
        except dns.exception.DNSException as exc:
            self._failed(f"lookup failed: {exc.__class__.__name__}: {exc}")
            return self.spec.interval_s
        if not lookup.addresses:
            self._failed("the answer holds no address")
            return self.spec.interval_s
        if self._failing:
            log.info("discovery %s for variant '%s': answering again (%d addresses)",
                     self.spec.dns, self.variant.name, len(lookup.addresses))
        self._failing = False
        self.last_success = time.time()
        self.last_good = lookup.addresses
        await self._reconcile(lookup.addresses, slow_start)
        return max(_MIN_WAIT_S, min(self.spec.interval_s, lookup.ttl_s))

    def _failed(self, why: str) -> None:
        self.failures += 1
        if not self._failing:  # one line per outage, not one per lookup
            kept = 0 if self.last_good is None else len(self.last_good)
            log.warning("discovery %s for variant '%s': %s; keeping the last good set "
                        "(%d addresses)", self.spec.dns, self.variant.name, why, kept)
        self._failing = True

    async def _reconcile(self, addresses: frozenset[str], slow_start: bool) -> None:
        static = {i.address for i in self.variant.live_instances()
                  if i.address not in self.owned}
        change = await reconcile(self.variant, addresses, self.owned, drains=self._drains,
                                 drain_timeout_s=self.spec.drain_timeout_s,
                                 leave_alone=static, probe=self._probe,
                                 slow_start=slow_start, source=f"discovery {self.spec.dns}")
        self.owned.update(change.added)
        for address in change.draining:
            del self.owned[address]

    async def run(self) -> None:
        while True:
            try:
                wait = await self.refresh()
            except Exception:  # a bug in one round must not end discovery
                log.exception("discovery round for variant '%s' failed", self.variant.name)
                wait = self.spec.interval_s
            await asyncio.sleep(wait)

    async def stop(self) -> None:
        """End the lookups, then wait for the drains they started."""
        await super().stop()
        await self._drains.wait()

