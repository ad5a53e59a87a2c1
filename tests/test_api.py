"""The Python API: ``import distillmt`` is cheap, ``distillmt.run`` takes a config with overrides in two spellings and
returns the table that results.json holds, ``distillmt.translate`` translates with a run's row as it was scored."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import micro_cfg

import distillmt
from distillmt.api import Results, _config, model_of
from distillmt.config import ExperimentConfig
from distillmt.errors import DistillmtError
from distillmt.io import read_jsonl


@pytest.mark.unit
def test_import_distillmt_loads_neither_torch_nor_transformers():
    code = (
        "import sys, distillmt\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'accelerate', 'peft') if m in sys.modules)\n"
        "print(heavy, [n for n in ('run', 'translate', 'load_config', 'Results') if n in dir(distillmt)])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] ['run', 'translate', 'load_config', 'Results']"


@pytest.mark.unit
def test_the_api_names_resolve_to_the_real_functions():
    from distillmt import api, config

    assert distillmt.load_config is config.load_config
    assert (distillmt.run, distillmt.translate, distillmt.Results) == (api.run, api.translate, api.Results)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        distillmt.nope  # noqa: B018


@pytest.mark.unit
def test_overrides_dotted_or_as_section_dicts_give_the_same_config(tmp_path):
    dotted = _config(None, {"train_student.lr": 3e-4, "soft_kd.alpha": 0.3, "name": "t1"})
    nested = _config(None, {"train_student": {"lr": 3e-4}, "soft_kd": {"alpha": 0.3}, "name": "t1"})
    assert dotted == nested
    assert dotted.train_student.lr == 3e-4 and dotted.train_student.epochs == ExperimentConfig().train_student.epochs
    assert dotted.teacher == ExperimentConfig().teacher  # a section's other keys keep the default experiment's values
    mixed = _config(None, {"train_student": {"lr": 3e-4}, "train_student.batch_size": 4})
    assert (mixed.train_student.lr, mixed.train_student.batch_size) == (3e-4, 4)


@pytest.mark.unit
def test_overrides_apply_over_a_yaml_file_or_a_config(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("name: no\ntrain_student:\n  lr: 0.001\n  epochs: 2\n", encoding="utf-8")
    cfg = _config(path, {"train_student.lr": 3e-4})
    assert (cfg.name, cfg.train_student.lr, cfg.train_student.epochs) == ("no", 3e-4, 2.0)  # `no` stays a word
    again = _config(cfg, {"seed": 3})
    assert (again.seed, again.name, again.train_student.lr) == (3, "no", 3e-4)


@pytest.mark.unit
@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"train_student.lrr": 1.0}, "unknown config key 'train_student.lrr'"),
        ({"soft_kd": {"alpha": 1.5}}, r"'soft_kd.alpha' = 1.5 is out of range"),
        ({"name": "x", "name.y": 1}, "'name' is given both a value and keys under it"),
        ({"report_to": ["neptune"]}, "unknown tracker 'neptune'"),
    ],
)
def test_a_bad_override_is_refused_before_any_work(tmp_path, overrides, message):
    with pytest.raises(DistillmtError, match=message):
        distillmt.run(None, output_dir=str(tmp_path), **overrides)
    assert not list(tmp_path.iterdir())


@pytest.mark.unit
def test_model_of_a_run_folder_picks_the_rows_model(tmp_path):
    run = tmp_path / "run"
    (run / "train_slkd" / "model").mkdir(parents=True)
    (run / "train_slkd" / "model" / "adapter_config.json").write_text("{}")
    (run / "train_hlkd" / "model").mkdir(parents=True)
    conf = {"teacher": {"model": "store:big"}, "student": {"model": "store:small"}, "systems": ["TEACHER", "SLKD"]}
    (run / "config.json").write_text(json.dumps(conf))
    assert model_of(run, "SLKD") == ("store:small", str(run / "train_slkd" / "model"))  # LoRA: adapter on its base
    assert model_of(run, "HLKD") == (str(run / "train_hlkd" / "model"), None)  # full weights
    assert model_of(run, "TEACHER") == ("store:big", None)  # zero-shot: the base model
    with pytest.raises(DistillmtError, match="has no model for GKD: .*train_gkd/model is missing"):
        model_of(run, "GKD")
    with pytest.raises(DistillmtError, match="unknown system 'XX'"):
        model_of(run, "XX")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "qwen2"}')  # a model folder is the model itself
    assert model_of(tmp_path / "hf", "SLKD") == (str(tmp_path / "hf"), None)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A micro experiment run through ``distillmt.run``, with one override in each spelling."""
    tmp = tmp_path_factory.mktemp("api")
    cfg = micro_cfg(tmp, "systems=[TEACHER,STUDENT]")
    results = distillmt.run(cfg, progress=False, **{"generate.max_new_tokens": 5}, eval={"bootstrap_samples": 200})
    return results, tmp / "micro"


