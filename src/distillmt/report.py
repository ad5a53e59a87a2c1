"""The results table: one row per system, written as results.md (with plots) and results.json in the run folder.

The metric columns and signature lines come from the metric entries in each row's scores (see
``distillmt.metrics``): a new metric needs no change here. Rows scored on different sentences are refused.

With significance data (``report["significance"]``, from :func:`distillmt.stats.compare_to_baseline`) each tested
metric's score cell also shows its 95% CI, ``9.80† (9.10–10.52)``, with ``†`` when the row differs from the baseline
at p < 0.05, and one column lists the p-values against the baseline; a legend under the table names the baseline,
the test and the seed. Without it (old run folders, ``eval.baseline=none``) the table is the plain one.

Plots (``plots/`` in the run folder, embedded in results.md with a caption each; matplotlib's Agg backend, written
atomically): ``scores_<metric>.png``, a bar per system with its 95% CI (hatched: the baseline row), one per measured
metric; ``training_<stage>.png``, the curves of each training stage's ``metrics.jsonl`` (loss, CE, the KD term where
there is one, validation CE) against the optimizer step. ``distillmt report RUN_FOLDER`` rebuilds results.md and the
plots from results.json and the stage folders.
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distillmt import systems
from distillmt.errors import DistillmtError
from distillmt.io import atomic_write_bytes, atomic_write_text, read_json, write_json

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from distillmt.config import ExperimentConfig

log = logging.getLogger("distillmt.report")


def _fmt(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _params(n: int | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def metric_entries(scores: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The metric entries of one row's scores (every value that has ``columns``), in column order."""
    return {k: v for k, v in scores.items() if isinstance(v, dict) and "columns" in v}


