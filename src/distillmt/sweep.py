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
    plot_metric: chrf                # the metric the plots show: a key of distillmt.metrics.METRICS

Each point × seed is a run folder ``<output_dir>/<name>/<point>-seed<k>/`` whose stage folders are links into one
stage store, ``<output_dir>/stages/<stage>-<key>/``, shared by every sweep under that output folder: a stage whose
key is the same in two points, or in two sweeps (the teacher's training, its labels, its logit cache), is computed
once and reused. A rerun skips finished points (each
stage is checked as in any run) and an interrupted sweep resumes where it stopped.

The sweep folder holds ``results.csv`` (one row per point, seed and system), ``sweep.json`` (the sweep's spec: name,
base, overrides, points, seeds, varied keys, plot metric, command), ``report.md`` and the plots of ``plot_metric``:
for a full grid over two keys ``<metric>_lines.png`` (the metric against the first key, one line per value of the
second, a panel per KD system) and ``<metric>_heatmap.png``; for one numeric key ``<metric>_lines.png`` (a line per
system with a band: ± one standard deviation over the seeds, or the 95% CI with one seed; log-scale x past a factor
of 10); otherwise ``<metric>_bars.png`` (bars per point). ``distillmt report SWEEP_FOLDER`` rebuilds report.md and
the plots from results.csv and sweep.json.
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
from distillmt.io import atomic_write_text, read_jsonl
from distillmt.metrics import CHRF_METRIC, METRICS, metric_entries, sentence_scores
from distillmt.plots import draw_plots, embed_plots, is_number, significance_record, sweep_plot_files, sweep_plots

log = logging.getLogger("distillmt.sweep")

SWEEP_KEYS = ("name", "base", "overrides", "grid", "points", "seeds", "plot_metric")
PLOT_METRIC = CHRF_METRIC.key  # when a sweep file names none


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
    plot_metric: str = PLOT_METRIC
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
    plot_metric = data.get("plot_metric", PLOT_METRIC)
    if plot_metric not in METRICS:
        raise DistillmtError(f"{path}: 'plot_metric' must be one of {', '.join(METRICS)}, got {plot_metric!r}")
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
    stages = report["stages"]
    compute = sum(t.get("seconds") or 0.0 for t in stages.values())
    out = []
    for system, r in report["systems"].items():
        row: dict[str, Any] = {"point": point.name, "seed": seed}
        row.update({k: point.settings.get(k) for k in sweep.varied})
        row["system"] = system
        for key, entry in metric_entries(r["scores"]).items():
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


def _decimals(metric: str) -> int:
    return METRICS[metric].decimals if metric in METRICS else 2


def _mean_std(values: list[float], metric: str = PLOT_METRIC) -> str:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "n/a"
    decimals = _decimals(metric)
    if len(values) == 1:
        return f"{values[0]:.{decimals}f}"
    return f"{statistics.mean(values):.{decimals}f} ± {statistics.stdev(values):.{decimals}f}"


def _metric_cell(group: list[dict[str, Any]], metric: str) -> str:
    """mean ± sd over the seeds (one seed: the score and its 95% CI), then † when the row differed from its run's
    baseline at p < 0.05 in every seed tested, †k/n when in k of n."""
    text = _mean_std([g.get(metric) for g in group], metric)
    tested = [g[f"{metric}_p_value"] for g in group if is_number(g.get(f"{metric}_p_value"))]
    significant = sum(1 for p in tested if p < 0.05)
    if tested and significant == len(tested):
        text += "†"
    elif significant:
        text += f"†{significant}/{len(tested)}"
    lo, hi = group[0].get(f"{metric}_ci_low"), group[0].get(f"{metric}_ci_high")
    if len(group) == 1 and is_number(lo) and is_number(hi):
        decimals = _decimals(metric)
        text += f" ({lo:.{decimals}f}–{hi:.{decimals}f})"
    return text


def summary_table(sweep: Sweep, rows: list[dict[str, Any]]) -> str:
    """Markdown: one line per point and system, each metric as mean ± standard deviation over the seeds (one seed:
    the score with its 95% CI), marked where it differs significantly from the run's baseline row."""
    metrics = [m for m in METRICS if any(m in r for r in rows)]
    header = ["point", *sweep.varied, "system", *metrics, "seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["point"], r["system"]), []).append(r)
    for (point, system), group in groups.items():
        first = group[0]
        cells = [point, *["–" if first.get(k) is None else str(first.get(k)) for k in sweep.varied], system]
        cells += [_metric_cell(group, m) for m in metrics]
        cells.append(str(len(group)))
        lines.append("| " + " | ".join(cells) + " |")
    legend = (
        "\nCells: mean ± standard deviation over the seeds (one seed: the score and its 95% CI); † = differs from "
        "the run's baseline row (eval.baseline) at p < 0.05 by paired bootstrap in every seed, †k/n = in k of n "
        "seeds.\n"
    )
    return "\n".join(lines) + "\n" + legend


# ---------------------------------------------------------------------------------------------------------------------
# The sweep folder: results.csv, sweep.json, report.md and the plots

SWEEP_FILE = "sweep.json"


def sweep_spec(sweep: Sweep, command: str | None = None) -> dict[str, Any]:
    """What sweep.json holds: enough to rebuild the report (``distillmt report SWEEP_FOLDER``) without the YAML."""
    return {
        "name": sweep.name,
        "base": sweep.base,
        "overrides": sweep.overrides,
        "points": [{"name": p.name, "settings": p.settings} for p in sweep.points],
        "seeds": sweep.seeds,
        "varied": sweep.varied,
        "plot_metric": sweep.plot_metric,
        "command": command,
    }


def sweep_from_spec(spec: dict[str, Any]) -> Sweep:
    points = [Point(p["name"], dict(p["settings"])) for p in spec["points"]]
    return Sweep(
        spec["name"], spec.get("base"), list(spec.get("overrides") or []), points, list(spec["seeds"]),
        spec.get("plot_metric", PLOT_METRIC), list(spec.get("varied") or []),
    )  # fmt: skip


def _cell(text: str) -> Any:
    if text == "":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def read_results_csv(path: Path) -> list[dict[str, Any]]:
    """The rows of a sweep's results.csv, numbers as numbers and empty cells as None."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = [{k: _cell(v or "") for k, v in r.items()} for r in csv.DictReader(f)]
    if rows and not {"point", "seed", "system"} <= set(rows[0]):
        raise DistillmtError(f"{path}: not a sweep's results.csv (needs the columns point, seed, system)")
    return rows


def rewrite_sweep_report(root: str | Path) -> Path:
    """``distillmt report SWEEP_FOLDER``: report.md and the plots again, from results.csv and sweep.json."""
    root = Path(root)
    rows = read_results_csv(root / "results.csv")
    if not rows:  # a report of nothing would look like a sweep whose every point failed
        raise DistillmtError(
            f"{root / 'results.csv'} has no rows yet: no run of the sweep has finished; run its sweep file with "
            "`distillmt sweep` (finished runs are skipped), which writes the report"
        )
    spec_path = root / SWEEP_FILE
    if not spec_path.is_file():
        raise DistillmtError(
            f"{root} has results.csv but no {SWEEP_FILE}: run its sweep file again with `distillmt sweep` "
            "(finished runs are skipped), which writes both"
        )
    try:
        spec = json.loads(spec_path.read_text(encoding="utf-8"))
        sweep = sweep_from_spec(spec)
    except (ValueError, KeyError, TypeError) as e:
        raise DistillmtError(f"{spec_path}: not a sweep spec ({type(e).__name__}: {e})") from None
    command = spec.get("command")
    by_name = {p.name: p for p in sweep.points}
    for r in rows:  # the settings as the sweep gave them (typed), not as the CSV spelled them
        if r["point"] in by_name:
            r.update({k: by_name[r["point"]].settings.get(k) for k in sweep.varied})
    finished = len({(r["point"], r["seed"]) for r in rows})
    return render_sweep_report(
        sweep, root, rows, command=command, runs=(finished, len(sweep.points) * len(sweep.seeds))
    )


def write_sweep_report(
    sweep: Sweep, root: Path, rows: list[dict[str, Any]], *, command: str | None, runs: tuple[int, int]
) -> None:
    """results.csv, sweep.json (when missing or changed) and :func:`render_sweep_report`."""
    atomic_write_text(root / "results.csv", _csv(rows))
    spec = json.dumps(sweep_spec(sweep, command), ensure_ascii=False, indent=2) + "\n"
    spec_path = root / SWEEP_FILE
    if not spec_path.is_file() or spec_path.read_text(encoding="utf-8") != spec:
        atomic_write_text(spec_path, spec)
    render_sweep_report(sweep, root, rows, command=command, runs=runs)


def _sentence_scores(files: dict[str, Path]) -> dict[str, dict[str, list[float] | None]]:
    """Metric key -> point -> its sentence scores, for the metrics whose score is the mean of their sentence scores
    (the bootstrap resamples those; ``stats`` tests the others itself); None for a point that lacks them."""
    if not all(f.is_file() for f in files.values()):
        return {}
    return sentence_scores({point: read_jsonl(f) for point, f in files.items()})


def winners(sweep: Sweep, root: Path, rows: list[dict[str, Any]]) -> list[str]:
    """Markdown lines: for each system whose plot metric changes between points, the best point (by its mean over
    seeds) against the runner-up, by paired bootstrap on the same test sentences, seed by seed (each seed draws its
    own split). Points whose run folders are gone are left out."""
    from distillmt.stats import compare_to_baseline

    metric, out = sweep.plot_metric, []
    means: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        if is_number(r.get(metric)):
            means.setdefault(r["system"], {}).setdefault(r["point"], []).append(r[metric])
    for system, by_point in means.items():
        ranked = sorted(by_point, key=lambda p: -statistics.mean(by_point[p]))
        if len(ranked) < 2 or statistics.mean(by_point[ranked[0]]) == statistics.mean(by_point[ranked[-1]]):
            continue  # the system does not depend on the swept settings (e.g. the baseline row)
        best, second, verdicts = ranked[0], ranked[1], []
        for seed in sweep.seeds:
            runs = [root / f"{p}-seed{seed}" for p in (best, second)]
            files = [run / f"translate_{system}" / "translations.jsonl" for run in runs]
            sentences = [run / f"evaluate_{system}" / "sentences.jsonl" for run in runs]
            if not all(f.is_file() for f in files):
                continue
            a, b = (read_jsonl(f) for f in files)
            scores = _sentence_scores(dict(zip((best, second), sentences, strict=True)))
            test = compare_to_baseline({best: [x["hyp"] for x in a], second: [x["hyp"] for x in b]},
                                       [x["ref"] for x in a], second, sentence_scores=scores)  # fmt: skip
            record = test["systems"][best].get(metric)
            if record is not None:
                verdicts.append(f"seed {seed}: p = {record['p_value']:.4f}")
        gap = statistics.mean(by_point[best]) - statistics.mean(by_point[second])
        significant = verdicts and all(float(v.split("= ")[1]) < 0.05 for v in verdicts)
        out.append(
            f"- **{system}**: best {best} ({_mean_std(by_point[best], metric)}), runner-up {second} "
            f"({_mean_std(by_point[second], metric)}), +{gap:.2f} {metric}; paired bootstrap best vs runner-up: "
            + ("; ".join(verdicts) or "not tested (run folders or per-sentence scores missing)")
            + (
                " (significant in every seed)"
                if significant
                else " (not significant in every seed)"
                if verdicts
                else ""
            )
            + "."
        )
    return out


def render_sweep_report(
    sweep: Sweep, root: Path, rows: list[dict[str, Any]], *, command: str | None, runs: tuple[int, int]
) -> Path:
    """The plots and report.md (the table, then each plot with its caption). Returns the path of report.md."""
    plots = draw_plots(sweep_plots(sweep, rows), root)
    drawn = {path for path, _ in plots if path}
    for stale in sweep_plot_files():
        if stale not in drawn:  # a plot of an earlier state of the sweep (e.g. bars while one point was done)
            (root / stale).unlink(missing_ok=True)
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
    best = winners(sweep, root, rows)
    if best:
        lines += [f"## Which setting won ({sweep.plot_metric})", "", *best, ""]
    if plots:
        lines += embed_plots(plots)
    lines += [f"Updated {time.strftime('%Y-%m-%d %H:%M:%S')}.", ""]
    atomic_write_text(root / "report.md", "\n".join(lines))
    return root / "report.md"
