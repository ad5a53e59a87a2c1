"""distillmt export: a row of a finished run as a standalone translator folder (Hugging Face or CTranslate2) that
`distillmt translate --model DIR` loads, with a README that says what it is and how it scored."""

from __future__ import annotations

import json

import pytest
from test_pipeline import micro_cfg

from distillmt.cli import main
from distillmt.errors import DistillmtError
from distillmt.export import export_system, exported_format
from distillmt.io import read_jsonl
from distillmt.pipeline import run_experiment


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    run_experiment(micro_cfg(tmp, "systems=[STUDENT,HLKD]"), progress=False)
    return tmp / "micro"


def translate(model_dir, sources, out, capsys) -> list[str]:
    args = ["translate", "--model", str(model_dir), "-i", str(sources), "-o", str(out), "--no-progress"]
    assert main([*args, "--max-new-tokens", "6", "--batch-size", "4"]) == 0
    capsys.readouterr()
    return [r["hyp"] for r in read_jsonl(out)]


def test_hf_and_ct2_exports_translate_like_the_run(run_dir, tmp_path, capsys):
    rows = read_jsonl(run_dir / "translate_HLKD" / "translations.jsonl")
    sources = tmp_path / "src.txt"
    sources.write_text("".join(r["src"] + "\n" for r in rows), encoding="utf-8")

    assert main(["export", str(run_dir), "--system", "HLKD", "-o", str(tmp_path / "hf")]) == 0
    assert exported_format(tmp_path / "hf") == "hf"
    assert (tmp_path / "hf" / "model.safetensors").exists() and (tmp_path / "hf" / "tokenizer.json").exists()
    readme = (tmp_path / "hf" / "README.md").read_text()
    assert "labels from the finetuned teacher" in readme and "chrF" in readme
    assert translate(tmp_path / "hf", sources, tmp_path / "hf.jsonl", capsys) == [r["hyp"] for r in rows]

    pytest.importorskip("ctranslate2")
    export_system(run_dir, "HLKD", tmp_path / "ct2", fmt="ct2", quantization="float32")
    assert exported_format(tmp_path / "ct2") == "ct2" and (tmp_path / "ct2" / "model.bin").exists()
    assert json.loads((tmp_path / "ct2" / "distillmt-export.json").read_text())["quantization"] == "float32"
    assert "was not scored" in (tmp_path / "ct2" / "README.md").read_text()
    ct2 = translate(tmp_path / "ct2", sources, tmp_path / "ct2.jsonl", capsys)
    same = sum(a == b for a, b in zip(ct2, [r["hyp"] for r in rows], strict=True))
    assert same >= len(rows) - 1  # float32 CTranslate2 decodes the same model: at most a rounding-level tie differs
    export_system(run_dir, "HLKD", tmp_path / "int8", fmt="ct2")
    assert json.loads((tmp_path / "int8" / "distillmt-export.json").read_text())["quantization"] == "int8"
    assert len(translate(tmp_path / "int8", sources, tmp_path / "int8.jsonl", capsys)) == len(rows)


def test_export_refuses_what_it_cannot_do(run_dir, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(DistillmtError, match="not an empty folder"):
        export_system(run_dir, "HLKD", tmp_path / "taken")
    with pytest.raises(DistillmtError, match="--system SLKD is not a row"):
        export_system(run_dir, "SLKD", tmp_path / "x")
    with pytest.raises(DistillmtError, match="not a run folder"):
        export_system(tmp_path, "HLKD", tmp_path / "y")
    with pytest.raises(DistillmtError, match="--quantization applies to --format ct2 only"):
        export_system(run_dir, "HLKD", tmp_path / "z", quantization="int8")
    assert not (tmp_path / "x").exists() and not (tmp_path / "z").exists()


def test_ct2_engine_in_the_pipeline_translates_and_labels(tmp_path):
    """generate.engine=ct2 converts each model once into its stage folder and decodes with CTranslate2; at float32 the
    outputs match transformers' (the reference) but for rounding-level ties. The engine is recorded per row."""
    pytest.importorskip("ctranslate2")
    ref = run_experiment(micro_cfg(tmp_path, "systems=[STUDENT,HLKD]", "name=hf"), progress=False)
    ct2 = run_experiment(
        micro_cfg(
            tmp_path,
            "systems=[STUDENT,HLKD]",
            "name=ct2",
            "generate.engine=ct2",
            "generate.quantization=float32",
            "hard_kd.decoding.engine=ct2",
            "hard_kd.decoding.quantization=float32",
        ),
        progress=False,
    )
    assert ct2["systems"]["STUDENT"]["translation"]["engine"] == "ct2 float32"
    assert ref["systems"]["STUDENT"]["translation"]["engine"] == "hf float32"
    root = tmp_path / "ct2"
    assert (root / "translate_STUDENT" / "ct2-model" / "model.bin").exists()
    assert (root / "teacher_labels" / "ct2-model" / "model.bin").exists()
    for name in ("translate_STUDENT", "teacher_labels"):
        files = sorted((tmp_path / "hf" / name).glob("*.jsonl")), sorted(root.glob(f"{name}/*.jsonl"))
        a = [r.get("hyp", r.get("label")) for f in files[0] for r in read_jsonl(f)]
        b = [r.get("hyp", r.get("label")) for f in files[1] for r in read_jsonl(f)]
        assert len(a) == len(b) and sum(x == y for x, y in zip(a, b, strict=True)) >= len(a) - 2, name


def test_engine_settings_key_a_stage_only_off_the_default():
    from dataclasses import replace

    from distillmt.config import GenerateConfig, generation_settings

    assert "engine" not in generation_settings(GenerateConfig())  # stage keys of earlier runs stay valid
    ct2 = generation_settings(replace(GenerateConfig(), engine="ct2"))
    assert ct2["engine"] == "ct2" and ct2["quantization"] == "int8"
    with pytest.raises(DistillmtError, match="engine=ct2 gives one label per source"):
        micro_cfg(__import__("pathlib").Path("/tmp"), "hard_kd.decoding.engine=ct2", "hard_kd.num_candidates=2")
