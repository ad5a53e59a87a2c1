"""The figures of the reports: a run's results.md and a sweep's report.md draw every plot here.

Figures are matplotlib Figures on the Agg canvas (no pyplot, no global state), saved atomically as PNG; matplotlib is
imported only when a figure is built, so commands that draw nothing start without it. A report passes
:func:`draw_plots` (what, builder) pairs: a plot that fails costs only that plot.

Run reports (:func:`run_plots`): ``scores_<metric>.png``, a bar per system with its 95% CI (hatched: the baseline
row), one per measured metric; ``training_<stage>.png``, the curves of each training stage's ``metrics.jsonl``.
Sweep reports (:func:`sweep_plots`): ``<metric>_lines.png`` and ``<metric>_heatmap.png`` for a full two-key grid,
``<metric>_lines.png`` for one numeric key, else ``<metric>_bars.png``.

Metric names, score columns and axis ranges come from the metric entries of the scores and from
``distillmt.metrics.METRICS``, never from a list here: a new metric gets its plots without a change in this module.
The readers of a run's metric entries and significance data live here too, as the run report's table shares them.
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from distillmt import systems
from distillmt.io import atomic_write_bytes
from distillmt.metrics import METRICS, metric_entries

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

log = logging.getLogger("distillmt.plots")

# ---------------------------------------------------------------------------------------------------------------------
# A run's metric entries and significance data, as the table and the score plots read them

SIGNIFICANT = "†"


def metric_layout(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Metric key -> the first entry seen for it, over the rows in order: the first row's metrics give the column
    order; a metric only later rows have is appended rather than dropped."""
    layout: dict[str, dict[str, Any]] = {}
    for row in report["systems"].values():
        for key, entry in metric_entries(row["scores"]).items():
            layout.setdefault(key, entry)
    return layout


def significance_results(report: dict[str, Any]) -> dict[str, Any] | None:
    """The report's significance data when a test was run (not skipped), else None."""
    sig = report.get("significance")
    return sig if isinstance(sig, dict) and isinstance(sig.get("systems"), dict) else None


def significance_record(report: dict[str, Any], system: str, key: str) -> dict[str, Any] | None:
    """One row's test result for one metric key (``{"score", "mean", "ci_low", "ci_high", "p_value",
    "significant"}``; p_value None for the baseline row), or None when it was not tested."""
    sig = significance_results(report)
    return None if sig is None else sig["systems"].get(system, {}).get(key)


def score_column(report: dict[str, Any], key: str, first: dict[str, Any]) -> str:
    """The column that shows a metric's score (``BERTScore F1`` for BERTScore): the one holding ``score``."""
    for row in report["systems"].values():
        entry = metric_entries(row["scores"]).get(key, {})
        if entry.get("score") is not None:
            for column, value in entry["columns"].items():
                if value == entry["score"]:
                    return column
    return list(first["columns"])[-1]


# ---------------------------------------------------------------------------------------------------------------------
# Figures: build, save, draw a report's plots, embed them in markdown

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


def is_number(value: Any) -> bool:
    """A finite int or float (a bool is no number here: CSV cells and JSON values can be either)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def log_scale(values: Iterable[float]) -> bool:
    """Whether an axis over these (positive) values should be logarithmic: they span more than a factor of 10."""
    values = [v for v in values if is_number(v)]
    return bool(values) and min(values) > 0 and max(values) / min(values) > 10


def line_labels(ax: Axes) -> list[str]:
    """The labels of the labelled lines of ``ax`` (what its legend lists), in drawing order."""
    return [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")]


def metric_axis(key: str, column: str | None = None) -> str:
    """An axis label for a metric key, with its range where the metric declares one: ``chrF (0–100)``; for a metric
    ``METRICS`` does not know, ``column`` (its score column) or the key."""
    metric = METRICS.get(key)
    return metric.axis if metric else column or key


def score_name(key: str) -> str:
    """What a metric key's score is called in titles and captions: its score column (``BERTScore F1``)."""
    metric = METRICS.get(key)
    return metric.score_column if metric else key


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

    layout = metric_layout(report)
    if key not in layout:
        return None
    first = layout[key]
    column = score_column(report, key, first)
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
    points = [(r["step"], r[key]) for r in records if is_number(r.get(key))]
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
        (f"scores_{key}", lambda key=key: score_plot(report, key)) for key in metric_layout(report)
    ]
    jobs += [
        (f"training_{stage}", lambda stage=stage: training_plot(run_root, report, stage))
        for stage in _training_stages(run_root, report)
    ]
    return jobs


