"""COMET through the real unbabel-comet package on a tiny checkpoint built here: an XLM-R encoder (hidden 32, 2
layers, random weights, a Unigram tokenizer), a COMET RegressionMetric on top, saved in COMET's layout
(hparams.yaml + checkpoints/model.ckpt, the encoder's files in the folder under its pretrained_model name), then
scored through distillmt: corpus and sentence scores, the signature, the paired bootstrap and the results table.
Also the offline hub-name error, the missing-package error and the refusal of an unsafe checkpoint."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest

pytest.importorskip("comet", reason="needs unbabel-comet: pip install 'distillmt[comet]'")

from conftest import make_report  # noqa: E402

from distillmt import comet as comet_lib  # noqa: E402
from distillmt import metrics, stats  # noqa: E402
from distillmt.errors import DistillmtError  # noqa: E402

pytestmark = pytest.mark.unit

SRCS = ["It is sunny today.", "I like apples.", "He went to school.", "See you tomorrow.", "It is sunny today."]
REFS = ["今天天气很好。", "我喜欢吃苹果。", "他去学校。", "我们明天见。", "今天天气很好。"]
GOOD = ["今天天气很好。", "我喜欢吃苹果。", "他去学校了。", "我们明天见。", "今天天气很好。"]
POOR = ["天气。", "苹果。", "学校。", "见。", "天气。"]
ENCODER = "tiny-xlmr"  # pretrained_model in hparams.yaml, and the encoder's folder inside the checkpoint folder


def _vocab() -> list[tuple[str, float]]:
    chars = sorted(set("".join(SRCS + REFS + GOOD)) - {" "})
    specials = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("<mask>", 0.0)]
    return [*specials, ("▁", -2.0), *((c, -3.0) for c in chars)]


def build_checkpoint(folder: Path) -> Path:
    """A COMET checkpoint folder as Unbabel publishes them, with a tiny random XLM-R encoder."""
    import torch
    import yaml
    from comet.models import RegressionMetric
    from transformers import XLMRobertaConfig, XLMRobertaModel, XLMRobertaTokenizer

    encoder = folder / ENCODER
    vocab = _vocab()
    XLMRobertaTokenizer(vocab=vocab).save_pretrained(encoder)
    torch.manual_seed(0)
    config = XLMRobertaConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=130, pad_token_id=1, bos_token_id=0, eos_token_id=2,
    )  # fmt: skip
    XLMRobertaModel(config, add_pooling_layer=False).save_pretrained(encoder)
    model = RegressionMetric(
        pretrained_model=str(encoder), hidden_sizes=[16], layer_transformation="sparsemax", layer_norm=False
    )
    hparams = {**dict(model.hparams), "pretrained_model": ENCODER}
    (folder / "hparams.yaml").write_text(yaml.safe_dump(hparams), encoding="utf-8")
    (folder / "checkpoints").mkdir()
    ckpt = {"state_dict": model.state_dict(), "hyper_parameters": hparams, "epoch": 0, "global_step": 0,
            "pytorch-lightning_version": "2.6.6"}  # fmt: skip
    torch.save(ckpt, folder / "checkpoints" / "model.ckpt")
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return str(build_checkpoint(tmp_path_factory.mktemp("comet") / "tiny-comet"))


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No hub and an empty HF cache."""
    import huggingface_hub.constants

    from distillmt import models

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models, "_HUB_REACHABLE", None)
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.chdir(tmp_path)


def test_scores_end_to_end(checkpoint, offline):
    scores, sentences = metrics.evaluate_with_sentences(
        GOOD, REFS, sources=SRCS, comet_model=checkpoint, comet_batch_size=2, bertscore_model=None
    )
    assert list(scores) == ["n", "refs_sha256", "chrf", "bleu", "comet"]  # the column after BLEU
    entry = scores["comet"]
    segments = [s["COMET"] for s in sentences]
    assert len(segments) == len(GOOD) and all(isinstance(x, float) for x in segments)
    assert entry["score"] == pytest.approx(sum(segments) / len(segments))  # COMET's system score: the mean
    assert entry["columns"] == {"COMET": entry["score"]} and entry["decimals"] == 4 and entry["name"] == "COMET"
    assert segments[0] == pytest.approx(segments[4], abs=1e-6)  # the same source, translation and reference
    assert len({round(x, 6) for x in segments}) > 1  # not a constant
    sha = hashlib.sha256((Path(checkpoint) / "checkpoints" / "model.ckpt").read_bytes()).hexdigest()
    assert entry["checkpoint_sha256"] == sha
    assert entry["signature"] == f"model:{checkpoint}|sha256:{sha[:16]}|encoder:{ENCODER}|bs:2|version:2.2.7"
    again = metrics.evaluate(GOOD, REFS, sources=SRCS, comet_model=checkpoint, comet_batch_size=2, bertscore_model=None)
    assert again["comet"] == entry  # deterministic: no dropout at inference
    assert metrics.comet(GOOD, REFS, SRCS, model=checkpoint, batch_size=2, sentences=True)["sentences"] == {
        "COMET": segments
    }
    other = metrics.comet(GOOD, REFS, SRCS, model=checkpoint, batch_size=5)
    assert other["score"] == pytest.approx(entry["score"], abs=1e-5) and "|bs:5|" in other["signature"]


