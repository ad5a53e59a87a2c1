"""The results table: one row per system, written as results.md and results.json in the run folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distillmt.io import atomic_write_text, write_json


def _fmt(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _params(n: int | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def results_table(report: dict[str, Any]) -> str:
    """Markdown table of the systems; BERTScore columns say n/a (with the reason below) when it was not measured."""
    header = "| system | BERTScore P | BERTScore R | BERTScore F1 | chrF | BLEU | params | translation tokens/s |\n"
    header += "|---|---|---|---|---|---|---|---|\n"
    rows, notes = [], []
    for system, r in report["systems"].items():
        s = r["scores"]
        bs = s.get("bertscore") or {}
        if "unavailable" in bs and bs["unavailable"] not in notes:
            notes.append(bs["unavailable"])
        t = r["translation"]
        rows.append(
            f"| {system} | {_fmt(bs.get('P'), '.4f')} | {_fmt(bs.get('R'), '.4f')} | {_fmt(bs.get('F'), '.4f')} | "
            f"{s['chrf']['score']:.2f} | {s['bleu']['score']:.2f} | {_params(t.get('parameters'))} | "
            f"{_fmt(t.get('tokens_per_s'), '.0f')} |"
        )
    text = header + "\n".join(rows) + "\n"
    if notes:
        text += "\nBERTScore not measured: " + "; ".join(notes) + "\n"
    return text


def markdown_report(report: dict[str, Any]) -> str:
    first = next(iter(report["systems"].values()), None)
    lines = [f"# distillmt results: {report['name']}", ""]
    if report.get("command"):
        lines += [f"Command: `{report['command']}`", ""]
    lines.append(results_table(report))
    if first is not None:
        s = first["scores"]
        lines += [
            "## Metric signatures",
            "",
            f"- BLEU: `{s['bleu']['signature']}`",
            f"- chrF: `{s['chrf']['signature']}`",
        ]
        bs = s.get("bertscore") or {}
        if "signature" in bs:
            lines.append(f"- BERTScore: `{bs['signature']}` (mean over {s['n']} sentences, no baseline rescaling)")
        lines.append("")
    lines += ["## Systems", ""] + [f"- **{name}**: {r['settings']}" for name, r in report["systems"].items()]
    lines += ["", "## Stages", "", "| stage | seconds | status |", "|---|---|---|"]
    for name, t in report["stages"].items():
        status = "reused (complete)" if t.get("skipped") else ("resumed" if t.get("resumed") else "ran")
        lines.append(f"| {name} | {_fmt(t.get('seconds'), '.1f')} | {status} |")
    m = report["machine"]
    lines += [
        "",
        f"Wall time of this invocation: {report['wall_seconds']:.1f} s. Machine: {m.get('gpu', '')} "
        f"{m['device']}, {m['cpus']} CPUs, torch {m['torch']}, {m['platform']}.",
        "",
    ]
    return "\n".join(lines)


def write_report(run_root: str | Path, report: dict[str, Any]) -> None:
    run_root = Path(run_root)
    write_json(run_root / "results.json", report)
    atomic_write_text(run_root / "results.md", markdown_report(report))