# ---------------------------------------------------------------------------------------------------------------------
# Sweep plots: the plot metric over the points of a sweep, from the rows of its results.csv


class SweepPoint(Protocol):
    """What the sweep plots read of a ``sweep.Point``."""

    @property
    def name(self) -> str: ...

    @property
    def settings(self) -> dict[str, Any]: ...


class SweepSpec(Protocol):
    """What the sweep plots read of a ``sweep.Sweep`` (this module does not import the sweep module)."""

    @property
    def name(self) -> str: ...

    @property
    def points(self) -> Sequence[SweepPoint]: ...

    @property
    def varied(self) -> list[str]: ...

    @property
    def plot_metric(self) -> str: ...


SWEEP_PLOT_KINDS = ("lines", "heatmap", "bars")

KEY_AXIS = {
    "data.train_size": "data.train_size (training pairs)",
    "soft_kd.temperature": "soft_kd.temperature (softmax T)",
    "soft_kd.alpha": "soft_kd.alpha (weight of CE)",
    "gkd.lmbda": "gkd.lmbda (on-policy fraction)",
    "train_teacher.epochs": "train_teacher.epochs (epochs)",
    "train_student.epochs": "train_student.epochs (epochs)",
    "student.lora.r": "student.lora.r (LoRA rank)",
}


def key_axis(key: str) -> str:
    """An axis label for a swept key, with its unit where it has one: ``data.train_size (training pairs)``."""
    return KEY_AXIS.get(key, key)


def _fmt_value(value: Any) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) >= 1000:
        return f"{int(value):,}"
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


@dataclass
class _Cells:
    """The plot metric's values per (point, system) over the seeds, and what the bands and error bars show: ± one
    standard deviation over the seeds when a cell has more than one seed, else the row's 95% CI."""

    metric: str
    values: dict[tuple[str, str], list[dict[str, Any]]]
    systems: list[str]
    points: list[SweepPoint]
    multi_seed: bool

    @classmethod
    def of(cls, sweep: SweepSpec, rows: list[dict[str, Any]]) -> _Cells | None:
        metric = sweep.plot_metric
        rows = [r for r in rows if is_number(r.get(metric))]
        if not rows:
            return None
        values: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for r in rows:
            values.setdefault((r["point"], r["system"]), []).append(r)
        names = list(dict.fromkeys(r["system"] for r in rows))
        points = [p for p in sweep.points if any((p.name, s) in values for s in names)]
        return cls(metric, values, names, points, any(len(v) > 1 for v in values.values()))

    def mean(self, point: SweepPoint, system: str) -> float:
        group = self.values.get((point.name, system))
        return statistics.mean(r[self.metric] for r in group) if group else math.nan

    def band(self, point: SweepPoint, system: str) -> tuple[float, float] | None:
        """(low, high) of the band or error bar at one cell, None where there is none."""
        group = self.values.get((point.name, system)) or []
        if self.multi_seed:
            if len(group) < 2:
                return None
            mean, sd = self.mean(point, system), statistics.stdev(r[self.metric] for r in group)
            return mean - sd, mean + sd
        if len(group) == 1:
            low, high = group[0].get(f"{self.metric}_ci_low"), group[0].get(f"{self.metric}_ci_high")
            if is_number(low) and is_number(high):
                return low, high
        return None

    def band_label(self) -> str:
        if self.multi_seed:
            return "± 1 s.d. over seeds"
        return "95% CI (one seed)"

    def has_bands(self) -> bool:
        return any(self.band(p, s) is not None for p in self.points for s in self.systems)

    def band_caption(self, what: str) -> str:
        """``; bands: ...`` for the caption, naming the systems that have none."""
        if not self.has_bands():
            why = "fewer than two seeds per point" if self.multi_seed else "one seed and no CI in results.csv"
            return f"; no {what}: {why}"
        missing = [s for s in self.systems if all(self.band(p, s) is None for p in self.points)]
        if self.multi_seed:
            text = f"; {what}: ± one standard deviation over the seeds (mean of {self.n_seeds()} seeds)"
        else:
            text = f"; {what}: the 95% CI of the run's paired bootstrap test (one seed)"
        if missing:
            text += f"; none for {', '.join(missing)}"
        return text

    def n_seeds(self) -> str:
        counts = sorted({len(v) for v in self.values.values()})
        return str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"

    def varies(self, system: str) -> bool:
        return len({round(self.mean(p, system), 6) for p in self.points if (p.name, system) in self.values}) > 1


