"""Sweeps: one command runs an experiment at every point of a grid (or an explicit list) over any dotted config key,
for several seeds, and reports the answer as a table, ``results.csv`` and plots.

A sweep file (YAML, in ``configs/sweeps/``)::

    name: temperature-alpha          # output folder: <output_dir>/<name>/
    base: configs/default.yaml       # the experiment every point starts from (omit: the default experiment)
    overrides: [systems=[STUDENT,SLKD]]   # applied to every point
    grid:                            # every combination of these values ...
      soft_kd.temperature: [1, 2, 4]
      soft_kd.alpha: [0.1, 0.5, 0.9]
    points:                          # ... and/or these points, each a mapping of dotted keys to values
      - {soft_kd.divergence: jsd, soft_kd.beta: 0.5}
    seeds: [0, 1]                    # each point runs once per seed (the seed also draws the data split)
    plot_metric: chrf                # the metric the plots show: chrf | bleu | bertscore

Each point × seed is a run folder ``<output_dir>/<name>/<point>-seed<k>/`` whose stage folders are links into one
stage store, ``<output_dir>/stages/<stage>-<key>/``, shared by every sweep under that output folder: a stage whose
key is the same in two points, or in two sweeps (the teacher's training, its labels, its logit cache), is computed
once and reused. A rerun skips finished points (each
stage is checked as in any run) and an interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import math
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distillmt import systems
from distillmt.config import ExperimentConfig, load_config, read_yaml
from distillmt.errors import DistillmtError
from distillmt.io import atomic_write_bytes, atomic_write_text

log = logging.getLogger("distillmt.sweep")

SWEEP_KEYS = ("name", "base", "overrides", "grid", "points", "seeds", "plot_metric")
PLOT_METRICS = ("chrf", "bleu", "bertscore")


@dataclass
class Point:
    name: str
    settings: dict[str, Any]  # dotted key → value


@dataclass
class Sweep:
    name: str
    base: str | None
    overrides: list[str]
    points: list[Point]
    seeds: list[int]
    plot_metric: str = "chrf"
    varied: list[str] = field(default_factory=list)  # the keys that differ between points, in first-seen order

    def config(self, point: Point, seed: int, output_dir: str | Path) -> ExperimentConfig:
        settings = [f"{k}={json.dumps(v)}" for k, v in point.settings.items()]
        run = [f"seed={seed}", f"output_dir={json.dumps(str(output_dir))}", f"name={point.name}-seed{seed}"]
        return load_config(self.base, [*self.overrides, *settings, *run])


def _point_name(index: int, settings: dict[str, Any]) -> str:
    """p03_temperature=2_alpha=0.5: the index keeps names unique, the settings make them readable."""
    parts = [f"p{index:02d}"] + [f"{k.split('.')[-1]}={v}" for k, v in settings.items()]
    return re.sub(r"[^A-Za-z0-9._=+-]", "-", "_".join(parts))[:80]


def _expand(path: Path, data: dict[str, Any]) -> list[dict[str, Any]]:
    grid = data.get("grid") or {}
    if not isinstance(grid, dict) or any(not isinstance(v, list) or not v for v in grid.values()):
        raise DistillmtError(f"{path}: 'grid' must map dotted config keys to non-empty lists of values")
    points = data.get("points") or []
    if not isinstance(points, list) or any(not isinstance(p, dict) for p in points):
        raise DistillmtError(f"{path}: 'points' must be a list of mappings of dotted config keys to values")
    combos = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())] if grid else []
    expanded = combos + [dict(p) for p in points]
    if not expanded:
        raise DistillmtError(f"{path}: a sweep needs a 'grid' or a list of 'points'")
    return expanded


def load_sweep(path: str | Path, overrides: list[str] | None = None, output_dir: str | None = None) -> Sweep:
    """Read and check a sweep file: every point's config is built (and validated) now, before anything runs, so a
    typo in the last point fails in seconds, naming the point."""
    path = Path(path)
    data = read_yaml(path, "sweep")
    unknown = sorted(set(data) - set(SWEEP_KEYS))
    if unknown:
        raise DistillmtError(f"{path}: unknown sweep key '{unknown[0]}' (known: {', '.join(SWEEP_KEYS)})")
    name = data.get("name")
    if not isinstance(name, str) or not name or not re.fullmatch(r"[A-Za-z0-9._-]+", name) or name in (".", ".."):
        raise DistillmtError(f"{path}: 'name' must be a folder name of letters, digits, '.', '_' or '-', got {name!r}")
    if name == "stages":
        raise DistillmtError(f"{path}: 'name' cannot be 'stages': that folder is the sweeps' shared stage store")
    base = data.get("base")
    if base is not None and not Path(base).is_file() and (path.parent / base).is_file():
        base = str(path.parent / base)  # relative to the sweep file when not relative to the working folder
    sweep_overrides = data.get("overrides") or []
    if not isinstance(sweep_overrides, list) or any(not isinstance(o, str) for o in sweep_overrides):
        raise DistillmtError(f"{path}: 'overrides' must be a list of key=value strings")
    seeds = data.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
        raise DistillmtError(f"{path}: 'seeds' must be a non-empty list of integers, got {seeds!r}")
    plot_metric = data.get("plot_metric", "chrf")
    if plot_metric not in PLOT_METRICS:
        raise DistillmtError(f"{path}: 'plot_metric' must be one of {', '.join(PLOT_METRICS)}, got {plot_metric!r}")
    settings = _expand(path, data)
    varied = [
        k for k in dict.fromkeys(k for s in settings for k in s) if len({json.dumps(s.get(k)) for s in settings}) > 1
    ]
    points = [Point(_point_name(i, s), s) for i, s in enumerate(settings)]
    sweep = Sweep(name, base, [*sweep_overrides, *(overrides or [])], points, seeds, plot_metric, varied)
    for i, point in enumerate(points):
        try:
            sweep.config(point, seeds[0], output_dir or "runs")
        except DistillmtError as e:
            raise DistillmtError(f"{path}: point {i} ({point.name}): {e}") from None
    return sweep


def output_root(sweep: Sweep) -> Path:
    """<output_dir>/<sweep name>, output_dir as the base config and the overrides set it."""
    return Path(load_config(sweep.base, sweep.overrides).output_dir) / sweep.name


def run_sweep(sweep: Sweep, *, progress: bool = True, command: str | None = None) -> list[dict[str, Any]]:
    """Run every point × seed (finished ones are skipped stage by stage), writing results.csv and report.md after
    each run so an interrupted sweep still shows what it has. Returns the rows of results.csv."""
    from distillmt.pipeline import run_experiment

    root = output_root(sweep)
    store = root.parent / "stages"
    rows: list[dict[str, Any]] = []
    runs = [(p, s) for p in sweep.points for s in sweep.seeds]
    for i, (point, seed) in enumerate(runs, 1):
        log.info("sweep %s: run %d/%d: %s, seed %d", sweep.name, i, len(runs), point.name, seed)
        report = run_experiment(sweep.config(point, seed, root), progress=progress, command=command, store=store)
        rows.extend(result_rows(sweep, point, seed, report))
        write_sweep_report(sweep, root, rows, command=command, runs=(i, len(runs)))
    return rows


def result_rows(sweep: Sweep, point: Point, seed: int, report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per system of one run: the varied settings, every metric's score (and its CI and p-value against
    the baseline row where the run measured them), translation speed and the run's compute time."""
    from distillmt.report import significance_record

    stages = report["stages"]
    compute = sum(t.get("seconds") or 0.0 for t in stages.values())
    out = []
    for system, r in report["systems"].items():
        row: dict[str, Any] = {"point": point.name, "seed": seed}
        row.update({k: point.settings.get(k) for k in sweep.varied})
        row["system"] = system
        for key, entry in r["scores"].items():
            if not isinstance(entry, dict) or "columns" not in entry:
                continue
            row[key] = entry.get("score")
            tested = significance_record(report, system, key) or {}
            for extra in ("ci_low", "ci_high", "p_value"):
                if extra in tested:
                    row[f"{key}_{extra}"] = tested[extra]
        train = stages.get(systems.get(system).stage, {})
        row.update(
            tokens_per_s=r["translation"].get("tokens_per_s"),
            train_seconds=train.get("seconds"),
            compute_seconds=compute,
            stages_reused=sum(1 for t in stages.values() if t.get("skipped")),
        )
        out.append(row)
    return out


