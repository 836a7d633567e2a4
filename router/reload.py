"""What a SIGHUP reload may change while the router serves, and what takes a restart.

Applied live: each variant's static ``instances``, ``weight``, ``models``,
``max_concurrency_per_instance``, ``max_queue``, ``default_deadline_s``, ``default_priority``,
``priority_aging_s``, ``slow_start_s`` and ``routing_strategy`` among the strategies that
share one table (all but LEAST_OUTSTANDING_WORK); the endpoint's ``health_check``,
``retries``, ``work_hints``, ``shutdown_grace_s``, the TLS certificates
(:mod:`tritonmesh.endpoint`), the tokens of ``auth`` and ``instance_networks``
(``Router.reload_auth``).

``UpdateVariantWeights`` (:mod:`tritonmesh.weights`) changes weights and
``max_concurrency_per_instance`` between reloads; a reload sets them to the file's again.

Everything else (the endpoint's name, ``endpoint``, its listeners, ``limits``) is read once, at
start: a reload that changes any of it is refused as a whole, with one log line naming
each such key, and the running configuration stays.
"""

from __future__ import annotations

from dataclasses import fields

from tritonmesh.config import EndpointConfig, RoutingStrategy, VariantConfig

__all__ = ["restart_keys"]

# Endpoint keys fixed at start (tls has its own rules: tritonmesh.endpoint._reload_tls).
# ``name`` labels every per-model metric series: renaming would split them.
_AT_START = ("name", "listen", "metrics_listen", "admin_listen", "data_path", "native",
             "processes", "shared_table_slots")
# Where the file's key is not the attribute's name.
_FILE_KEYS = {"name": "endpoint"}
# Applied live, or by rules of their own (auth, limits, tls: see restart_keys and
# tritonmesh.endpoint); every key is in one list or the other (tests/test_reload_keys.py).
_LIVE = ("variants", "health_check", "retries", "shutdown_grace_s", "work_hints", "tls",
         "auth", "instance_networks", "limits")
# Variant keys fixed at start (upstream_tls: warned about, channels keep theirs).
_VARIANT_AT_START = ("local_workers", "queue_order", "dispatch_ahead_s", "discovery", "shadow",
                     "load_report")
_VARIANT_LIVE = ("name", "weight", "routing_strategy", "models", "instances",
                 "max_concurrency", "max_queue", "default_deadline_s", "slow_start_s",
                 "upstream_tls", "per_try_timeout_s", "upstream_cancellation",
                 "absorb_timeout_s", "default_priority", "priority_aging_s")


def _work_table(strategy: RoutingStrategy) -> bool:
    return strategy is RoutingStrategy.LEAST_OUTSTANDING_WORK


def restart_keys(running: EndpointConfig, new: EndpointConfig) -> list[str]:
    """The keys ``new`` changes that only a restart can apply (empty: reload live)."""
    keys = [_FILE_KEYS.get(k, k) for k in _AT_START if getattr(running, k) != getattr(new, k)]
    # New tokens apply live; turning a plane's tokens on or off installs or removes the
    # port's interceptor, which only a restart can do.
    keys += [f"auth.{plane}_tokens_file (on or off)" for plane in ("data", "admin")
             if (getattr(running.auth, f"{plane}_tokens") is None)
             != (getattr(new.auth, f"{plane}_tokens") is None)]
    keys += [f"limits.{f.name}" for f in fields(running.limits)
             if getattr(running.limits, f.name) != getattr(new.limits, f.name)]
    old_variants = {v.name: v for v in running.variants}
    new_names = {v.name for v in new.variants}
    keys += [f"variants (adds '{v.name}')" for v in new.variants if v.name not in old_variants]
    keys += [f"variants (removes '{n}')" for n in old_variants if n not in new_names]
    for i, variant in enumerate(new.variants):
        old = old_variants.get(variant.name)
        if old is not None:
            keys += [f"variants[{i}].{k}" for k in _variant_restart_keys(old, variant)]
    return keys


def _variant_restart_keys(old: VariantConfig, new: VariantConfig) -> list[str]:
    keys = [k for k in _VARIANT_AT_START if getattr(old, k) != getattr(new, k)]
    if _work_table(old.routing_strategy) != _work_table(new.routing_strategy):
        # LEAST_OUTSTANDING_WORK keeps another table (work, service times); the
        # outstanding requests are counted in the one in use.
        keys.append("routing_strategy")
    return keys
