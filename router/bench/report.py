"""Results out: a terminal table, JSON, Markdown, and PNG plots like SageMaker's blog."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["comparison", "markdown_table", "plot_routing", "spread", "write_results"]

ROUTING_COLUMNS = (
    ("users", "users", "{}"), ("instances", "inst", "{}"), ("hint", "hint", "{}"),
    ("target", "target", "{}"), ("p50_s", "P50 s", "{:.3f}"), ("p90_s", "P90 s", "{:.3f}"),
    ("p99_s", "P99 s", "{:.3f}"),
    ("max_s", "max s", "{:.3f}"), ("queued_p99_s", "queued P99 s", "{:.3f}"),
    ("ttft_p99_s", "TTFT P99 s", "{:.3f}"), ("req_per_s", "req/s", "{:.1f}"),
    ("req_per_min_per_instance", "req/min/inst", "{:.1f}"), ("errors", "errors", "{}"),
    ("work_share_cv", "share CV", "{:.2f}"), ("busy_share_cv", "busy CV", "{:.2f}"),
    ("utilization", "util", "{:.2f}"), ("cpu_us_per_request", "CPU µs/req", "{:.0f}"),
)
OVERHEAD_COLUMNS = (
    ("users", "users", "{}"), ("target", "target", "{}"), ("p50_ms", "P50 ms", "{:.2f}"),
    ("p99_ms", "P99 ms", "{:.2f}"), ("added_p50_ms", "+P50 ms", "{:.2f}"),
    ("added_p99_ms", "+P99 ms", "{:.2f}"), ("req_per_s", "req/s", "{:.0f}"),
    ("throughput_vs_direct", "x direct", "{:.2f}"), ("cpu_us_per_request", "CPU µs/req", "{:.0f}"),
    ("triton_cpu_us_per_request", "Triton CPU µs/req", "{:.0f}"), ("errors", "errors", "{}"),
)


COMPARISON_COLUMNS = (
    ("users", "users", "{}"), ("instances", "inst", "{}"), ("hint", "hint", "{}"),
    ("best_tritonmesh", "best tritonmesh (P99)", "{}"),
    ("best_tritonmesh_p99_s", "P99 s", "{:.3f}"),
    ("best_peer", "best peer (P99)", "{}"), ("best_peer_p99_s", "P99 s", "{:.3f}"),
    ("p99_vs_best_peer", "P99 / peer's", "{:.2f}"),
    ("throughput_vs_best_peer", "req/min/inst / best peer's", "{:.3f}"),
    ("best_p99_throughput_vs_best_peer", "best-P99 target's req/min/inst / best peer's",
     "{:.3f}"),
    ("lor_p99_vs_random", "LOR / RANDOM P99", "{:.2f}"),
    ("lor_throughput_vs_random", "LOR / RANDOM req/min/inst", "{:.2f}"),
    ("recommended_p99_vs_best_peer", "recommended P99 / peer's", "{:.2f}"),
    ("recommended_p99_vs_late_binding", "recommended P99 / LOR + late binding's", "{:.2f}"),
)


RECOMMENDED = ("tritonmesh LEAST_OUTSTANDING_WORK (late binding, 1/instance, least slack, "
               "dispatch ahead 10 ms)")
LATE_BINDING = "tritonmesh LEAST_OUTSTANDING_REQUESTS (late binding, 1/instance)"


def comparison(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per scale point, hint (and run): tritonmesh's best P99 against the best peer's; the
    highest tritonmesh throughput per instance against the highest of the peers', and the
    best-P99 target's own; LOR against RANDOM; the recommended configuration against the
    best peer and against LOR + late binding. Ratios of figures measured in the same run;
    None where a side did not run."""
    out = []
    keys = sorted({(r.get("run", 1), r["users"], r["instances"], r.get("hint", ""))
                   for r in rows})
    for run, users, instances, hint in keys:
        cell = [r for r in rows if (r.get("run", 1), r["users"], r["instances"],
                                    r.get("hint", "")) == (run, users, instances, hint)
                and r["errors"] == 0]
        ours = [r for r in cell if r["target"].startswith("tritonmesh")]
        peers = [r for r in cell if not r["target"].startswith("tritonmesh")]
        by_name = {r["target"]: r for r in ours}
        row: dict[str, Any] = {"run": run, "users": users, "instances": instances}
        if hint:
            row["hint"] = hint
        if ours:
            best = min(ours, key=lambda r: r["p99_s"])
            row.update(best_tritonmesh=best["target"].removeprefix("tritonmesh "),
                       best_tritonmesh_p99_s=best["p99_s"])
        if peers:
            best_peer = min(peers, key=lambda r: r["p99_s"])
            row.update(best_peer=best_peer["target"], best_peer_p99_s=best_peer["p99_s"])
        if ours and peers:
            row["p99_vs_best_peer"] = best["p99_s"] / best_peer["p99_s"]
            top_peer = max(r["req_per_min_per_instance"] for r in peers)
            row["throughput_vs_best_peer"] = (
                max(r["req_per_min_per_instance"] for r in ours) / top_peer)
            row["best_p99_throughput_vs_best_peer"] = best["req_per_min_per_instance"] / top_peer
        lor = by_name.get("tritonmesh LEAST_OUTSTANDING_REQUESTS")
        rnd = by_name.get("tritonmesh RANDOM")
        if lor and rnd:
            row["lor_p99_vs_random"] = lor["p99_s"] / rnd["p99_s"]
            row["lor_throughput_vs_random"] = (lor["req_per_min_per_instance"]
                                               / rnd["req_per_min_per_instance"])
        recommended = by_name.get(RECOMMENDED)
        if recommended and peers:
            row["recommended_p99_vs_best_peer"] = recommended["p99_s"] / best_peer["p99_s"]
        if recommended and LATE_BINDING in by_name:
            row["recommended_p99_vs_late_binding"] = (recommended["p99_s"]
                                                      / by_name[LATE_BINDING]["p99_s"])
        out.append(row)
    return out


