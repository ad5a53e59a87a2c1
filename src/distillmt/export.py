"""Export a results row of a run as a standalone translator folder.

``hf``: a Hugging Face causal LM (LoRA merged into the weights, safetensors) with its tokenizer and chat template,
in the dtype its row was scored in, the row's decoding in generation_config.json. ``ct2``: the same model converted
to CTranslate2 (``pip install 'distillmt[ct2]'``), optionally quantized (int8 is the usual choice on CPU), with the
tokenizer files beside it. Either folder holds ``distillmt-export.json`` (what it is, where it came from, and under
``translate`` the dtype, engine, decoding settings and seed its row was scored with), a README with the row's scores
in the run and how to load it, and ``scored.jsonl``, the test sentences those scores are of with the run's
translations. ``distillmt translate --model DIR`` accepts both and translates with the recorded settings unless told
otherwise (:func:`recorded_translation`). The folder is written beside its target and renamed into place when
complete, so a failed export leaves nothing half-written.

What the README and the manifest say about the model comes from the stages that made it: its training stage's
recorded model and KD settings, its translate stage's decoding, and the scores results.json reported for that very
model. The run's config fills in only what no stage records, so a rerun that failed after changing the settings
cannot make the README describe a model that was never trained.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import shlex
import shutil
from pathlib import Path
from typing import Any

from distillmt.errors import DistillmtError
from distillmt.io import atomic_write_text, read_json, write_json
from distillmt.stages import ATTEMPT_CONFIG, RUN_CONFIG, STAGE_FILE

FORMATS = ("hf", "ct2")
QUANTIZATIONS = ("float32", "int8", "int8_float32", "int8_float16", "int8_bfloat16", "int16", "float16", "bfloat16")
MARKER = "distillmt-export.json"
SCORED = "scored.jsonl"  # the test sentences with their references and the run's translations
TORCH_DTYPES = ("float32", "bfloat16", "float16")
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


def engine_dtype(engine: Any) -> str | None:
    """The torch dtype in an engine as a translate stage records it (``hf float32``, ``vllm bfloat16 + LoRA``), or
    None where it names none (``ct2 int8``: CTranslate2's quantization, not the weights' dtype; an older record)."""
    words = engine.split() if isinstance(engine, str) else []
    if len(words) >= 2 and words[0] in ("hf", "vllm") and words[1] in TORCH_DTYPES:
        return words[1]
    return None


def _report_key(report: dict[str, Any] | None, stage: str | None) -> Any:
    """The key of ``stage`` as the report recorded it (its timings), or None."""
    return ((report or {}).get("stages") or {}).get(stage, {}).get("key")


def _row_as_made(
    run_dir: Path, base: dict[str, Any], report: dict[str, Any] | None, system: str
) -> tuple[dict[str, Any], dict | None, dict | None, dict | None]:
    """Config dict ``base`` with what the stages behind row ``system`` recorded written over it; the training
    stage's record (None for a base model used as published); the report's row when it scored this very model
    (its training stage is still the one the report ran), else None: a failed rerun may have replaced it since; and
    the translate stage's record when it is the one the report scored, else None."""
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
    else:
        translated = None
    scored = report["systems"][system] if reported else None
    # The precision it was scored in, not the config's "auto": the export holds (and translates) those weights.
    dtype = engine_dtype(((scored or {}).get("translation") or {}).get("engine"))
    if dtype is not None:
        d[row.side]["dtype"] = dtype
    return d, trained, scored, translated


def _row_config(run_dir: Path, system: str) -> tuple[Any, dict[str, Any] | None, dict | None, bool, dict | None]:
    """The config that describes row ``system`` as its stages made it, the report's row when it scored this very
    model, the training stage's record, whether the report shows the row at all, and the translate stage's record
    when it made the reported scores."""
    from distillmt.config import ExperimentConfig, from_dict, validate

    base, report = _run_report(run_dir)
    rows = list(report["systems"]) if report is not None else list(base.get("systems") or [])
    if system not in rows:
        raise DistillmtError(f"--system {system} is not a row of {run_dir} (rows: {', '.join(rows)})")
    d, trained, row, translated = _row_as_made(run_dir, base, report, system)
    try:
        cfg = from_dict(ExperimentConfig, d)
        validate(cfg)
    except DistillmtError as e:
        raise DistillmtError(f"{run_dir}: the settings its stages recorded for {system} do not load: {e}") from None
    return cfg, row, trained, report is not None, translated


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
        g = cfg.generate
        lines.append(
            f"- Scored with: {_engine_words(row['translation'].get('engine'))} on "
            f"{row['translation'].get('device', 'cpu')}, batches of {g.batch_size}, decoding {g.num_beams} beam(s), "
            f"sample={g.do_sample}, at most {g.max_new_tokens} new tokens."
        )
        if fmt == "ct2":
            lines.append(
                "- This CTranslate2 conversion itself was not scored: translate the test set with it and run "
                "`distillmt evaluate` to see what the conversion costs."
            )
    return "\n".join(lines) + "\n"


