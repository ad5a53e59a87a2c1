"""Export a results row of a run as a standalone translator folder.

``hf``: a Hugging Face causal LM (LoRA merged into the weights, safetensors) with its tokenizer and chat template.
``ct2``: the same model converted to CTranslate2 (``pip install 'distillmt[ct2]'``), optionally quantized (int8 is
the usual choice on CPU), with the tokenizer files beside it. Either folder holds ``distillmt-export.json`` (what it
is and where it came from) and a README with the row's scores in the run and how to load it;
``distillmt translate --model DIR`` accepts both. The folder is written beside its target and renamed into place when
complete, so a failed export leaves nothing half-written.

What the README and the manifest say about the model comes from the stages that made it: its training stage's
recorded model and KD settings, its translate stage's decoding, and the scores results.json reported for that very
model. The run's config fills in only what no stage records, so a rerun that failed after changing the settings
cannot make the README describe a model that was never trained.
"""

from __future__ import annotations

import copy
import logging
import shutil
from pathlib import Path
from typing import Any

from distillmt.errors import DistillmtError
from distillmt.io import atomic_write_text, read_json, write_json
from distillmt.stages import ATTEMPT_CONFIG, RUN_CONFIG, STAGE_FILE

FORMATS = ("hf", "ct2")
QUANTIZATIONS = ("float32", "int8", "int8_float32", "int8_float16", "int8_bfloat16", "int16", "float16", "bfloat16")
MARKER = "distillmt-export.json"
log = logging.getLogger("distillmt.export")


def exported_format(folder: str | Path) -> str | None:
    """``hf`` or ``ct2`` for a folder written by :func:`export_system`, ``ct2`` for any CTranslate2 model folder,
    else None (a Hugging Face folder, a hub id, ...)."""
    folder = Path(folder)
    marker = folder / MARKER
    if marker.is_file():
        return _manifest(marker).get("format")
    return "ct2" if (folder / "model.bin").is_file() and (folder / "config.json").is_file() else None


def _manifest(marker: Path) -> dict[str, Any]:
    """An export manifest, refused in one line naming it when it is not a JSON object naming a known format: a
    damaged one would otherwise load the folder as the wrong kind of model, or fail with a traceback."""
    hint = "re-export the model, or delete the file if the folder is a plain Hugging Face model"
    try:
        data = read_json(marker)
    except ValueError as e:  # invalid JSON or UTF-8
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise DistillmtError(f"{marker} is damaged (not valid JSON: {reason}): {hint}") from None
    if not isinstance(data, dict):
        raise DistillmtError(f"{marker} is damaged (a JSON {type(data).__name__}, not an object): {hint}")
    if data.get("format") not in FORMATS:
        raise DistillmtError(
            f"{marker} is damaged (format {data.get('format')!r}, not one of {', '.join(FORMATS)}): {hint}"
        )
    return data