def _two_key_grid(sweep: SweepSpec, cells: _Cells) -> tuple[str, str, list[Any], list[Any]] | None:
    """(first key, second key, their values) when the points are a full grid over exactly two varied keys."""
    if len(sweep.varied) != 2:
        return None
    kx, ky = sweep.varied
    xs = list(dict.fromkeys(json.dumps(p.settings.get(kx)) for p in cells.points))
    ys = list(dict.fromkeys(json.dumps(p.settings.get(ky)) for p in cells.points))
    combos = {(json.dumps(p.settings.get(kx)), json.dumps(p.settings.get(ky))) for p in cells.points}
    if len(xs) < 2 or len(ys) < 2 or len(combos) != len(xs) * len(ys):
        return None
    return kx, ky, [json.loads(x) for x in xs], [json.loads(y) for y in ys]


def _one_numeric_key(sweep: SweepSpec, cells: _Cells) -> bool:
    """One varied key, numeric, with at least two values among the points that have results."""
    if len(sweep.varied) != 1:
        return False
    values = [p.settings.get(sweep.varied[0]) for p in cells.points]
    return len(set(map(json.dumps, values))) > 1 and all(is_number(v) for v in values)


def _shown_systems(cells: _Cells) -> list[str]:
    """The systems a per-system grid plot shows: the KD rows and any row whose score changes between points."""
    shown = [s for s in cells.systems if (s in systems.BY_NAME and systems.get(s).teacher_from) or cells.varies(s)]
    return shown or cells.systems[-1:]


def _x_axis(ax: Any, key: str, values: list[Any]) -> list[float]:
    """Place ``values`` on the x axis: numeric values at their value (log scale past a factor of 10, ticks at the
    values), anything else at 0, 1, 2, ... with the values as tick labels. Returns the positions."""
    if all(is_number(v) for v in values):
        xs = [float(v) for v in values]
        if log_scale(xs):
            ax.set_xscale("log")
            ax.minorticks_off()
    else:
        xs = [float(i) for i in range(len(values))]
    ax.set_xticks(xs, [_fmt_value(v) for v in values])
    ax.set_xlabel(key_axis(key) + (" (log scale)" if ax.get_xscale() == "log" else ""))
    return xs


