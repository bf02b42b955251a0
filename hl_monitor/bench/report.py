"""Writes a benchmark `Report` as `results.json` (everything, every run) and `results.md` (the README tables)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec

from hl_monitor.bench.loopsteps import SLOW_STEP_NS
from hl_monitor.bench.results import BenchResult, Report, Stat

__all__ = ["JSON_NAME", "MARKDOWN_NAME", "render_markdown", "write_report"]

JSON_NAME = "results.json"
MARKDOWN_NAME = "results.md"


def _num(value: float, unit: str) -> str:
    if unit in ("s", "ms", "×", "share"):
        return f"{value:,.2f}" if value < 10 else f"{value:,.1f}"
    return f"{value:,.0f}"


def _cell(s: Stat) -> str:
    return f"{_num(s.median, s.unit)} ({_num(s.min, s.unit)}–{_num(s.max, s.unit)})"


def _bench_md(bench: BenchResult) -> list[str]:
    lines = [f"### {bench.title}", "", f"Input: {bench.input}.", ""]
    keys: list[str] = []
    for case in bench.cases:
        keys.extend(k for k in case.metrics if k not in keys)
    units = {k: next(c.metrics[k].unit for c in bench.cases if k in c.metrics) for k in keys}
    subject = next((c for c in bench.cases if not c.baseline), None)
    lead = keys[0] if keys else None
    header = ["case", *(f"{k} [{units[k]}]" for k in keys)]
    if subject is not None and lead is not None and any(c.baseline for c in bench.cases):
        header.append("subject ÷ case")
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for case in bench.cases:
        row = [("" if not case.baseline else "baseline: ") + case.name]
        row.extend(_cell(case.metrics[k]) if k in case.metrics else "–" for k in keys)
        if len(header) > len(keys) + 1:
            assert subject is not None
            assert lead is not None
            mine, theirs = subject.metrics.get(lead), case.metrics.get(lead)
            row.append(f"{mine.median / theirs.median:.2f}×" if mine and theirs and theirs.median else "–")
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    for target, verdict in bench.targets.items():
        lines.append(f"- Target {target}: **{verdict}**")
    zero = [c for c in bench.cases if "zero_loss_all_runs" in c.info]
    for case in zero:
        lines.append(f"- Zero loss ({case.name}): **{'held' if case.info['zero_loss_all_runs'] else 'FAILED'}**")
    lines.extend(f"- {note}" for note in bench.notes)
    lines.append("")
    for case in bench.cases:
        if case.info.get("loop_steps"):
            lines.extend(_slow_steps_md(case.name, case.info["loop_steps"]))
        if case.info.get("gc_census"):
            lines.extend(_gc_census_md(case.name, case.info["gc_census"]))
    return lines


def _gc_census_md(case: str, runs: list[dict[str, Any]]) -> list[str]:
    """What the collector tracks after each run and what a full pass over it costs (the `gccensus` instrument)."""
    tracked = " / ".join(f"{run['tracked_total']:,}" for run in runs)
    frozen = " / ".join(f"{run['frozen']:,}" for run in runs)
    full = " / ".join(f"{run['full_collect_ms']:.1f}" for run in runs)
    lines = [
        f"Garbage collector after each run ({case}): tracked live objects {tracked} (frozen apart: {frozen}); "
        f"a full collection over them took {full} ms.",
        "",
        f"Tracked objects by type after the first run ({case}):",
        "",
        "| type | objects |",
        "|---|---|",
    ]
    lines.extend(f"| `{name}` | {count:,} |" for name, count in runs[0]["top_types"])
    lines.append("")
    return lines


def _slow_steps_md(case: str, runs: list[dict[str, Any]]) -> list[str]:
    """What the loop ran in its slow steps, summed over the runs (the `loopsteps` instrument)."""
    merged: dict[str, dict[str, float]] = {}
    for run in runs:
        for entry in run["slowest"]:
            m = merged.setdefault(entry["name"], {"count": 0, "total_ms": 0.0, "max_ms": 0.0})
            m["count"] += entry["count"]
            m["total_ms"] += entry["total_ms"]
            m["max_ms"] = max(m["max_ms"], entry["max_ms"])
    over = " / ".join(f"{run['over_budget']:,}" for run in runs)
    cpu_over = " / ".join(f"{run['cpu_over_budget']:,}" for run in runs)
    steps = " / ".join(f"{run['steps']:,}" for run in runs)
    gc_max = " / ".join(f"{run['gc_max_ms']:.1f}" for run in runs)
    gc_full = " / ".join(str(run["gc_full"]) for run in runs)
    gc_full_max = " / ".join(f"{run['gc_full_max_ms']:.1f}" for run in runs)
    lines = [
        f"Loop steps over {SLOW_STEP_NS / 1e6:g} ms per run ({case}): {over} in wall time, {cpu_over} in CPU time "
        f"(of {steps} steps). Garbage collections over {SLOW_STEP_NS / 1e6:g} ms: "
        f"{' / '.join(str(run['gc_pauses_over_budget']) for run in runs)}, longest "
        f"{gc_max} ms; full collections {gc_full}, longest {gc_full_max} ms.",
        "",
        f"Loop steps over the budget in CPU time ({case}, {len(runs)} runs, what each step ran):",
        "",
        "| callback | steps | total CPU ms | max CPU ms |",
        "|---|---|---|---|",
    ]
    for name, m in sorted(merged.items(), key=lambda kv: kv[1]["total_ms"], reverse=True):
        lines.append(f"| `{name}` | {m['count']:,.0f} | {m['total_ms']:,.1f} | {m['max_ms']:,.2f} |")
    if not merged:
        lines.append("| (none) | 0 | 0 | 0 |")
    lines.append("")
    return lines


def _profile_md(profile: dict[str, Any]) -> list[str]:
    lines = [
        f"### CPU profile of the end-to-end run (py-spy, {profile['rate_hz']} Hz, {profile['samples']:,} event-loop "
        "samples)",
        "",
        "| inclusive % | function | | self % | function |",
        "|---|---|---|---|---|",
    ]
    inclusive, own = profile["inclusive"], profile["self"]
    for i in range(max(len(inclusive), len(own))):
        a = inclusive[i] if i < len(inclusive) else ("", "")
        b = own[i] if i < len(own) else ("", "")
        lines.append(f"| {a[1]} | `{a[0]}` | | {b[1]} | `{b[0]}` |")
    lines.append("")
    return lines


def render_markdown(report: Report) -> str:
    meta = report.meta
    machine = meta["machine"]
    packages = ", ".join(f"{k} {v}" for k, v in meta["packages"].items())
    lines = [
        "## Benchmark results",
        "",
        f"Commit `{meta['commit']}`, {meta['date_utc']}, run took {meta.get('duration_s', 0):,.0f} s. "
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB, {machine['os']}. "
        f"{meta['python']}; {packages}; {meta['nats_server']}; MariaDB {meta['mariadb']}; SQLite {meta['sqlite']}.",
        "",
        "Cells are median (min–max) over the runs; baselines ran in the same invocation on the same input.",
        "",
    ]
    load = meta.get("load_avg")
    if load and load.get("start") and load.get("end"):
        lines[-1:-1] = [
            f"Load average (1/5/15 min) at start {' / '.join(map(str, load['start']))}, "
            f"at end {' / '.join(map(str, load['end']))} ({machine['cores']} cores).",
            "",
        ]
    for bench in report.benches:
        lines.extend(_bench_md(bench))
    if "profile" in meta:
        lines.extend(_profile_md(meta["profile"]))
    return "\n".join(lines)


def write_report(report: Report, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / JSON_NAME
    md_path = out_dir / MARKDOWN_NAME
    json_path.write_bytes(msgspec.json.format(msgspec.json.encode(report), indent=2) + b"\n")
    md_path.write_text(render_markdown(report) + "\n")
    return json_path, md_path