def _metric_layout(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Metric key -> the first entry seen for it, over the rows in order: the first row's metrics give the column
    order; a metric only later rows have is appended rather than dropped."""
    layout: dict[str, dict[str, Any]] = {}
    for row in report["systems"].values():
        for key, entry in metric_entries(row["scores"]).items():
            layout.setdefault(key, entry)
    return layout


def check_comparable(report: dict[str, Any]) -> None:
    """Refuse a table whose rows were not scored on the same sentences (same count and same references)."""
    rows = {name: r["scores"] for name, r in report["systems"].items()}
    if len(rows) < 2:
        return
    unhashed = [name for name, s in rows.items() if not s.get("refs_sha256")]
    if unhashed:
        raise DistillmtError(
            f"cannot check that every row was scored on the same sentences: the scores of {', '.join(unhashed)} "
            "carry no reference hash (refs_sha256; written by an older distillmt). Rerun their evaluate stages"
        )
    groups: dict[tuple[Any, str], list[str]] = {}
    for name, s in rows.items():
        groups.setdefault((s.get("n"), s["refs_sha256"]), []).append(name)
    if len(groups) > 1:
        parts = [f"{', '.join(names)}: {n} sentences (references {sha[:12]})" for (n, sha), names in groups.items()]
        raise DistillmtError(
            "the rows were scored on different test sentences and cannot share one table: " + "; ".join(parts)
        )


SIGNIFICANT = "†"


def significance_results(report: dict[str, Any]) -> dict[str, Any] | None:
    """The report's significance data when a test was run (not skipped), else None."""
    sig = report.get("significance")
    return sig if isinstance(sig, dict) and isinstance(sig.get("systems"), dict) else None


def significance_record(report: dict[str, Any], system: str, key: str) -> dict[str, Any] | None:
    """One row's test result for one metric key (``{"score", "mean", "ci_low", "ci_high", "p_value",
    "significant"}``; p_value None for the baseline row), or None when it was not tested."""
    sig = significance_results(report)
    return None if sig is None else sig["systems"].get(system, {}).get(key)


def _score_column(report: dict[str, Any], key: str, first: dict[str, Any]) -> str:
    """The column that shows a metric's score (``BERTScore F1`` for BERTScore): the one holding ``score``."""
    for row in report["systems"].values():
        entry = metric_entries(row["scores"]).get(key, {})
        if entry.get("score") is not None:
            for column, value in entry["columns"].items():
                if value == entry["score"]:
                    return column
    return list(first["columns"])[-1]


def _tested_columns(report: dict[str, Any], sig: dict[str, Any] | None) -> dict[str, str]:
    """Metric key -> its score column, for the metrics of the table that the significance data covers."""
    if sig is None:
        return {}
    covered = {key for row in sig["systems"].values() for key in row}
    layout = _metric_layout(report)
    return {key: _score_column(report, key, first) for key, first in layout.items() if key in covered}


def _p_cell(system: str, sig: dict[str, Any], tested: dict[str, str]) -> str:
    if system == sig.get("baseline"):
        return "baseline"
    records = sig["systems"].get(system, {})
    return " / ".join(_fmt(records.get(key, {}).get("p_value"), ".4f") for key in tested)


def _legend(sig: dict[str, Any], tested: dict[str, str]) -> list[str]:
    n, seed = sig.get("n_samples"), sig.get("seed")
    sacre = [tested[k] for k in ("chrf", "bleu") if k in tested]
    own = [column for key, column in tested.items() if key not in ("chrf", "bleu")]
    how = []
    if sacre:
        how.append(f"sacrebleu's paired test for {' and '.join(sacre)}")
    if own:
        how.append(f"{' and '.join(own)} on its sentence scores with the same resamples")
    seed_text = f"seed {seed}" if seed is not None else "no fixed seed"
    lines = [
        f"Cells: score (95% CI); {SIGNIFICANT} = differs from the baseline {sig['baseline']} at "
        f"p < {sig.get('alpha', 0.05):g}. Test: paired bootstrap resampling, {n:,} resamples, {seed_text}"
        + (f" ({'; '.join(how)})." if how else ".")
    ]
    identical = sig.get("identical_to_baseline") or []
    if identical:
        lines.append(f"Translations identical to the baseline's, not tested (p = 1): {', '.join(identical)}.")
    return lines


def results_table(report: dict[str, Any]) -> str:
    """Markdown table of the systems: one column per metric column, ``n/a`` (with the reason below) where a metric
    was not measured, then parameters and translation speed. With significance data: the 95% CI after each tested
    score, ``†`` where the row differs from the baseline at p < 0.05, a p-value column and a legend."""
    check_comparable(report)
    layout = _metric_layout(report)
    sig = significance_results(report)
    tested = _tested_columns(report, sig)
    header = ["system"]
    for entry in layout.values():
        header += list(entry["columns"])
    if sig is not None and tested:
        header.append(f"p vs {sig['baseline']} ({' / '.join(tested.values())})")
    header += ["params", "translation tokens/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    notes: dict[str, list[str]] = {}
    for system, r in report["systems"].items():
        entries = metric_entries(r["scores"])
        cells = [system]
        for key, first in layout.items():
            entry = entries.get(key, {})
            values = entry.get("columns", {})
            spec = f".{first['decimals']}f"
            for col in first["columns"]:
                cell = _fmt(values.get(col), spec)
                record = significance_record(report, system, key) if tested.get(key) == col else None
                if record and values.get(col) is not None and record.get("ci_low") is not None:
                    mark = SIGNIFICANT if record.get("significant") else ""
                    cell = f"{cell}{mark} ({format(record['ci_low'], spec)}–{format(record['ci_high'], spec)})"
                cells.append(cell)
            reason = entry.get("unavailable")
            reasons = notes.setdefault(first.get("name", key), [])
            if reason and reason not in reasons:
                reasons.append(reason)
        if sig is not None and tested:
            cells.append(_p_cell(system, sig, tested))
        t = r["translation"]
        cells += [_params(t.get("parameters")), _fmt(t.get("tokens_per_s"), ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    if sig is not None and tested:
        text += "\n" + "\n".join(_legend(sig, tested)) + "\n"
    missing = [f"{name} not measured: " + "; ".join(reasons) for name, reasons in notes.items() if reasons]
    if missing:
        text += "\n" + "\n".join(missing) + "\n"
    return text


def _signature_lines(report: dict[str, Any]) -> list[str]:
    """``- NAME: `signature` (note)`` per metric, from the first row that measured it."""
    lines = []
    for key, first in _metric_layout(report).items():
        for row in report["systems"].values():
            entry = metric_entries(row["scores"]).get(key)
            if entry and entry.get("signature"):
                note = f" ({entry['note']})" if entry.get("note") else ""
                lines.append(f"- {entry.get('name', first.get('name', key))}: `{entry['signature']}`{note}")
                break
    return lines


def _test_signature_lines(report: dict[str, Any]) -> list[str]:
    """``- NAME paired bootstrap vs BASELINE: `signature``` per tested metric."""
    sig = significance_results(report)
    if sig is None:
        return []
    tested = _tested_columns(report, sig)
    signatures = sig.get("signatures", {})
    return [
        f"- {column} paired bootstrap vs {sig['baseline']}: `{signatures[key]}`"
        for key, column in tested.items()
        if signatures.get(key)
    ]


def markdown_report(report: dict[str, Any], plots: Iterable[tuple[str | None, str]] | None = None) -> str:
    """results.md: the table, then (when ``plots`` is given) a "Plots" section embedding each ``(relative path,
    caption)`` (a path of None is a plot that could not be drawn: its caption says why), signatures, rows, stages."""
    lines = [f"# distillmt results: {report['name']}", ""]
    if report.get("command"):
        lines += [f"Command: `{report['command']}`", ""]
    lines.append(results_table(report))
    skipped = (report.get("significance") or {}).get("skipped")
    if skipped:
        lines += [f"No significance test: {skipped}.", ""]
    plots = list(plots or [])
    if plots:
        lines += ["## Plots", "", *embed_plots(plots)]
    if report["systems"]:
        lines += ["## Metric signatures", "", *_signature_lines(report), *_test_signature_lines(report), ""]
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


def write_report(run_root: str | Path, report: dict[str, Any]) -> Path:
    """results.json, then the plots and results.md (:func:`write_run_report`). Returns the path of results.md."""
    check_comparable(report)
    run_root = Path(run_root)
    write_json(run_root / "results.json", report)
    return write_run_report(run_root, report)


def write_run_report(run_root: str | Path, report: dict[str, Any]) -> Path:
    """The plots (``plots/*.png``; older PNGs there that this report no longer draws are removed) and results.md
    embedding them. A plot that fails is logged and named in results.md instead of failing the run: the table,
    the result of the run, is written either way."""
    check_comparable(report)
    run_root = Path(run_root)
    folder = run_root / PLOTS_FOLDER
    embedded = draw_plots(run_plots(run_root, report), folder)
    drawn = {Path(path).name for path, _ in embedded if path}
    for old in folder.glob("*.png") if folder.is_dir() else ():
        if old.name not in drawn:
            old.unlink(missing_ok=True)
    embedded = [(f"{PLOTS_FOLDER}/{path}" if path else None, caption) for path, caption in embedded]
    atomic_write_text(run_root / "results.md", markdown_report(report, embedded))
    return run_root / "results.md"


def rewrite_run_report(run_root: str | Path) -> Path:
    """``distillmt report RUN_FOLDER``: results.md and the plots again, from results.json and the stage folders."""
    run_root = Path(run_root)
    path = run_root / "results.json"
    try:
        report = read_json(path)
    except json.JSONDecodeError as e:
        raise DistillmtError(f"{path}: invalid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(report, dict) or not isinstance(report.get("systems", {}), dict):
        raise DistillmtError(f"{path} is not a distillmt results file: rerun `distillmt run` on its config")
    missing = [k for k in ("name", "systems", "stages", "wall_seconds", "machine") if k not in report]
    if missing:
        raise DistillmtError(f"{path} lacks {', '.join(missing)}: rerun `distillmt run` on its config to rebuild it")
    return write_run_report(run_root, report)


# ---------------------------------------------------------------------------------------------------------------------
# Plots: built as matplotlib Figures on the Agg canvas (no pyplot, no global state), saved atomically as PNG.

PLOTS_FOLDER = "plots"
METRIC_AXIS = {"chrf": "chrF (0–100)", "bleu": "BLEU (0–100)", "bertscore": "BERTScore F1"}
LOSS_AXIS = "loss (nats/token)"
STEP_AXIS = "optimizer step"


@dataclass
class Plot:
    """One figure of a report: its file name, the matplotlib Figure, and the one-line caption printed under it."""

    name: str
    figure: Figure
    caption: str


def new_figure(width: float, height: float) -> Figure:
    """A Figure on matplotlib's Agg canvas, with constrained layout (room for legends and colour bars)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_plot(plot: Plot, folder: str | Path) -> Path:
    """Write ``plot`` as ``folder/plot.name`` (PNG), atomically."""
    buf = io.BytesIO()
    plot.figure.savefig(buf, format="png", dpi=110)
    path = Path(folder) / plot.name
    atomic_write_bytes(path, buf.getvalue())
    return path


def draw_plots(jobs: Iterable[tuple[str, Callable[[], Plot | None]]], folder: Path) -> list[tuple[str | None, str]]:
    """Build and save each plot; ``(file name, caption)`` per drawn plot, ``(None, why)`` per plot that failed (the
    error is logged too), nothing for a plot with nothing to show. ``jobs``: (what, builder) pairs."""
    out: list[tuple[str | None, str]] = []
    for what, build in jobs:
        try:
            plot = build()
            if plot is not None:
                out.append((save_plot(plot, folder).name, plot.caption))
        except Exception as e:  # a plot must not cost the results of a finished run
            first = (str(e).strip().splitlines() or [""])[0]
            log.warning("plot %s not drawn: %s: %s", what, type(e).__name__, first)
            out.append((None, f"Plot {what} not drawn: {type(e).__name__}: {first}."))
    return out


def embed_plots(plots: Iterable[tuple[str | None, str]]) -> list[str]:
    """Markdown lines embedding each ``(path, caption)``: the image, then its caption in italics."""
    lines = []
    for path, caption in plots:
        if path is None:
            lines += [caption, ""]
        else:
            lines += [f"![{Path(path).stem}]({path})", "", f"*{caption}*", ""]
    return lines


def log_scale(values: Iterable[float]) -> bool:
    """Whether an axis over these (positive) values should be logarithmic: they span more than a factor of 10."""
    values = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    return bool(values) and min(values) > 0 and max(values) / min(values) > 10


def line_labels(ax: Axes) -> list[str]:
    """The labels of the labelled lines of ``ax`` (what its legend lists), in drawing order."""
    return [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")]


def metric_axis(key: str, column: str | None = None) -> str:
    """An axis label for a metric key, with its range where it has one: ``chrF (0–100)``."""
    return METRIC_AXIS.get(key, column or key)


def _file_part(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]", "-", text)


def _n_resamples(report: dict[str, Any]) -> str:
    n = (significance_results(report) or {}).get("n_samples")
    return f", {n:,} resamples" if isinstance(n, int) else ""


def score_plot(report: dict[str, Any], key: str) -> Plot | None:
    """Bar chart of one metric: a bar per system that measured it, with its 95% CI as an error bar where the
    significance test gives one, the baseline row hatched, † on rows that differ from it at p < 0.05. None when no
    row measured the metric."""
    from matplotlib.patches import Patch

    layout = _metric_layout(report)
    if key not in layout:
        return None
    first = layout[key]
    column = _score_column(report, key, first)
    measured = [
        (system, entry["score"])
        for system, r in report["systems"].items()
        if (entry := metric_entries(r["scores"]).get(key)) and entry.get("score") is not None
    ]
    if not measured:
        return None
    sig = significance_results(report)
    baseline = sig.get("baseline") if sig else None
    decimals = first.get("decimals", 2)
    fig = new_figure(max(4.8, 0.85 * len(measured) + 2.4), 3.8)
    ax = fig.subplots()
    names, values = [s for s, _ in measured], [v for _, v in measured]
    colors = ["#d9d9d9" if s == baseline else "#8fb9dc" for s in names]
    bars = ax.bar(range(len(names)), values, color=colors, edgecolor="black", linewidth=0.8)
    for bar, system in zip(bars, names, strict=True):
        if system == baseline:
            bar.set_hatch("//")
    with_ci, no_ci, marks = [], [], []
    for i, (system, value) in enumerate(measured):
        record = significance_record(report, system, key) or {}
        if record.get("ci_low") is not None and record.get("ci_high") is not None:
            with_ci.append((i, value, max(value - record["ci_low"], 0.0), max(record["ci_high"] - value, 0.0)))
        else:
            no_ci.append(system)
        marks.append(f"{value:.{decimals}f}" + (SIGNIFICANT if record.get("significant") else ""))
    for text in ax.bar_label(bars, labels=marks, label_type="center", fontsize=7):
        text.set_bbox({"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1})
    handles = [Patch(facecolor="#8fb9dc", edgecolor="black", label="system")]
    if baseline in names:
        handles.append(Patch(facecolor="#d9d9d9", edgecolor="black", hatch="//", label=f"baseline ({baseline})"))
    if with_ci:
        idx, val, lo, hi = zip(*with_ci, strict=True)
        handles.append(ax.errorbar(idx, val, yerr=[lo, hi], fmt="none", ecolor="black", capsize=4, label="95% CI"))
    ax.set_xticks(
        range(len(names)), names, rotation=0 if len(names) <= 5 else 30, ha="center" if len(names) <= 5 else "right"
    )
    ax.set(xlabel="system", ylabel=metric_axis(key, column), title=f"{report['name']}: {column} per system")
    ax.set_ylim(0, max([*values, *(v + h for _, v, _, h in with_ci)]) * 1.12 or 1.0)
    ax.grid(axis="y", alpha=0.3)
    fig.legend(handles=handles, fontsize=8, loc="outside right upper")
    caption = f"{column} of each system"
    if with_ci:
        caption += f", error bars: 95% CI from paired bootstrap resampling{_n_resamples(report)}"
        if no_ci:
            caption += f"; no CI for {', '.join(no_ci)} (not tested), so no error bar there"
    else:
        skipped = (report.get("significance") or {}).get("skipped")
        caption += ", no error bars: " + (f"no significance test ({skipped})" if skipped else "no CIs were computed")
    if baseline in names:
        caption += f"; hatched: the baseline {baseline}"
        if with_ci:
            caption += f", {SIGNIFICANT} = differs from it at p < {sig.get('alpha', 0.05):g}"
    return Plot(f"scores_{_file_part(key)}.png", fig, caption + ".")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a training stage's metrics.jsonl (see ``train._MetricsLog``); damaged lines are skipped."""
    records = []
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
            records.append(record)
    return records


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    points = [
        (r["step"], r[key])
        for r in records
        if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) and math.isfinite(r[key])
    ]
    return [p[0] for p in points], [p[1] for p in points]


def _stage_divergence(report: dict[str, Any], stage: str) -> str | None:
    """The divergence D a soft-label KD stage trained with, from the report's config (None when unknown)."""
    system = next((s for s in systems.TABLE if s.stage == stage), None)
    if system is None or "soft_kd" not in system.teacher_from:
        return None
    return ((report.get("config") or {}).get("soft_kd") or {}).get("divergence")


def training_plot(run_root: str | Path, report: dict[str, Any], stage: str) -> Plot | None:
    """Training curves of one stage from its ``metrics.jsonl``: the training loss (running means over the logged
    steps), with KD also its CE and KD term D (and the true forward KL when D is another divergence), and the
    validation CE, against the optimizer step. None when the stage has no metrics.jsonl or nothing in it."""
    from matplotlib.ticker import MaxNLocator

    path = Path(run_root) / stage / "metrics.jsonl"
    if not path.is_file():
        return None
    records = read_metrics(path)
    kd = any(isinstance(r.get("kd"), (int, float)) for r in records)
    divergence = _stage_divergence(report, stage) if kd else None
    d_name = f"D = {divergence}" if divergence else "D"
    lines = [
        ("loss", "training loss: α·CE + (1−α)·T²·D" if kd else "training loss (CE)", "-", None),
        ("ce", "training CE", "-", None),
        ("kd", f"KD term {d_name} (before T²)", "-", None),
        ("forward_kl", "forward KL(teacher‖student)", ":", None),
        ("valid_ce", "validation CE", "--", "o"),
    ]
    if not kd:
        lines = [line for line in lines if line[0] not in ("ce", "kd", "forward_kl")]
        if not _series(records, "loss")[0]:
            lines.insert(0, ("ce", "training loss (CE)", "-", None))
    elif divergence == "forward_kl":
        lines = [line for line in lines if line[0] != "forward_kl"]
    fig = new_figure(8.0, 3.8)
    ax = fig.subplots()
    drawn = []
    for key, label, style, marker in lines:
        steps, values = _series(records, key)
        if steps:
            ax.plot(steps, values, linestyle=style, marker=marker, markersize=3, label=label)
            drawn.append(key)
    if not drawn:
        return None
    ax.set(xlabel=STEP_AXIS, ylabel=LOSS_AXIS, title=f"{report['name']}: {stage} training curves")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    fig.legend(fontsize=8, loc="outside right upper")
    parts = ["training loss (running means between logged steps)"]
    if kd:
        parts.append(f"its CE and KD term {d_name} (KD stage)")
    if "valid_ce" in drawn:
        parts.append("validation CE")
    caption = f"{stage}: " + ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1]
    caption += " against the optimizer step"
    if divergence == "tvd":
        caption += "; D = TVD is a distance between distributions (0–1), not nats"
    if not (Path(run_root) / stage / "stage.json").is_file():
        last = max((r["step"] for r in records if isinstance(r.get("step"), int)), default=0)
        caption += f"; not finished (stopped at step {last}): its row is not scored yet"
    return Plot(f"training_{_file_part(stage)}.png", fig, caption + ".")


def _training_stages(run_root: Path, report: dict[str, Any]) -> list[str]:
    """The run's training stages (``train_*``), in the report's stage order, that have a metrics.jsonl."""
    names = [s for s in report.get("stages", {}) if s.startswith("train_")]
    names += sorted(p.name for p in run_root.glob("train_*") if p.name not in names)
    return [s for s in names if (run_root / s / "metrics.jsonl").is_file()]


def run_plots(run_root: str | Path, report: dict[str, Any]) -> list[tuple[str, Callable[[], Plot | None]]]:
    """The plots of one run, as (what, builder) pairs for :func:`draw_plots`: a score bar chart per metric, then
    the training curves per training stage."""
    run_root = Path(run_root)
    jobs: list[tuple[str, Callable[[], Plot | None]]] = [
        (f"scores_{key}", lambda key=key: score_plot(report, key)) for key in _metric_layout(report)
    ]
    jobs += [
        (f"training_{stage}", lambda stage=stage: training_plot(run_root, report, stage))
        for stage in _training_stages(run_root, report)
    ]
    return jobs


# ---------------------------------------------------------------------------------------------------------------------
# Row descriptions ("## Systems")


def describe_system(cfg: ExperimentConfig, name: str) -> str:
    """One line saying what a row is: the model and how it was trained (its KD settings for the KD rows)."""
    if name not in systems.BY_NAME:
        raise DistillmtError(f"unknown system {name!r}; known: {', '.join(systems.NAMES)}")
    if name == "HLKD":
        h = cfg.hard_kd
        return (
            f"labels from the {h.teacher} teacher, {h.num_candidates} candidate(s), "
            f"selection={h.selection}, beams={h.decoding.num_beams}, sample={h.decoding.do_sample}, "
            f"mix_references={h.mix_references}"
        )
    if name == "SLKD":
        s = cfg.soft_kd
        return (
            f"{s.teacher} teacher, loss={s.alpha}*CE+{1 - s.alpha:g}*T^2*{s.divergence}, "
            f"T={s.temperature}"
            + (f", beta={s.beta}" if s.divergence in ("jsd", "skew_kl") else "")
            + (f", top-{s.cache_k} cache" if s.cache else "")
        )
    if name == "GKD":
        return f"on-policy lambda={cfg.gkd.lmbda}, {cfg.soft_kd.divergence}, T={cfg.soft_kd.temperature}"
    if name == "HLKD+SLKD":
        s = cfg.soft_kd
        return (
            f"labels from the {cfg.hard_kd.teacher} teacher (as HLKD), trained with "
            f"{s.alpha}*CE+{1 - s.alpha:g}*T^2*{s.divergence} against the live {s.teacher} teacher, T={s.temperature}"
        )
    system = systems.get(name)
    m = getattr(cfg, system.side)
    if cfg.teacher.model == "scratch":  # the config allows both sides scratch or neither
        s = m.scratch
        return f"{system.side} from scratch (h={s.hidden_size}, layers={s.num_layers}) trained on the references"
    if system.base:
        return f"{m.model}, zero-shot"
    lora = f"LoRA r={m.lora.r} alpha={m.lora.alpha}" if m.lora.enabled else "all weights"
    return f"{m.model} + {lora} on the references"
