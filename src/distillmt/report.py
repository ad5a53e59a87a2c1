"""The results table: one row per system, written as results.md (with plots) and results.json in the run folder.

The metric columns and signature lines come from the metric entries in each row's scores (see
``distillmt.metrics``): a new metric needs no change here. Rows scored on different sentences are refused.

With significance data (``report["significance"]``, from :func:`distillmt.stats.compare_to_baseline`) each tested
metric's score cell also shows its 95% CI, ``9.80† (9.10–10.52)``, with ``†`` when the row differs from the baseline
at p < 0.05, and one column lists the p-values against the baseline; a legend under the table names the baseline,
the test and the seed. Without it (old run folders, ``eval.baseline=none``) the table is the plain one.

Plots (``plots/`` in the run folder, embedded in results.md with a caption each; drawn by :mod:`distillmt.plots`):
``scores_<metric>.png``, a bar per system with its 95% CI (hatched: the baseline row), one per measured metric;
``training_<stage>.png``, the curves of each training stage's ``metrics.jsonl`` (loss, CE, the KD term where there is
one, validation CE) against the optimizer step. ``distillmt report RUN_FOLDER`` rebuilds results.md and the plots from
results.json and the stage folders.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distillmt import systems
from distillmt.errors import DistillmtError
from distillmt.io import atomic_write_text, read_json, write_json
from distillmt.metrics import METRICS, metric_entries
from distillmt.plots import (
    SIGNIFICANT,
    draw_plots,
    embed_plots,
    metric_layout,
    run_plots,
    score_column,
    significance_record,
    significance_results,
)

if TYPE_CHECKING:
    from distillmt.config import ExperimentConfig
    from distillmt.sections import TrainConfig

PLOTS_FOLDER = "plots"


def _fmt(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _params(n: int | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


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


def _tested_columns(report: dict[str, Any], sig: dict[str, Any] | None) -> dict[str, str]:
    """Metric key -> its score column, for the metrics of the table that the significance data covers."""
    if sig is None:
        return {}
    covered = {key for row in sig["systems"].values() for key in row}
    layout = metric_layout(report)
    return {key: score_column(report, key, first) for key, first in layout.items() if key in covered}


def _p_cell(system: str, sig: dict[str, Any], tested: dict[str, str]) -> str:
    if system == sig.get("baseline"):
        return "baseline"
    records = sig["systems"].get(system, {})
    return " / ".join(_fmt(records.get(key, {}).get("p_value"), ".4f") for key in tested)


def _on_sentence_scores(key: str) -> bool:
    """Whether the significance test resampled this metric's sentence scores rather than ran sacrebleu's test:
    ``stats`` gives sacrebleu only corpus-level metrics, so a metric ``METRICS`` does not know came with its
    sentence scores."""
    metric = METRICS.get(key)
    return metric is None or metric.sentence_mean


def _legend(sig: dict[str, Any], tested: dict[str, str]) -> list[str]:
    n, seed = sig.get("n_samples"), sig.get("seed")
    own = [column for key, column in tested.items() if _on_sentence_scores(key)]
    sacre = [column for key, column in tested.items() if not _on_sentence_scores(key)]
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
    layout = metric_layout(report)
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
    for key, first in metric_layout(report).items():
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
        f"{m['device']}, {m['cpus']} CPUs ({m.get('cpu', 'model not recorded')}), torch {m['torch']}, {m['platform']}.",
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
# Row descriptions ("## Systems")


def _soft_loss(s: Any) -> str:
    """The soft-label loss as a formula: token by token, or ULD between tokenizers."""
    if s.cross_tokenizer == "uld":
        return f"CE+{s.uld_weight:g}*ULD (cross-tokenizer)"
    return f"{s.alpha}*CE+{1 - s.alpha:g}*T^2*{s.divergence}"


def describe_system(cfg: ExperimentConfig, name: str) -> str:
    """One line saying what a row is: the model and how it was trained (its KD settings for the KD rows, and where
    a KD row's student started when not fresh)."""
    if name not in systems.BY_NAME:
        raise DistillmtError(f"unknown system {name!r}; known: {', '.join(systems.NAMES)}")
    system = systems.get(name)
    section = system.init_from
    init = getattr(cfg, section).init_from if section else "none"
    line = _describe(cfg, name)
    if init != "none":
        line += f"; starting from {init} (train_student's model), a fresh optimizer and schedule"
    if not system.base or cfg.teacher.model == "scratch":  # a trained row
        line += _selection(cfg.train_teacher if system.side == "teacher" else cfg.train_student)
    return line


def _selection(t: TrainConfig) -> str:
    """How a trained row's weights were chosen, when not by the default rule (the line is unchanged otherwise)."""
    if not t.keep_best or (t.select_by == "valid_ce" and not t.patience):
        return ""
    what = {"valid_ce": "lowest validation CE", "valid_chrf": "highest validation chrF"}[t.select_by]
    stop = f", stopped once the best was {t.patience} validations behind" if t.patience else ""
    return f"; the weights of its {what}{stop}"


def _describe(cfg: ExperimentConfig, name: str) -> str:
    if name == "SFT_MORE":
        start = "STUDENT" if cfg.teacher.model == "scratch" else "STUDENT_PEFT"
        t = cfg.train_student.phase2()
        return (
            f"{start} (train_student's model) fine-tuned on the references for {'up to ' if t.patience else ''}"
            f"{t.max_steps} more steps (a fresh "
            "optimizer and schedule): the equal-compute baseline of the KD rows that start from it"
        )
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
            f"{s.teacher} teacher, loss={_soft_loss(s)}, T={s.temperature}"
            + (f", beta={s.beta}" if s.divergence in ("jsd", "skew_kl") and s.cross_tokenizer != "uld" else "")
            + (f", top-{s.cache_k} cache" if s.cache else "")
        )
    if name == "GKD":
        g, s = cfg.gkd, cfg.gkd.objective(cfg.soft_kd)
        own = g.divergence != "soft_kd" or g.beta is not None  # (the line of a GKD without them is unchanged)
        beta = f" beta={s.beta}" if own and s.divergence in ("jsd", "skew_kl") else ""
        return f"on-policy lambda={cfg.gkd.lmbda}, {s.divergence}{beta}, T={s.temperature}"
    if name == "HLKD+SLKD":
        s = cfg.soft_kd
        return (
            f"labels from the {cfg.hard_kd.teacher} teacher (as HLKD), trained with "
            f"{_soft_loss(s)} against the live {s.teacher} teacher, T={s.temperature}"
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