def test_the_bootstrap_and_the_table_take_comet_as_any_sentence_metric(checkpoint, offline):
    rows = {"STUDENT": POOR, "TEACHER": GOOD}
    scored = {
        name: metrics.evaluate_with_sentences(hyps, REFS, sources=SRCS, comet_model=checkpoint, bertscore_model=None)
        for name, hyps in rows.items()
    }
    records = {name: sentences for name, (_, sentences) in scored.items()}
    by_metric = metrics.sentence_scores(records)
    assert by_metric["comet"]["TEACHER"] == [s["COMET"] for s in records["TEACHER"]]
    result = stats.compare_to_baseline(rows, REFS, "STUDENT", sentence_scores=by_metric, n_samples=200)
    teacher = result["systems"]["TEACHER"]["comet"]
    assert teacher["score"] == pytest.approx(scored["TEACHER"][0]["comet"]["score"])
    assert teacher["ci_low"] <= teacher["score"] <= teacher["ci_high"] and 0 < teacher["p_value"] <= 1
    assert result["systems"]["STUDENT"]["comet"]["p_value"] is None  # the baseline
    assert result["signatures"]["comet"] == "mean of sentence scores|bs:200|seed:12345"

    from distillmt.report import markdown_report, results_table

    report = make_report(**{name: (scores, {"parameters": 1000}) for name, (scores, _) in scored.items()})
    report["significance"] = result
    table = results_table(report)
    assert table.splitlines()[0].startswith("| system | chrF | BLEU | COMET |")
    assert f"{teacher['score']:.4f}" in table.splitlines()[3]
    assert f"- COMET: `{scored['TEACHER'][0]['comet']['signature']}` (mean of 5 segment scores)" in markdown_report(
        report
    )


def test_a_hub_name_offline_fails_before_any_work_with_what_to_do(offline, tmp_path):
    from distillmt.config import load_config
    from distillmt.pipeline import preflight

    cfg = load_config(None, ["eval.comet_model=Unbabel/wmt22-comet-da", "eval.bertscore=false"])
    start = time.perf_counter()
    with pytest.raises(DistillmtError) as err:
        preflight(cfg)
    assert time.perf_counter() - start < 5
    message = str(err.value)
    assert "eval.comet_model = 'Unbabel/wmt22-comet-da': not a local folder, not in the Hugging Face cache" in message
    assert "hub cannot be reached" in message
    assert "download the checkpoint on a machine with the hub and set eval.comet_model to its folder" in message
    with pytest.raises(DistillmtError, match="no such folder"):
        comet_lib.check(str(tmp_path / "missing" / "comet"))


def test_an_encoder_that_cannot_be_found_offline_is_named(checkpoint, offline, tmp_path):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(checkpoint, folder, ignore=shutil.ignore_patterns(ENCODER))
    hparams = (folder / "hparams.yaml").read_text(encoding="utf-8")
    (folder / "hparams.yaml").write_text(hparams.replace(ENCODER, "xlm-roberta-large"), encoding="utf-8")
    with pytest.raises(DistillmtError) as err:
        comet_lib.check(str(folder))
    assert "its encoder 'xlm-roberta-large'" in str(err.value)
    assert f"hf download xlm-roberta-large config.json tokenizer.json tokenizer_config.json --local-dir {folder}" in (
        str(err.value)
    )
    (folder / "hparams.yaml").unlink()
    with pytest.raises(DistillmtError, match=r"hparams\.yaml is missing"):
        comet_lib.check(str(folder))