def _line(ax: Any, cells: _Cells, points: list[SweepPoint], xs: list[float], system: str, **style: Any) -> None:
    """One line (mean over seeds) with its band (fill_between) where the cells have one."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    xs, points = [xs[i] for i in order], [points[i] for i in order]
    ys = [cells.mean(p, system) for p in points]
    (line,) = ax.plot(xs, ys, marker="o", markersize=4, **style)
    bands = [cells.band(p, system) for p in points]
    if any(b is not None for b in bands):
        low = [b[0] if b else math.nan for b in bands]
        high = [b[1] if b else math.nan for b in bands]
        ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.2, linewidth=0)


def _band_handles(cells: _Cells) -> list[Any]:
    """The legend entry of the bands: what they show (none when no cell has a band)."""
    from matplotlib.patches import Patch

    return [Patch(facecolor="0.5", alpha=0.3, label=f"band: {cells.band_label()}")] if cells.has_bands() else []


def grid_lines_plot(sweep: SweepSpec, rows: list[dict[str, Any]]) -> Plot | None:
    """For a full two-key grid: the plot metric against the first varied key, one line per value of the second,
    one panel per KD system (and per other system whose score changes between points). None otherwise."""
    cells = _Cells.of(sweep, rows)
    grid = cells and _two_key_grid(sweep, cells)
    if not grid:
        return None
    kx, ky, x_values, y_values = grid
    shown = _shown_systems(cells)
    fig = new_figure(4.6 * len(shown) + 1.6, 3.8)
    axes = fig.subplots(1, len(shown), squeeze=False)[0]
    for ax, system in zip(axes, shown, strict=True):
        xs = _x_axis(ax, kx, x_values)
        for y in y_values:
            at = [
                next(p for p in cells.points if p.settings.get(kx) == x and p.settings.get(ky) == y) for x in x_values
            ]
            have = [i for i, p in enumerate(at) if (p.name, system) in cells.values]
            if have:
                _line(ax, cells, [at[i] for i in have], [xs[i] for i in have], system, label=f"{ky} = {_fmt_value(y)}")
        ax.set(ylabel=metric_axis(cells.metric), title=f"{system}")
        ax.grid(alpha=0.3)
        handles, _ = ax.get_legend_handles_labels()
        ax.legend(handles=[*handles, *_band_handles(cells)], fontsize=7, title=ky, title_fontsize=7)
    fig.suptitle(f"{sweep.name}: {score_name(cells.metric)} vs {kx}, one line per {ky}")
    caption = (
        f"{score_name(cells.metric)} against {kx}, one line per value of {ky}, for {', '.join(shown)}"
        + cells.band_caption("bands")
    )
    return Plot(f"{cells.metric}_lines.png", fig, caption + ".")


def heatmap_plot(sweep: SweepSpec, rows: list[dict[str, Any]]) -> Plot | None:
    """For a full two-key grid: a heat map of the plot metric (mean over seeds) per shown system. None otherwise."""
    cells = _Cells.of(sweep, rows)
    grid = cells and _two_key_grid(sweep, cells)
    if not grid:
        return None
    kx, ky, xs, ys = grid
    shown = _shown_systems(cells)
    fig = new_figure(4.4 * len(shown), 3.8)
    axes = fig.subplots(1, len(shown), squeeze=False)[0]
    label = score_name(cells.metric)
    for ax, system in zip(axes, shown, strict=True):
        table = [[math.nan] * len(xs) for _ in ys]
        for p in cells.points:
            if (p.name, system) in cells.values:
                table[ys.index(p.settings.get(ky))][xs.index(p.settings.get(kx))] = cells.mean(p, system)
        im = ax.imshow(table, cmap="viridis", origin="lower", aspect="auto")
        for yi, line in enumerate(table):
            for xi, v in enumerate(line):
                text = "" if math.isnan(v) else f"{v:.4f}" if abs(v) <= 1 else f"{v:.2f}"
                ax.text(xi, yi, text, ha="center", va="center", color="w", fontsize=8)
        ax.set(xticks=range(len(xs)), yticks=range(len(ys)), xlabel=key_axis(kx), ylabel=key_axis(ky))
        ax.set_xticklabels([_fmt_value(x) for x in xs])
        ax.set_yticklabels([_fmt_value(y) for y in ys])
        ax.set_title(f"{sweep.name}: {system} {label}")
        bar = fig.colorbar(im, ax=ax)
        bar.set_label(f"{metric_axis(cells.metric)}, mean over seeds")
    caption = (
        f"{label} (mean over {cells.n_seeds()} seed(s)) over the {kx} × {ky} grid for {', '.join(shown)}; "
        "the colour bar is the legend"
    )
    return Plot(f"{cells.metric}_heatmap.png", fig, caption + ".")


def key_lines_plot(sweep: SweepSpec, rows: list[dict[str, Any]]) -> Plot | None:
    """For one varied numeric key: the plot metric against it, one line per system with a band (± one standard
    deviation over the seeds, or the 95% CI with one seed). None otherwise."""
    cells = _Cells.of(sweep, rows)
    if cells is None or not _one_numeric_key(sweep, cells):
        return None
    key = sweep.varied[0]
    values = [p.settings.get(key) for p in cells.points]
    fig = new_figure(6.4, 3.8)
    ax = fig.subplots()
    xs = _x_axis(ax, key, values)
    for system in cells.systems:
        have = [i for i, p in enumerate(cells.points) if (p.name, system) in cells.values]
        _line(ax, cells, [cells.points[i] for i in have], [xs[i] for i in have], system, label=system)
    ax.set(ylabel=metric_axis(cells.metric), title=f"{sweep.name}: {score_name(cells.metric)} vs {key}")
    ax.grid(alpha=0.3)
    handles, _ = ax.get_legend_handles_labels()
    ax.legend(handles=[*handles, *_band_handles(cells)], fontsize=8)
    scale = " (log-scale axis)" if ax.get_xscale() == "log" else ""
    caption = f"{score_name(cells.metric)} against {key}{scale}, one line per system" + cells.band_caption("bands")
    return Plot(f"{cells.metric}_lines.png", fig, caption + ".")


def bars_plot(sweep: SweepSpec, rows: list[dict[str, Any]]) -> Plot | None:
    """The plot metric per point (a group of bars, one per system) with error bars (± one standard deviation over
    the seeds, or the 95% CI with one seed): for sweeps that are neither one numeric key nor a two-key grid."""
    from matplotlib.lines import Line2D

    cells = _Cells.of(sweep, rows)
    if cells is None:
        return None
    n, width = len(cells.systems), 0.8 / len(cells.systems)
    fig = new_figure(max(7.0, 0.5 * n * len(cells.points) + 4.0), 4.2)
    ax = fig.subplots()
    for j, system in enumerate(cells.systems):
        have = [i for i, p in enumerate(cells.points) if (p.name, system) in cells.values]
        xs = [i - 0.4 + width * (j + 0.5) for i in have]
        means = [cells.mean(cells.points[i], system) for i in have]
        bands = [cells.band(cells.points[i], system) for i in have]
        errors = [
            [max(m - b[0], 0.0) if b else 0.0 for m, b in zip(means, bands, strict=True)],
            [max(b[1] - m, 0.0) if b else 0.0 for m, b in zip(means, bands, strict=True)],
        ]
        ax.bar(xs, means, width=width, label=system, edgecolor="black", linewidth=0.6)
        if any(b is not None for b in bands):
            ax.errorbar(xs, means, yerr=errors, fmt="none", ecolor="black", capsize=3)
    one_key = len(sweep.varied) == 1
    names = [_fmt_value(p.settings.get(sweep.varied[0])) if one_key else p.name for p in cells.points]
    ax.set_xticks(range(len(names)), names, rotation=0 if one_key else 25, ha="center" if one_key else "right")
    ax.set(
        xlabel=key_axis(sweep.varied[0]) if one_key else "point (settings)",
        ylabel=metric_axis(cells.metric),
        title=f"{sweep.name}: {score_name(cells.metric)} per point",
    )
    ax.grid(axis="y", alpha=0.3)
    handles, _ = ax.get_legend_handles_labels()
    if cells.has_bands():
        label = f"error bar: {cells.band_label()}"
        handles.append(Line2D([], [], color="black", marker="_", markersize=10, label=label))
    fig.legend(handles=handles, fontsize=8, loc="outside right upper")
    caption = f"{score_name(cells.metric)} per point, a bar per system" + cells.band_caption("error bars")
    return Plot(f"{cells.metric}_bars.png", fig, caption + ".")


def sweep_plots(sweep: SweepSpec, rows: list[dict[str, Any]]) -> list[tuple[str, Callable[[], Plot | None]]]:
    """The sweep's plots as (what, builder) pairs for :func:`draw_plots`: a full two-key grid gets the lines
    (first key on x, a line per second-key value) and the heat map; one varied numeric key gets the lines with
    bands; anything else the bars per point."""
    cells = _Cells.of(sweep, rows)
    if cells is None:
        return []
    if _two_key_grid(sweep, cells):
        return [("lines", lambda: grid_lines_plot(sweep, rows)), ("heatmap", lambda: heatmap_plot(sweep, rows))]
    if _one_numeric_key(sweep, cells):
        return [("lines", lambda: key_lines_plot(sweep, rows))]
    return [("bars", lambda: bars_plot(sweep, rows))]


def sweep_plot_files() -> list[str]:
    """Every file name a sweep report can draw, for any metric: what to remove when a report no longer draws it."""
    return [f"{key}_{kind}.png" for key in METRICS for kind in SWEEP_PLOT_KINDS]