SPREAD_RATIOS = (
    ("p99_vs_best_peer", "P99 / best peer's"),
    ("throughput_vs_best_peer", "req/min/inst / best peer's"),
    ("best_p99_throughput_vs_best_peer", "best-P99 target's req/min/inst / best peer's"),
    ("lor_p99_vs_random", "LOR / RANDOM P99"),
    ("recommended_p99_vs_best_peer", "recommended P99 / best peer's"),
    ("recommended_p99_vs_late_binding", "recommended P99 / LOR + late binding's"),
)


def spread(compared: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per scale point and hint, each ratio of :func:`comparison` over the runs that have
    it (both sides ran without errors): its mean, lowest and highest; and how many runs
    there were."""
    out = []
    for users, instances, hint in sorted({(c["users"], c["instances"], c.get("hint", ""))
                                          for c in compared}):
        runs = [c for c in compared if (c["users"], c["instances"], c.get("hint", ""))
                == (users, instances, hint)]
        row: dict[str, Any] = {"users": users, "instances": instances, "runs": len(runs)}
        if hint:
            row["hint"] = hint
        for key, _ in SPREAD_RATIOS:
            values = [c[key] for c in runs if c.get(key) is not None]
            if values:
                row[key] = (sum(values) / len(values), min(values), max(values))
        out.append(row)
    return out


def spread_table(rows: Sequence[dict[str, Any]]) -> str:
    head = ["users", "inst", "hint", "runs"] + [title + " (mean, lowest to highest)"
                                                 for _, title in SPREAD_RATIOS]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    for row in rows:
        cells = [str(row["users"]), str(row["instances"]), row.get("hint", "-"),
                 str(row["runs"])]
        for key, _ in SPREAD_RATIOS:
            value = row.get(key)
            cells.append("-" if value is None else
                         f"{value[0]:.3f} ({value[1]:.3f} to {value[2]:.3f})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
    hinted = len({r.get("hint") for r in rows}) > 1

    def line_of(r: dict[str, Any]) -> str:
        return f"{r['target']}, hint {r['hint']}" if hinted else str(r["target"])

    targets = sorted({line_of(r) for r in rows})
    styles = {"tritonmesh": ("-", "o"), "nginx": ("--", "s"), "haproxy": (":", "^")}
    colours = [plt.get_cmap("tab20")(i) for i in range(20)]
    ratios = {r["users"] / r["instances"] for r in rows}
    xlabel = (f"instances (users = {ratios.pop():g} x instances)" if len(ratios) == 1
              else "instances")
    counts = sorted({r["instances"] for r in rows})
    runs = len({r.get("run", 1) for r in rows})
    if runs > 1:
        xlabel += f"; mean of {runs} runs"
    for key, ylabel, name in (("p99_s", "end-to-end P99 latency (s)", "p99_latency.png"),
                              ("req_per_min_per_instance", "requests / minute / instance",
                               "throughput_per_instance.png")):
        fig, ax = plt.subplots(figsize=(10, 5))
        for i, target in enumerate(targets):
            line, marker = styles.get(target.split()[0], ("-.", "x"))
            points = [(n, sum(ys) / len(ys)) for n in counts
                      if (ys := [r[key] for r in rows
                                 if line_of(r) == target and r["instances"] == n])]
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
    runs = len({r.get("run", 1) for r in rows})
    if runs > 1:
        columns = (("run", "run", "{}"), *columns)
    table = markdown_table(rows, columns)
    (out / f"{kind}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"# tritonmesh bench: {kind}", "", f"`{meta.get('command', '')}`", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items() if k != "command"]
    lines += [f"- note: {n}" for n in notes]
    lines += ["", table, ""]
    if kind == "routing":
        compared = comparison(rows)
        summary = markdown_table(compared, (("run", "run", "{}"), *COMPARISON_COLUMNS)
                                 if runs > 1 else COMPARISON_COLUMNS)
        lines += ["## Side by side", "", summary, ""]
        table += "\n\n" + summary
        if runs > 1:
            over_runs = spread_table(spread(compared))
            lines += [f"## Over the {runs} runs", "", over_runs, ""]
            table += "\n\n" + over_runs
    (out / f"{kind}.md").write_text("\n".join(lines))
    written = [out / f"{kind}.json", out / f"{kind}.md"]
    if kind == "routing":
        written += plot_routing(rows, out)
    print(table)
    return written
