"""Export a results row of a run as a standalone translator folder.

``hf``: a Hugging Face causal LM (LoRA merged into the weights, safetensors) with its tokenizer and chat template.
``ct2``: the same model converted to CTranslate2 (``pip install 'distillmt[ct2]'``), optionally quantized (int8 is
the usual choice on CPU), with the tokenizer files beside it. Either folder holds ``distillmt-export.json`` (what it
is and where it came from) and a README with the row's scores in the run and how to load it;
``distillmt translate --model DIR`` accepts both. The folder is written beside its target and renamed into place when
complete, so a failed export leaves nothing half-written.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from distillmt.errors import DistillmtError
from distillmt.io import atomic_write_text, read_json, write_json

FORMATS = ("hf", "ct2")
QUANTIZATIONS = ("float32", "int8", "int8_float32", "int8_float16", "int8_bfloat16", "int16", "float16", "bfloat16")
MARKER = "distillmt-export.json"


def exported_format(folder: str | Path) -> str | None:
    """``hf`` or ``ct2`` for a folder written by :func:`export_system`, ``ct2`` for any CTranslate2 model folder,
    else None (a Hugging Face folder, a hub id, ...)."""
    folder = Path(folder)
    if (folder / MARKER).is_file():
        return read_json(folder / MARKER).get("format")
    return "ct2" if (folder / "model.bin").is_file() and (folder / "config.json").is_file() else None


def _run_config(run_dir: Path) -> Any:
    from distillmt.config import ExperimentConfig, from_dict, validate

    path = run_dir / "config.json"
    if not path.is_file():
        raise DistillmtError(f"{run_dir} is not a run folder (no config.json): give the folder `distillmt run` wrote")
    cfg = from_dict(ExperimentConfig, read_json(path))
    validate(cfg)
    return cfg


def _readme(system: str, fmt: str, quantization: str | None, cfg: Any, row: dict[str, Any] | None) -> str:
    from distillmt.report import describe_system, metric_entries

    lines = [f"# {system}, exported by distillmt", "", f"- What it is: {describe_system(cfg, system)}."]
    lines.append(f"- Format: {fmt}" + (f" (CTranslate2, quantization {quantization})" if fmt == "ct2" else ""))
    if row is not None:
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
    cfg = _run_config(run_dir)
    if system not in cfg.systems:
        raise DistillmtError(f"--system {system} is not a row of {run_dir} (rows: {', '.join(cfg.systems)})")
    stage = systems.get(system).trained_stage(cfg.teacher.model == "scratch")
    if stage is not None and not (run_dir / stage / "stage.json").is_file():
        raise DistillmtError(f"{run_dir / stage} is not finished: run the experiment to the end first")
    if fmt == "ct2":
        try:
            import ctranslate2  # noqa: F401
        except ImportError:
            raise DistillmtError("--format ct2 needs CTranslate2: pip install 'distillmt[ct2]'") from None
    results = run_dir / "results.json"
    row = read_json(results)["systems"].get(system) if results.is_file() else None

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
        write_json(tmp / MARKER, marker)
        atomic_write_text(tmp / "README.md", _readme(system, fmt, quantization, cfg, row))
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
