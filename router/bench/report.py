"""Results out: a terminal table, JSON, Markdown, and PNG plots like SageMaker's blog."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["comparison", "markdown_table", "plot_routing", "write_results"]

ROUTING_COLUMNS = (
    ("users", "users", "{}"), ("instances", "inst", "{}"), ("target", "target", "{}"),
    ("p50_s", "P50 s", "{:.3f}"), ("p90_s", "P90 s", "{:.3f}"), ("p99_s", "P99 s", "{:.3f}"),
    ("max_s", "max s", "{:.3f}"), ("queued_p99_s", "queued P99 s", "{:.3f}"),
    ("ttft_p99_s", "TTFT P99 s", "{:.3f}"), ("req_per_s", "req/s", "{:.1f}"),
    ("req_per_min_per_instance", "req/min/inst", "{:.1f}"), ("errors", "errors", "{}"),
    ("work_share_cv", "share CV", "{:.2f}"), ("busy_share_cv", "busy CV", "{:.2f}"),
    ("utilization", "util", "{:.2f}"),
)
OVERHEAD_COLUMNS = (
    ("users", "users", "{}"), ("target", "target", "{}"), ("p50_ms", "P50 ms", "{:.2f}"),
    ("p99_ms", "P99 ms", "{:.2f}"), ("added_p50_ms", "+P50 ms", "{:.2f}"),
    ("added_p99_ms", "+P99 ms", "{:.2f}"), ("req_per_s", "req/s", "{:.0f}"),
    ("throughput_vs_direct", "x direct", "{:.2f}"), ("errors", "errors", "{}"),
)


COMPARISON_COLUMNS = (
    ("users", "users", "{}"), ("instances", "inst", "{}"),
    ("best_tritonmesh", "best tritonmesh (P99)", "{}"),
    ("best_tritonmesh_p99_s", "P99 s", "{:.3f}"),
    ("best_peer", "best peer (P99)", "{}"), ("best_peer_p99_s", "P99 s", "{:.3f}"),
    ("p99_vs_best_peer", "P99 / peer's", "{:.2f}"),
    ("throughput_vs_best_peer", "req/min/inst / best peer's", "{:.2f}"),
    ("lor_p99_vs_random", "LOR / RANDOM P99", "{:.2f}"),
    ("lor_throughput_vs_random", "LOR / RANDOM req/min/inst", "{:.2f}"),
)


def comparison(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per scale point: tritonmesh's best P99 against the best peer's (and its throughput per
    instance against the highest of the peers'), and LOR against RANDOM, as ratios of
    figures measured in the same run. Ratios are None where a side did not run."""
    out = []
    for users, instances in sorted({(r["users"], r["instances"]) for r in rows}):
        cell = [r for r in rows if (r["users"], r["instances"]) == (users, instances)
                and r["errors"] == 0]
        ours = [r for r in cell if r["target"].startswith("tritonmesh")]
        peers = [r for r in cell if not r["target"].startswith("tritonmesh")]
        by_name = {r["target"]: r for r in ours}
        row: dict[str, Any] = {"users": users, "instances": instances}
        if ours:
            best = min(ours, key=lambda r: r["p99_s"])
            row.update(best_tritonmesh=best["target"].removeprefix("tritonmesh "),
                       best_tritonmesh_p99_s=best["p99_s"])
        if peers:
            best_peer = min(peers, key=lambda r: r["p99_s"])
            row.update(best_peer=best_peer["target"], best_peer_p99_s=best_peer["p99_s"])
        if ours and peers:
            row["p99_vs_best_peer"] = best["p99_s"] / best_peer["p99_s"]
            row["throughput_vs_best_peer"] = (
                max(r["req_per_min_per_instance"] for r in ours)
                / max(r["req_per_min_per_instance"] for r in peers))
        lor = by_name.get("tritonmesh LEAST_OUTSTANDING_REQUESTS")
        rnd = by_name.get("tritonmesh RANDOM")
        if lor and rnd:
            row["lor_p99_vs_random"] = lor["p99_s"] / rnd["p99_s"]
            row["lor_throughput_vs_random"] = (lor["req_per_min_per_instance"]
                                               / rnd["req_per_min_per_instance"])
        out.append(row)
    return out


def _cell(fmt: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]
                   ) -> str:
    head = "| " + " | ".join(title for _, title, _ in columns) + " |"
    rule = "|" + "|".join(" --- " for _ in columns) + "|"
    body = ["| " + " | ".join(_cell(fmt, row.get(key)) for key, _, fmt in columns) + " |"
            for row in rows]
    return "\n".join([head, rule, *body])


def plot_routing(rows: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    """P99 latency and throughput per instance vs instance count, a line per target.

    A line style per family (tritonmesh solid, nginx dashed, HAProxy dotted) and a
    colour per strategy within it, so a dozen lines stay apart.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    targets = sorted({r["target"] for r in rows})
    styles = {"tritonmesh": ("-", "o"), "nginx": ("--", "s"), "haproxy": (":", "^")}
    colours = [plt.get_cmap("tab20")(i) for i in range(20)]
    ratios = {r["users"] / r["instances"] for r in rows}
    xlabel = (f"instances (users = {ratios.pop():g} x instances)" if len(ratios) == 1
              else "instances")
    counts = sorted({r["instances"] for r in rows})
    for key, ylabel, name in (("p99_s", "end-to-end P99 latency (s)", "p99_latency.png"),
                              ("req_per_min_per_instance", "requests / minute / instance",
                               "throughput_per_instance.png")):
        fig, ax = plt.subplots(figsize=(10, 5))
        for i, target in enumerate(targets):
            line, marker = styles.get(target.split()[0], ("-.", "x"))
            points = sorted((r["instances"], r[key]) for r in rows if r["target"] == target)
            ax.plot([p[0] for p in points], [p[1] for p in points], linestyle=line,
                    marker=marker, color=colours[i % len(colours)], label=target)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_xticks(counts)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_results(out: Path, kind: str, rows: Sequence[dict[str, Any]],
                  meta: dict[str, Any], notes: Sequence[str]) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    columns = ROUTING_COLUMNS if kind == "routing" else OVERHEAD_COLUMNS
    table = markdown_table(rows, columns)
    (out / f"{kind}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"# tritonmesh bench: {kind}", "", f"`{meta.get('command', '')}`", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items() if k != "command"]
    lines += [f"- note: {n}" for n in notes]
    lines += ["", table, ""]
    if kind == "routing":
        summary = markdown_table(comparison(rows), COMPARISON_COLUMNS)
        lines += ["## Side by side", "", summary, ""]
        table += "\n\n" + summary
    (out / f"{kind}.md").write_text("\n".join(lines))
    written = [out / f"{kind}.json", out / f"{kind}.md"]
    if kind == "routing":
        written += plot_routing(rows, out)
    print(table)
    return written