def _csv(rows: list[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "n/a"
    decimals = 4 if abs(values[0]) <= 1.0 else 2
    if len(values) == 1:
        return f"{values[0]:.{decimals}f}"
    return f"{statistics.mean(values):.{decimals}f} ± {statistics.stdev(values):.{decimals}f}"


def summary_table(sweep: Sweep, rows: list[dict[str, Any]]) -> str:
    """Markdown: one line per point and system, each metric as mean ± standard deviation over the seeds."""
    metrics = [m for m in ("bertscore", "chrf", "bleu") if any(m in r for r in rows)]
    header = ["point", *sweep.varied, "system", *metrics, "seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["point"], r["system"]), []).append(r)
    for (point, system), group in groups.items():
        first = group[0]
        cells = [point, *[str(first.get(k)) for k in sweep.varied], system]
        cells += [_mean_std([g.get(m) for g in group]) for m in metrics]
        cells.append(str(len(group)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(sweep: Sweep, rows: list[dict[str, Any]], out: Path) -> Path | None:
    """The plot metric against the swept setting: a line per system for one varied key (error bars: standard
    deviation over seeds), a heatmap per KD system for a two-key grid, bars per point otherwise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = sweep.plot_metric
    rows = [r for r in rows if r.get(metric) is not None]
    if not rows:
        return None
    systems = list(dict.fromkeys(r["system"] for r in rows))
    by = lambda r: (r["point"], r["system"])  # noqa: E731
    means: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        means.setdefault(by(r), []).append(r[metric])
    points = [p for p in sweep.points if any((p.name, s) in means for s in systems)]
    label = {"chrf": "chrF", "bleu": "BLEU", "bertscore": "BERTScore F1"}[metric]
    if len(sweep.varied) == 2 and all(len({json.dumps(p.settings.get(k)) for p in points}) > 1 for k in sweep.varied):
        kx, ky = sweep.varied
        xs = list(dict.fromkeys(p.settings.get(kx) for p in points))
        ys = list(dict.fromkeys(p.settings.get(ky) for p in points))
        varying = [s for s in systems if len({round(statistics.mean(means[(p.name, s)]), 6) for p in points}) > 1]
        shown = varying or systems[-1:]
        fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 3.6), squeeze=False)
        for ax, system in zip(axes[0], shown, strict=True):
            grid = [[math.nan] * len(xs) for _ in ys]
            for p in points:
                vals = means.get((p.name, system))
                if vals:
                    grid[ys.index(p.settings.get(ky))][xs.index(p.settings.get(kx))] = statistics.mean(vals)
            im = ax.imshow(grid, cmap="viridis", origin="lower", aspect="auto")
            for yi, line in enumerate(grid):
                for xi, v in enumerate(line):
                    ax.text(
                        xi, yi, "" if math.isnan(v) else f"{v:.2f}", ha="center", va="center", color="w", fontsize=8
                    )
            ax.set(xticks=range(len(xs)), xticklabels=xs, yticks=range(len(ys)), yticklabels=ys, xlabel=kx, ylabel=ky)
            ax.set_title(f"{system}: {label}")
            fig.colorbar(im, ax=ax)
    else:
        fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(points) + 2), 3.8))
        one_key = len(sweep.varied) == 1
        xs = [str(p.settings.get(sweep.varied[0])) if one_key else p.name for p in points]
        for system in systems:
            vals = [means.get((p.name, system)) for p in points]
            mean = [statistics.mean(v) if v else math.nan for v in vals]
            err = [statistics.stdev(v) if v and len(v) > 1 else 0.0 for v in vals]
            ax.errorbar(range(len(points)), mean, yerr=err, marker="o", capsize=3, label=system)
        ax.set_xticks(range(len(points)), xs, rotation=0 if one_key else 30, ha="center" if one_key else "right")
        ax.set(xlabel=sweep.varied[0] if one_key else "point", ylabel=label, title=f"{sweep.name}: {label}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())
    return out


def write_sweep_report(
    sweep: Sweep, root: Path, rows: list[dict[str, Any]], *, command: str | None, runs: tuple[int, int]
) -> None:
    atomic_write_text(root / "results.csv", _csv(rows))
    image = plot(sweep, rows, root / f"{sweep.plot_metric}.png")
    links = [p for p in root.glob("*/*") if p.is_symlink()]
    computed = len({p.resolve() for p in links})
    lines = [f"# Sweep: {sweep.name}", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += [
        f"Base: `{sweep.base or 'the default experiment'}`; overrides for every point: "
        f"`{' '.join(sweep.overrides) or 'none'}`; seeds: {sweep.seeds}.",
        "",
        f"Runs finished: {runs[0]} of {runs[1]}. Stages used by the runs: {len(links)}, of which {computed} distinct "
        "(the rest were shared between points; the store may also hold stages of other sweeps).",
        "",
        "Metrics are mean ± standard deviation over the seeds (one seed: the score itself). Every run's own table, "
        "with confidence intervals and significance against its baseline row, is in its results.md.",
        "",
        summary_table(sweep, rows),
    ]
    if image is not None:
        lines += [f"![{sweep.plot_metric}]({image.name})", ""]
    lines += [f"Updated {time.strftime('%Y-%m-%d %H:%M:%S')}.", ""]
    atomic_write_text(root / "report.md", "\n".join(lines))