def _engine_words(engine: Any) -> str:
    """A recorded engine (``hf float32``, ``ct2 int8``, ``vllm bfloat16 + LoRA``) in words."""
    words = engine.split(" ", 1) if isinstance(engine, str) else []
    names = {"hf": "Hugging Face transformers `generate`", "ct2": "CTranslate2", "vllm": "vLLM"}
    if len(words) == 2 and words[0] in names:
        return f"{names[words[0]]} in {words[1]}"
    return "Hugging Face transformers `generate`"  # reports older than the recorded engine: transformers alone


def _readme_use(fmt: str, cfg: Any, section: dict[str, Any], scored: bool, tokenizer: Any) -> str:
    """The README's use and check sections: the command, the settings it takes from the manifest, and commands that
    translate the scored test sentences again and score them."""
    from distillmt.models import GENERIC_TOKENIZERS
    from distillmt.prompts import has_chat_template

    # Beside a Qwen2 config.json, AutoTokenizer would load a tokenizer distillmt trained as Qwen2's own, whose
    # pre-tokenizer differs (see distillmt.models.load_tokenizer); a CTranslate2 folder's config.json names no model.
    generic = fmt == "hf" and type(tokenizer).__name__ in GENERIC_TOKENIZERS
    load = f"{'PreTrainedTokenizerFast' if generic else 'AutoTokenizer'}.from_pretrained(THIS_FOLDER)"
    why = " (AutoTokenizer would load it as Qwen2's own tokenizer, which splits numbers differently)" if generic else ""
    use = "distillmt translate --model THIS_FOLDER -i sources.txt -o translations.jsonl"
    lines = ["", "## Use", "", "```bash", use, "```", ""]
    chat = has_chat_template(tokenizer)
    words = json.dumps(section["prompt"]["chat" if chat else "plain"], ensure_ascii=False)
    lines += [
        f"Each source goes into the prompt it was trained with, which `{MARKER}` records under `translate.prompt`: "
        f"{'inside the chat template, the user message' if chat else 'the text'} `{words}` with the source in place "
        "of `{text}`.",
        "",
    ]
    if "batch_size" in section:
        g, precision = cfg.generate, "" if fmt == "ct2" else f"in {section['dtype']}, "
        lines += [
            f"It decodes with the settings the row was scored with ({precision}batches of {g.batch_size}, "
            f"{g.num_beams} beam(s), sample={g.do_sample}, at most {g.max_new_tokens} new tokens), which `{MARKER}` "
            "records under `translate`; a flag (`--dtype`, `--batch-size`, `--num-beams`, `--max-new-tokens`, ...) "
            "overrides one.",
            "",
        ]
    if fmt == "hf":
        lines += [
            f"Or with transformers: `AutoModelForCausalLM.from_pretrained(THIS_FOLDER)` and `{load}`{why}; build each "
            "prompt as `distillmt.prompts.build_prompt` does (the tokenizer's chat template when it has one). "
            "`generate` reads the decoding settings from `generation_config.json`; load the model in the dtype above.",
            "",
        ]
    else:
        lines += [
            "Or with CTranslate2: `ctranslate2.Generator(THIS_FOLDER)` and the tokenizer in this folder "
            f"(`{load}`{why}); prompts as `distillmt.prompts.build_prompt` builds them.",
            "",
        ]
    if scored:
        lines += _readme_check(fmt, cfg)
    return "\n".join(lines)


def _readme_check(fmt: str, cfg: Any) -> list[str]:
    e = cfg.eval
    metrics = ["--tgt-lang", cfg.data.tgt_lang, "--bleu-tokenize", e.bleu_tokenize]
    if e.bertscore:
        metrics += ["--bertscore-model", e.bertscore_model, "--bertscore-layer", str(e.bertscore_layer)]
    else:
        metrics.append("--no-bertscore")
    lines = [
        "## Check the scores",
        "",
        f"`{SCORED}` holds the test sentences with their references and the translations the scores above are of. "
        "Run as written, these commands translate them again and score the result:",
        "",
        "```bash",
        f"distillmt translate --model THIS_FOLDER -i THIS_FOLDER/{SCORED} -o translations.jsonl",
        f"distillmt evaluate --hyp translations.jsonl {shlex.join(metrics)}",
        "```",
        "",
    ]
    if fmt == "ct2":
        return [*lines, "They score this conversion: the scores above are those of the model before it.", ""]
    return [
        *lines,
        "They give the same translations and scores on the kind of machine the run used (the same CPU model or GPU, "
        "and the same torch and transformers versions). What can still differ elsewhere: a floating-point rounding "
        "that another kernel does differently can flip a near-tie between two tokens, and the sentence after it. "
        "Translating other sentences, or these in another order, has the same effect within this machine: each "
        "batch is padded to its longest prompt, and the prompt start that every input shares is computed once, so "
        "a sentence's batch and that shared start change with the input.",
        "",
    ]