def _record(path: Path) -> dict[str, Any] | None:
    """A stage.json or results.json, or None when missing or unreadable (the caller says what that means)."""
    try:
        data = read_json(path)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _run_report(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The config of the run that finished last and its report: results.json (its config and rows), or config.json
    alone for a folder whose run never reported."""
    results = _record(run_dir / "results.json")
    if results is not None and isinstance(results.get("config"), dict) and isinstance(results.get("systems"), dict):
        return results["config"], results
    config = _record(run_dir / RUN_CONFIG)
    if config is not None:
        return config, None
    if (run_dir / ATTEMPT_CONFIG).is_file():
        raise DistillmtError(f"{run_dir}: its run has not finished (no results.json): run the experiment to the end")
    raise DistillmtError(f"{run_dir} is not a run folder (no results.json): give the folder `distillmt run` wrote")


def _overlay_training(run_dir: Path, d: dict[str, Any], side: str, settings: dict[str, Any]) -> None:
    """Write what a training stage recorded (its model section, KD settings, and those of the labels or cache
    stage it read, when that stage is still the one it read) over config dict ``d``."""
    m = settings.get("model") or {}
    section = d[side]
    section.update({k: m[k] for k in ("model", "dtype", "scratch") if k in m})
    if "lora" in m:
        section["lora"] = m["lora"] or {**section.get("lora", {}), "enabled": False}
    if "kd" in settings:
        d["soft_kd"].update(settings["kd"], cache="cache" in settings)
    if isinstance(settings.get("teacher"), dict):
        d["soft_kd"]["teacher"] = settings["teacher"].get("teacher", d["soft_kd"]["teacher"])
    if "gkd" in settings:
        d["gkd"].update(settings["gkd"])
    if "mix_references" in settings:
        d["hard_kd"]["mix_references"] = settings["mix_references"]
    cache = _record(run_dir / "teacher_cache" / STAGE_FILE) if "cache" in settings else None
    if cache is not None and cache.get("key") == settings["cache"]:
        d["soft_kd"]["cache_k"] = cache["settings"].get("k", d["soft_kd"]["cache_k"])
    labels = _record(run_dir / "teacher_labels" / STAGE_FILE) if "labels" in settings else None
    if labels is not None and labels.get("key") == settings["labels"]:
        ls, h = labels.get("settings", {}), d["hard_kd"]
        h.update({k: ls[k] for k in ("num_candidates", "selection") if k in ls})
        h["teacher"] = (ls.get("teacher") or {}).get("teacher", h["teacher"])
        h["decoding"] = {**h["decoding"], **ls.get("decoding", {})}


def _report_key(report: dict[str, Any] | None, stage: str | None) -> Any:
    """The key of ``stage`` as the report recorded it (its timings), or None."""
    return ((report or {}).get("stages") or {}).get(stage, {}).get("key")


def _row_as_made(
    run_dir: Path, base: dict[str, Any], report: dict[str, Any] | None, system: str
) -> tuple[dict[str, Any], dict | None, dict | None]:
    """Config dict ``base`` with what the stages behind row ``system`` recorded written over it; the training
    stage's record (None for a base model used as published); and the report's row when it scored this very model
    (its training stage is still the one the report ran), else None: a failed rerun may have replaced it since."""
    from distillmt import systems

    d, row = copy.deepcopy(base), systems.get(system)
    stage = row.trained_stage(d["teacher"]["model"] == "scratch")
    trained = _record(run_dir / stage / STAGE_FILE) if stage else None
    if stage is not None and trained is None:
        raise DistillmtError(f"{run_dir / stage} is not finished: run the experiment to the end first")
    if trained is not None:
        _overlay_training(run_dir, d, row.side, trained.get("settings", {}))
    reported = report is not None and system in report["systems"]
    if trained is not None and _report_key(report, stage) not in (None, trained.get("key")):  # None: older report
        reported = False
    # The decoding that made the reported scores: the translate stage's record while it is the reported one (a
    # rerun that failed later may have translated again with other settings), else the reported run's config.
    translated = _record(run_dir / f"translate_{system}" / STAGE_FILE) if reported else None
    if translated is not None and _report_key(report, translated.get("stage")) == translated.get("key"):
        made = translated.get("settings", {})
        d["generate"] = {**d["generate"], **made.get("generate", {})}
        if trained is None and "base" in (made.get("model") or {}):
            d[row.side].update(model=made["model"]["base"], dtype=made["model"].get("dtype", d[row.side]["dtype"]))
    return d, trained, report["systems"][system] if reported else None


def _row_config(run_dir: Path, system: str) -> tuple[Any, dict[str, Any] | None, dict | None, bool]:
    """The config that describes row ``system`` as its stages made it, the report's row when it scored this very
    model, the training stage's record, and whether the report shows the row at all."""
    from distillmt.config import ExperimentConfig, from_dict, validate

    base, report = _run_report(run_dir)
    rows = list(report["systems"]) if report is not None else list(base.get("systems") or [])
    if system not in rows:
        raise DistillmtError(f"--system {system} is not a row of {run_dir} (rows: {', '.join(rows)})")
    d, trained, row = _row_as_made(run_dir, base, report, system)
    try:
        cfg = from_dict(ExperimentConfig, d)
        validate(cfg)
    except DistillmtError as e:
        raise DistillmtError(f"{run_dir}: the settings its stages recorded for {system} do not load: {e}") from None
    return cfg, row, trained, report is not None


def _model_line(cfg: Any, system: str, trained: bool) -> str:
    """The network itself: the architecture of a model built from scratch, or the pretrained model it starts from
    and which weights training changed."""
    from distillmt import systems

    side = systems.get(system).side
    m = getattr(cfg, side)
    if m.model == "scratch":
        s = m.scratch
        return (
            f"- Model: built from scratch ({side} architecture), hidden size {s.hidden_size}, {s.num_layers} layer(s), "
            f"{s.num_heads} attention heads ({s.num_kv_heads} key/value), MLP size {s.intermediate_size}."
        )
    if not trained:
        return f"- Model: {m.model} ({m.dtype}), as published."
    how = f"a LoRA adapter (r={m.lora.r}, alpha={m.lora.alpha}) merged into it" if m.lora.enabled else "all weights"
    return f"- Model: {m.model} ({m.dtype}), trained: {how}."


def _readme(
    system: str, fmt: str, quantization: str | None, cfg: Any, row: dict[str, Any] | None, trained: dict | None
) -> str:
    from distillmt.report import describe_system, metric_entries

    lines = [f"# {system}, exported by distillmt", "", f"- What it is: {describe_system(cfg, system)}."]
    lines.append(_model_line(cfg, system, trained is not None))
    lines.append(f"- Format: {fmt}" + (f" (CTranslate2, quantization {quantization})" if fmt == "ct2" else ""))
    if row is None:
        lines.append(
            "- Not scored: results.json holds no scores of this very model (a run that trained it did not finish). "
            "Run the experiment to the end to score it."
        )
    else:
        cells = []
        for entry in metric_entries(row["scores"]).values():
            for column, value in entry["columns"].items():
                cells.append(
                    f"{column} {'n/a' if value is None else format(value, '.' + str(entry['decimals']) + 'f')}"
                )
        n = row["scores"].get("n")
        lines.append(f"- Scores in the run, on its {n} test sentences: {', '.join(cells)}.")
        lines.append(
            f"- Scored with: Hugging Face transformers `generate` on {row['translation'].get('device', 'cpu')}, "
            f"decoding {cfg.generate.num_beams} beam(s), sample={cfg.generate.do_sample}, "
            f"at most {cfg.generate.max_new_tokens} new tokens."
        )
        if fmt == "ct2":
            lines.append(
                "- This CTranslate2 conversion itself was not scored: translate the test set with it and run "
                "`distillmt evaluate` to see what the conversion costs."
            )
    lines += [
        "",
        "## Use",
        "",
        "```bash",
        "distillmt translate --model THIS_FOLDER -i sources.txt -o translations.jsonl",
        "```",
        "",
    ]
    if fmt == "hf":
        lines += [
            "Or with transformers: `AutoModelForCausalLM.from_pretrained(THIS_FOLDER)` and "
            "`AutoTokenizer.from_pretrained(THIS_FOLDER)`; build each prompt as `distillmt.prompts.build_prompt` does "
            "(the tokenizer's chat template when it has one).",
            "",
        ]
    else:
        lines += [
            "Or with CTranslate2: `ctranslate2.Generator(THIS_FOLDER)` and the tokenizer in this folder "
            "(`AutoTokenizer.from_pretrained(THIS_FOLDER)`); prompts as `distillmt.prompts.build_prompt` builds them.",
            "",
        ]
    return "\n".join(lines)


def export_system(
    run_dir: str | Path, system: str, out_dir: str | Path, *, fmt: str = "hf", quantization: str | None = None
) -> Path:
    """Write row ``system`` of the run in ``run_dir`` as a translator folder ``out_dir`` (see the module docstring).
    ``quantization`` (ct2 only; default int8) is one of :data:`QUANTIZATIONS`."""
    import torch

    from distillmt import systems
    from distillmt.pipeline import Models

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if fmt not in FORMATS:
        raise DistillmtError(f"--format {fmt!r} is not one of: {', '.join(FORMATS)}")
    if fmt == "hf" and quantization is not None:
        raise DistillmtError("--quantization applies to --format ct2 only")
    quantization = quantization or ("int8" if fmt == "ct2" else None)
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise DistillmtError(f"--quantization {quantization!r} is not one of: {', '.join(QUANTIZATIONS)}")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DistillmtError(f"-o {out_dir} already exists and is not an empty folder: choose another")
    cfg, row, trained, shown = _row_config(run_dir, system)
    if fmt == "ct2":
        try:
            import ctranslate2  # noqa: F401
        except ImportError:
            raise DistillmtError("--format ct2 needs CTranslate2: pip install 'distillmt[ct2]'") from None
    if row is None and shown:
        log.warning("%s: results.json scored an earlier model of %s; the README says this one was not scored",
                    run_dir, system)  # fmt: skip

    models = Models(cfg, run_dir, torch.device("cpu"), keys={})
    tokenizer, model = models.tokenizer(), models.load_system(systems.get(system))
    tmp = out_dir.parent / f".{out_dir.name}.export-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if fmt == "ct2":
            from distillmt.generate import convert_to_ct2

            convert_to_ct2(model, tokenizer, tmp, quantization)
        else:
            model.save_pretrained(str(tmp), safe_serialization=True)
            tokenizer.save_pretrained(str(tmp))
        marker = {"format": fmt, "quantization": quantization, "system": system, "run": str(run_dir.resolve())}
        marker.update(model=getattr(cfg, systems.get(system).side).model, scores=(row or {}).get("scores"))
        marker["stage"] = None if trained is None else {"name": trained.get("stage"), "key": trained.get("key")}
        marker["decoding"] = cfg.generate.output_settings() if row is not None else None
        write_json(tmp / MARKER, marker)
        atomic_write_text(tmp / "README.md", _readme(system, fmt, quantization, cfg, row, trained))
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def folder_size(folder: str | Path) -> int:
    """Bytes on disk of every file in ``folder``."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