def test_a_missing_package_names_the_install_command(monkeypatch, checkpoint):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "comet" else find_spec(name, *a))
    expected = "COMET needs the unbabel-comet package, which is not installed: pip install 'distillmt[comet]'"
    with pytest.raises(DistillmtError, match=expected.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        comet_lib.check(checkpoint)
    with pytest.raises(DistillmtError, match="pip install --no-deps unbabel-comet==2.2.7"):
        metrics.evaluate(GOOD, REFS, sources=SRCS, comet_model=checkpoint, bertscore_model=None)


class Payload:
    """Stands for arbitrary code in a pickle: unpickling it would run __reduce__'s callable (write a file)."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (Path.write_text, (self.target, "ran"))


def test_a_checkpoint_with_more_than_weights_is_refused_unexecuted(checkpoint, tmp_path):
    import shutil

    import torch

    folder = tmp_path / "unsafe"
    shutil.copytree(checkpoint, folder)
    state = torch.load(folder / "checkpoints" / "model.ckpt", weights_only=True)
    torch.save({**state, "callbacks": Payload(tmp_path / "ran")}, folder / "checkpoints" / "model.ckpt")
    with pytest.raises(DistillmtError, match=r"cannot be loaded with torch\.load\(weights_only=True\)"):
        comet_lib.load(comet_lib.resolve(str(folder)))
    assert not (tmp_path / "ran").exists()
    torch.save({"state_dict": {}}, folder / "checkpoints" / "model.ckpt")
    with pytest.raises(DistillmtError, match=r"the checkpoint lacks \d+ weights of the model: encoder\.model\."):
        comet_lib.load(comet_lib.resolve(str(folder)))


def test_comet_needs_sources():
    with pytest.raises(DistillmtError, match="COMET needs one source sentence per hypothesis: 5 hypotheses, none"):
        metrics.evaluate(GOOD, REFS, comet_model="anything", bertscore_model=None)
    with pytest.raises(DistillmtError, match="5 hypotheses, 2 sources"):
        metrics.evaluate(GOOD, REFS, sources=SRCS[:2], comet_model="anything", bertscore_model=None)


def test_evaluate_keys_change_only_when_comet_is_on(tmp_path):
    from distillmt.config import EvalConfig
    from distillmt.pipeline import evaluate_settings, metric_options

    off = evaluate_settings(EvalConfig())
    assert "comet_model" not in off and "comet_batch_size" not in off and "baseline" not in off
    on = evaluate_settings(EvalConfig(comet_model="/models/wmt22-comet-da", comet_batch_size=8))
    assert on == {**off, "comet_model": "/models/wmt22-comet-da", "comet_batch_size": 8}
    rows = [{"src": s, "ref": r, "hyp": h} for s, r, h in zip(SRCS, REFS, GOOD, strict=True)]
    assert "sources" not in metric_options(EvalConfig(), "cpu", rows)
    options = metric_options(EvalConfig(comet_model="m"), "cpu", rows)
    assert options["sources"] == SRCS and options["comet_model"] == "m" and options["comet_batch_size"] == 16


def test_cli_evaluate_reads_the_sources_of_translations_jsonl(checkpoint, tmp_path, capsys, restore_process_state):
    from distillmt import cli

    rows = [{"src": s, "ref": r, "hyp": h} for s, r, h in zip(SRCS, REFS, GOOD, strict=True)]
    jsonl = tmp_path / "translations.jsonl"
    jsonl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert cli.main(["evaluate", "--hyp", str(jsonl), "--no-bertscore", "--comet-model", checkpoint]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = metrics.comet(GOOD, REFS, SRCS, model=checkpoint)
    assert printed["comet"]["score"] == pytest.approx(expected["score"])
    (tmp_path / "hyp.txt").write_text("\n".join(GOOD) + "\n", encoding="utf-8")
    (tmp_path / "ref.txt").write_text("\n".join(REFS) + "\n", encoding="utf-8")
    (tmp_path / "src.txt").write_text("\n".join(SRCS) + "\n", encoding="utf-8")
    plain = ["evaluate", "--hyp", str(tmp_path / "hyp.txt"), "--ref", str(tmp_path / "ref.txt"), "--no-bertscore"]
    assert cli.main([*plain, "--comet-model", checkpoint, "--src", str(tmp_path / "src.txt")]) == 0
    assert json.loads(capsys.readouterr().out)["comet"]["score"] == pytest.approx(expected["score"])
    assert cli.main([*plain, "--comet-model", checkpoint]) != 0
    assert "COMET needs the source sentences: give them with --src FILE" in capsys.readouterr().err