def _translate_section(cfg: Any, row: dict[str, Any] | None, weights: str) -> dict[str, Any]:
    """The manifest's ``translate`` section, which `distillmt translate --model DIR` uses unless told otherwise: how
    the row was translated when it was scored (the dtype, the engine and every decoding setting, the seed, the engine
    with its precision as recorded); an export that was not scored records its weights' dtype alone."""
    from distillmt.prompts import make_prompt

    prompt = dataclasses.asdict(make_prompt(cfg.prompt, cfg.data.src_lang, cfg.data.tgt_lang))
    if row is None:
        return {"dtype": weights, "prompt": prompt}
    engine = (row.get("translation") or {}).get("engine")
    section = {"dtype": engine_dtype(engine) or weights, **cfg.generate.output_settings(), "seed": cfg.seed}
    return {**section, "prompt": prompt, "scored_with": engine}


def _set_generation_config(model: Any, tokenizer: Any, g: Any) -> None:
    """The row's decoding in the model's generation config, which ``save_pretrained`` writes to
    generation_config.json and transformers' ``generate`` reads. What it held already stays (a pretrained model's
    own repetition penalty, say, shaped the run's translations too), except what this decoding does not use, which
    the saved file may not hold (transformers refuses, e.g., a temperature without sampling)."""
    from distillmt.prompts import end_token_id

    stop = sorted({end_token_id(tokenizer), tokenizer.eos_token_id} - {None})
    gc = model.generation_config
    gc.max_new_tokens, gc.num_beams, gc.do_sample = g.max_new_tokens, g.num_beams, g.do_sample
    gc.eos_token_id, gc.pad_token_id = stop if len(stop) > 1 else stop[0], tokenizer.pad_token_id
    gc.length_penalty = g.length_penalty if g.num_beams > 1 else None
    sampled = {"temperature": g.temperature, "top_k": g.top_k, "top_p": g.top_p}
    for key, value in sampled.items():
        setattr(gc, key, value if g.do_sample else None)


def _write_scored(stage: Path, out: Path, row: dict[str, Any]) -> bool:
    """The translate stage's translations (src, ref, hyp) into ``out`` when they are the ones the row's scores are of
    (same count, same references); whether written."""
    from distillmt.io import read_jsonl, write_jsonl
    from distillmt.metrics import refs_sha256

    try:
        rows = read_jsonl(stage / "translations.jsonl")
    except (OSError, ValueError):
        return False
    scores = row.get("scores") or {}
    if len(rows) != scores.get("n") or refs_sha256([r.get("ref") or "" for r in rows]) != scores.get("refs_sha256"):
        return False
    write_jsonl(out, [{"src": r["src"], "ref": r["ref"], "hyp": r["hyp"]} for r in rows])
    return True


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
    cfg, row, trained, shown, translated = _row_config(run_dir, system)
    if fmt == "ct2":
        try:
            import ctranslate2  # noqa: F401
        except ImportError:
            raise DistillmtError("--format ct2 needs CTranslate2: pip install 'distillmt[ct2]'") from None
    if row is None and shown:
        log.warning("%s: results.json scored an earlier model of %s; the README says this one was not scored",
                    run_dir, system)  # fmt: skip

    models = Models(cfg, run_dir, torch.device("cpu"), keys={})
    made_by = systems.get(system)
    tokenizer, model = models.tokenizer(made_by.side), models.load_system(made_by)
    section = _translate_section(cfg, row, str(next(model.parameters()).dtype).removeprefix("torch."))
    tmp = out_dir.parent / f".{out_dir.name}.export-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if fmt == "ct2":
            from distillmt.generate import convert_to_ct2

            convert_to_ct2(model, tokenizer, tmp, quantization)
        else:
            if row is not None:
                _set_generation_config(model, tokenizer, cfg.generate)
            model.save_pretrained(str(tmp), safe_serialization=True)
            tokenizer.save_pretrained(str(tmp))
        scored = translated is not None and _write_scored(run_dir / translated["stage"], tmp / SCORED, row)
        marker = {"format": fmt, "quantization": quantization, "system": system, "run": str(run_dir.resolve())}
        marker.update(model=getattr(cfg, systems.get(system).side).model, scores=(row or {}).get("scores"))
        marker["stage"] = None if trained is None else {"name": trained.get("stage"), "key": trained.get("key")}
        marker["decoding"] = cfg.generate.output_settings() if row is not None else None
        marker["translate"] = section
        write_json(tmp / MARKER, marker)
        readme = _readme(system, fmt, quantization, cfg, row, trained) + _readme_use(
            fmt, cfg, section, scored, tokenizer
        )
        atomic_write_text(tmp / "README.md", readme)
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