def test_run_returns_the_table_of_results_json(finished):
    results, folder = finished
    report = json.loads((folder / "results.json").read_text(encoding="utf-8"))
    assert results.folder == folder and results.report == report
    assert (report["config"]["generate"]["max_new_tokens"], report["config"]["eval"]["bootstrap_samples"]) == (5, 200)
    overrides = "{'generate.max_new_tokens': 5, 'eval': {'bootstrap_samples': 200}}"
    assert report["command"] == f"distillmt.run(ExperimentConfig(...), **{overrides})"
    assert [r["system"] for r in results.rows] == ["TEACHER", "STUDENT"]
    sig = report["significance"]["systems"]
    for row in results.rows:
        stated = report["systems"][row["system"]]
        for key in ("bleu", "chrf"):
            assert row[key] == stated["scores"][key]["score"]
            assert (row[f"{key}_ci_low"], row[f"{key}_ci_high"]) == (sig[row["system"]][key]["ci_low"],
                                                                       sig[row["system"]][key]["ci_high"])  # fmt: skip
            assert row[f"{key}_p_value"] == sig[row["system"]][key]["p_value"]
        ci = [f"{key}_{part}" for key in ("chrf", "bleu") for part in ("ci_low", "ci_high", "p_value")]
        assert set(row) == {"system", "chrf", "bleu", *ci, "parameters", "tokens_per_s"}  # no BERTScore: not asked
        assert row["parameters"] == stated["translation"]["parameters"]
        assert row["tokens_per_s"] == stated["translation"]["tokens_per_s"]
    assert results.rows[1]["bleu_p_value"] is None  # STUDENT is the baseline
    assert results.to_markdown() in (folder / "results.md").read_text(encoding="utf-8")
    assert Results.from_folder(folder).rows == results.rows


def test_translate_from_the_run_folder_as_the_row_was_scored(finished, capsys):
    _, folder = finished
    scored = read_jsonl(folder / "translate_STUDENT" / "translations.jsonl")
    capsys.readouterr()
    hyps = distillmt.translate([r["src"] for r in scored], folder, "STUDENT", progress=False)
    assert hyps == [r["hyp"] for r in scored]  # the recorded settings: max_new_tokens 5, batch_size 4
    said = capsys.readouterr().err
    assert "using the settings micro/translate_STUDENT recorded: dtype float32, batch_size 4, max_new_tokens 5" in said
    assert "num_beams 1 (override with dtype, batch_size, max_new_tokens, num_beams)" in said
    one = distillmt.translate(scored[0]["src"], folder, "STUDENT", progress=False)
    assert one == distillmt.translate([scored[0]["src"]], folder, "STUDENT", progress=False)[0]
    with pytest.raises(DistillmtError, match="unknown translate setting 'beams'"):
        distillmt.translate(["x"], folder, "STUDENT", beams=2)
    with pytest.raises(DistillmtError, match="'num_beams' = 0 is out of range"):
        distillmt.translate(["x"], folder, "STUDENT", num_beams=0)
    with pytest.raises(DistillmtError, match="has no model for SLKD"):
        distillmt.translate(["x"], folder, "SLKD")