def recorded_translation(model: str | Path) -> tuple[dict[str, Any] | None, str]:
    """How ``model`` (a folder) was translated when it was scored, for `distillmt translate`: an export's
    ``translate`` section (its ``decoding`` in exports older than that section), or, for a training stage's model
    folder inside a run folder (``runs/NAME/train_x/model``), what the translate stage(s) that translated this very
    model recorded. Returns ``({"generate": {...}, "dtype", "seed", "scored_with"}, where)``, each key present only
    where recorded, and ``where`` naming the record in words; ``(None, why)`` where rows translated it with different
    settings; ``(None, "")`` where nothing records it."""
    folder = Path(model)
    if (folder / MARKER).is_file():
        manifest = _manifest(folder / MARKER)
        section = manifest.get("translate") or manifest.get("decoding")
        return (_checked(section, folder / MARKER), "the export's settings") if section else (None, "")
    return _stage_translation(folder.absolute())


def _stage_translation(folder: Path) -> tuple[dict[str, Any] | None, str]:
    """:func:`recorded_translation` for a training stage's model folder: the translate stages whose recorded model is
    this stage at its current key (an older one translated an earlier model)."""
    stage_dir, run_dir = folder.parent, folder.parent.parent
    trained = _record(stage_dir / STAGE_FILE) if folder.name == "model" else None
    if trained is None or trained.get("stage") != stage_dir.name:
        return None, ""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(run_dir.glob(f"translate_*/{STAGE_FILE}")):
        record = _record(path)
        settings = (record or {}).get("settings") or {}
        if settings.get("model") == {"stage": stage_dir.name, "key": trained.get("key")}:
            result = record.get("result") or {}
            section = {**(settings.get("generate") or {}), "seed": settings.get("seed"), "dtype": None}
            section["prompt"] = settings.get("prompt")  # absent: the default prompt (not keyed)
            section.update(dtype=engine_dtype(result.get("engine")), scored_with=result.get("engine"))
            found[path.parent.name] = _checked({k: v for k, v in section.items() if v is not None}, path)
    if not found:
        return None, ""
    names = " and ".join(f"{run_dir.name}/{name}" for name in found)
    if any(s != next(iter(found.values())) for s in found.values()):
        return None, f"{names} translated this model with different settings: using the defaults"
    return next(iter(found.values())), f"the settings {names} recorded"


def _checked(section: Any, source: Path) -> dict[str, Any]:
    """A recorded ``translate`` section as :func:`recorded_translation` returns it, refused in one line naming
    ``source`` where a value is not one translate takes (a damaged or hand-edited file)."""
    import dataclasses

    from distillmt.config import from_dict
    from distillmt.sections import GenerateConfig, check_section

    if not isinstance(section, dict):
        raise DistillmtError(f"{source}: its translate settings are not a JSON object: re-export the model")
    names = {f.name for f in dataclasses.fields(GenerateConfig)}
    generate = {k: v for k, v in section.items() if k in names}
    try:
        g = from_dict(GenerateConfig, generate)
        check_section(g)
    except DistillmtError as e:
        raise DistillmtError(f"{source}: {e}") from None
    out: dict[str, Any] = {"generate": {k: getattr(g, k) for k in generate}}
    if section.get("dtype") is not None:
        if section["dtype"] not in TORCH_DTYPES:
            raise DistillmtError(f"{source}: dtype {section['dtype']!r} is not one of {', '.join(TORCH_DTYPES)}")
        out["dtype"] = section["dtype"]
    if section.get("seed") is not None:
        if not isinstance(section["seed"], int) or isinstance(section["seed"], bool) or section["seed"] < 0:
            raise DistillmtError(f"{source}: seed {section['seed']!r} is not an integer >= 0")
        out["seed"] = section["seed"]
    if isinstance(section.get("scored_with"), str):
        out["scored_with"] = section["scored_with"]
    prompt = section.get("prompt")
    if prompt is not None:
        if not (isinstance(prompt, dict) and set(prompt) == {"chat", "plain"} and all(
            isinstance(v, str) and v.count("{text}") == 1 for v in prompt.values()
        )):  # fmt: skip
            raise DistillmtError(f"{source}: its prompt is not {{chat, plain}} texts that each hold {{text}} once")
        out["prompt"] = prompt
    return out
