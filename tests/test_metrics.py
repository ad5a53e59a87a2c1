"""Tests for distillmt.metrics: BLEU/chrF through sacrebleu on Chinese, signatures, errors, and BERTScore offline."""

from __future__ import annotations

import hashlib
import json
import time

import pytest
import sacrebleu

from distillmt import metrics
from distillmt.errors import DistillmtError

pytestmark = pytest.mark.unit

# Hypotheses and references: two identical, several partial matches, one empty hypothesis, one unrelated.
HYPS = [
    "今天天气很好。",
    "我喜欢吃苹果。",
    "他去学校了。",
    "",
    "这本书很有意思。",
    "我们明天见。",
    "猫在桌子上睡觉。",
]
REFS = [
    "今天天气很好。",
    "我喜欢吃香蕉。",
    "他去学校。",
    "你好吗？",
    "这本书非常有趣。",
    "我们明天见。",
    "狗在椅子下面睡觉。",
]


def test_bleu_zh_equals_sacrebleu_corpus_bleu():
    ours = metrics.bleu(HYPS, REFS, tokenize="zh")
    ref = sacrebleu.corpus_bleu(HYPS, [REFS], tokenize="zh")
    assert ours["score"] == pytest.approx(ref.score, abs=1e-9)
    assert 20 < ours["score"] < 90  # partial matches: neither 0 nor 100


def test_bleu_default_tokenizer_is_zh():
    assert metrics.bleu(HYPS, REFS)["score"] == pytest.approx(metrics.bleu(HYPS, REFS, tokenize="zh")["score"])


def test_13a_gives_a_much_lower_bleu_on_unspaced_chinese():
    zh = metrics.bleu(HYPS, REFS, tokenize="zh")["score"]
    thirteen_a = metrics.bleu(HYPS, REFS, tokenize="13a")
    assert thirteen_a["score"] == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS], tokenize="13a").score)
    assert thirteen_a["score"] < zh / 4  # each unspaced sentence is one 13a "word": no higher-order n-grams match
    assert "tok:13a" in thirteen_a["signature"]


def test_chrf_equals_sacrebleu_corpus_chrf():
    ours = metrics.chrf(HYPS, REFS)
    ref = sacrebleu.corpus_chrf(HYPS, [REFS])
    assert ours["score"] == pytest.approx(ref.score, abs=1e-9)
    assert 20 < ours["score"] < 90


def test_signatures_name_tokenizer_and_version():
    b = metrics.bleu(HYPS, REFS, tokenize="zh")["signature"]
    c = metrics.chrf(HYPS, REFS)["signature"]
    assert "tok:zh" in b.split("|")
    assert "version:2.6.0" in b.split("|")
    assert "nrefs:1" in b.split("|")
    assert "version:2.6.0" in c.split("|")
    assert "nc:6" in c.split("|")  # chrF's default character order


@pytest.mark.parametrize("metric", [metrics.bleu, metrics.chrf])
def test_identical_hypotheses_score_100(metric):
    refs = [r for r in REFS if r]
    assert metric(refs, list(refs))["score"] == pytest.approx(100.0)


def test_bleu_rewards_a_better_system():
    worse = ["天气。", "苹果。", "学校。", "", "书。", "见。", "睡觉。"]
    assert metrics.bleu(worse, REFS)["score"] < metrics.bleu(HYPS, REFS)["score"]
    assert metrics.chrf(worse, REFS)["score"] < metrics.chrf(HYPS, REFS)["score"]


@pytest.mark.parametrize("fn", [metrics.bleu, metrics.chrf, metrics.evaluate])
def test_mismatched_lengths_are_an_error(fn):
    with pytest.raises(DistillmtError, match=r"6 hypotheses but 7 references"):
        fn(HYPS[:-1], REFS)


@pytest.mark.parametrize("fn", [metrics.bleu, metrics.chrf])
def test_no_hypotheses_is_an_error(fn):
    with pytest.raises(DistillmtError, match=r"nothing to score"):
        fn([], [])


def test_evaluate_without_bertscore_has_only_bleu_and_chrf():
    scores = metrics.evaluate(HYPS, REFS, bertscore_model=None)
    assert scores["n"] == len(HYPS)
    assert scores["bleu"] == metrics.bleu(HYPS, REFS)
    assert scores["chrf"] == metrics.chrf(HYPS, REFS)
    assert "bertscore" not in scores


def test_every_metric_has_one_shape():
    scores = metrics.evaluate(HYPS, REFS, bertscore_model=None)
    assert list(scores) == ["n", "refs_sha256", "chrf", "bleu"]  # metric order = column order
    assert scores["refs_sha256"] == hashlib.sha256("\n".join(REFS).encode("utf-8")).hexdigest()
    bleu = sacrebleu.corpus_bleu(HYPS, [REFS], tokenize="zh").score
    chrf = sacrebleu.corpus_chrf(HYPS, [REFS]).score
    assert scores["bleu"] == {
        "name": "BLEU",
        "score": pytest.approx(bleu),
        "signature": scores["bleu"]["signature"],
        "columns": {"BLEU": pytest.approx(bleu)},
        "decimals": 2,
    }
    assert scores["chrf"] == {
        "name": "chrF",
        "score": pytest.approx(chrf),
        "signature": scores["chrf"]["signature"],
        "columns": {"chrF": pytest.approx(chrf)},
        "decimals": 2,
    }
    assert "tok:zh" in scores["bleu"]["signature"] and "nc:6" in scores["chrf"]["signature"]


def test_refs_hash_depends_on_references_only():
    a = metrics.evaluate(HYPS, REFS, bertscore_model=None)["refs_sha256"]
    assert metrics.evaluate(list(REFS), REFS, bertscore_model=None)["refs_sha256"] == a
    assert metrics.evaluate(HYPS, [*REFS[:-1], "别的句子。"], bertscore_model=None)["refs_sha256"] != a


def test_unavailable_entry_has_the_columns_and_no_numbers():
    e = metrics.metric_entry("M", {"M a": 1.0, "M b": 2.0}, decimals=3, score=1.0, signature="s", unavailable="why")
    assert e == {
        "name": "M",
        "score": None,
        "signature": None,
        "columns": {"M a": None, "M b": None},
        "decimals": 3,
        "unavailable": "why",
    }


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No hub and an empty HF cache: bert-base-chinese cannot be loaded."""
    import huggingface_hub.constants

    from distillmt import models

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models, "_HUB_REACHABLE", None)  # forget any probe made earlier in this process
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.chdir(tmp_path)  # no local folder named like the model either


def test_bertscore_unloadable_model_raises_metric_unavailable(offline):
    with pytest.raises(metrics.MetricUnavailable, match=r"bert-base-chinese"):
        metrics.bertscore(HYPS, REFS, model="bert-base-chinese")


def test_evaluate_reports_bertscore_unavailable_without_a_number(offline):
    start = time.perf_counter()
    scores = metrics.evaluate(HYPS, REFS, bertscore_model="bert-base-chinese")
    assert time.perf_counter() - start < 10
    assert list(scores) == ["n", "refs_sha256", "bertscore", "chrf", "bleu"]
    bs = scores["bertscore"]
    reason = bs.pop("unavailable")
    assert bs == {  # no P/R/F invented
        "name": "BERTScore",
        "score": None,
        "signature": None,
        "columns": {"BERTScore P": None, "BERTScore R": None, "BERTScore F1": None},
        "decimals": 4,
    }
    assert "bert-base-chinese" in reason
    assert "\n" not in reason
    assert scores["bleu"]["score"] == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS], tokenize="zh").score)
    assert scores["chrf"]["score"] == pytest.approx(sacrebleu.corpus_chrf(HYPS, [REFS]).score)


def _encoder_folder(tmp_path, layers=12):
    folder = tmp_path / "encoder"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "num_hidden_layers": layers}))
    return str(folder)


def test_check_bertscore_refuses_a_layer_the_encoder_does_not_have(tmp_path):
    folder = _encoder_folder(tmp_path)
    with pytest.raises(DistillmtError) as err:
        metrics.check_bertscore(folder, 13)
    assert str(err.value) == f"eval.bertscore_layer = 13 but {folder} has 12 layers; allowed: 1..12"
    metrics.check_bertscore(folder, 12)
    metrics.check_bertscore(folder, 1)


def test_check_bertscore_reads_an_imported_store_model(tmp_path, monkeypatch):
    from distillmt import store

    monkeypatch.setenv("DISTILLMT_HOME", str(tmp_path / "store"))
    folder = tmp_path / "store" / "multilingual-e5-small"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"num_hidden_layers": 12}))
    (folder / store.IMPORT_INFO).write_text("{}")
    with pytest.raises(DistillmtError, match=r"= 13 but store:multilingual-e5-small has 12 layers; allowed: 1\.\.12"):
        metrics.check_bertscore("store:multilingual-e5-small", 13)
    metrics.check_bertscore("store:multilingual-e5-small", 9)


def test_check_bertscore_skips_what_it_cannot_read_offline(offline, monkeypatch, tmp_path):
    monkeypatch.setenv("DISTILLMT_HOME", str(tmp_path / "store"))
    metrics.check_bertscore("bert-base-chinese", 99)  # not cached, hub unreachable
    metrics.check_bertscore("store:multilingual-e5-small", 99)  # known but not imported: not imported by the check
    metrics.check_bertscore("store:no-such-model", 99)
    assert not (tmp_path / "store").exists()
    no_config = tmp_path / "no-config"
    no_config.mkdir()
    metrics.check_bertscore(str(no_config), 99)


@pytest.mark.parametrize("fn", [metrics.bertscore, metrics.evaluate])
def test_bertscore_refuses_a_bad_layer_with_a_clear_error(tmp_path, fn):
    folder = _encoder_folder(tmp_path)
    kw = (
        {"model": folder, "layer": 13}
        if fn is metrics.bertscore
        else {"bertscore_model": folder, "bertscore_layer": 13}
    )
    with pytest.raises(DistillmtError, match=r"eval.bertscore_layer = 13 but .* has 12 layers; allowed: 1\.\.12"):
        fn(HYPS, REFS, **kw)


def test_hub_reachable_honours_hf_hub_offline(monkeypatch):
    from distillmt import models

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models, "_HUB_REACHABLE", None)
    assert models.hub_reachable() is False


# --- per-sentence scores ---------------------------------------------------------------------------------------------


def test_evaluate_with_sentences_gives_the_same_scores_and_sacrebleus_sentence_scores():
    scores, sentences = metrics.evaluate_with_sentences(HYPS, REFS, bertscore_model=None)
    assert scores == metrics.evaluate(HYPS, REFS, bertscore_model=None)  # nothing per sentence in the scores
    assert len(sentences) == len(HYPS)
    bleu = sacrebleu.BLEU(tokenize="zh", effective_order=True)
    for record, hyp, ref in zip(sentences, HYPS, REFS, strict=True):
        assert list(record) == ["chrF", "BLEU"]
        assert record["chrF"] == sacrebleu.sentence_chrf(hyp, [ref]).score
        assert record["BLEU"] == bleu.sentence_score(hyp, [ref]).score
    assert sentences[0] == {"chrF": pytest.approx(100.0), "BLEU": pytest.approx(100.0)}
    assert sentences[3] == {"chrF": 0.0, "BLEU": 0.0}  # the empty hypothesis
    _, with_13a = metrics.evaluate_with_sentences(HYPS, REFS, bertscore_model=None, bleu_tokenize="13a")
    assert with_13a[1]["BLEU"] < sentences[1]["BLEU"]


def test_bertscore_sentences_come_from_the_one_bert_score_call(tmp_path, monkeypatch):
    import bert_score
    import torch

    calls = []
    p, r, f = (torch.linspace(0.5, 0.9, len(HYPS)) + d for d in (0.0, 0.01, 0.02))

    def fake_score(hyps, refs, **kwargs):
        calls.append(len(hyps))
        return p, r, f

    monkeypatch.setattr(bert_score, "score", fake_score)
    encoder = _encoder_folder(tmp_path)
    scores, sentences = metrics.evaluate_with_sentences(HYPS, REFS, bertscore_model=encoder)
    assert calls == [len(HYPS)]
    assert list(sentences[0]) == ["BERTScore P", "BERTScore R", "BERTScore F1", "chrF", "BLEU"]
    assert [s["BERTScore F1"] for s in sentences] == pytest.approx(f.tolist())
    assert [s["BERTScore P"] for s in sentences] == pytest.approx(p.tolist())
    assert scores["bertscore"]["score"] == pytest.approx(sum(s["BERTScore F1"] for s in sentences) / len(HYPS))
    assert "sentences" not in scores["bertscore"]
    assert "sentences" not in metrics.bertscore(HYPS, REFS, model=encoder)
    assert metrics.bertscore(HYPS, REFS, model=encoder, sentences=True)["sentences"]["BERTScore R"] == pytest.approx(
        r.tolist()
    )


def test_an_unavailable_metric_has_no_sentence_scores(offline):
    scores, sentences = metrics.evaluate_with_sentences(HYPS, REFS, bertscore_model="bert-base-chinese")
    assert scores["bertscore"]["unavailable"]
    assert all(list(s) == ["chrF", "BLEU"] for s in sentences)


def test_an_empty_translation_scores_zero_instead_of_crashing_bertscore(tmp_path):
    """bert_score encodes an empty sentence with a tokenizer method transformers 5 removed; an empty hypothesis (a
    KD student can say nothing) must score 0, as bert_score intends, not stop the evaluation."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    chars = sorted(set("今天天气很好我喜欢吃苹果他去学校了"))
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars]) + "\n")
    tok = BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"), tokenize_chinese_chars=True, model_max_length=64)
    tok.save_pretrained(tmp_path / "enc")
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(tok), hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
    )
    BertModel(cfg).save_pretrained(tmp_path / "enc")
    out = metrics.bertscore(["", "今天天气很好"], ["我喜欢吃苹果", "今天天气很好"], model=str(tmp_path / "enc"), layer=2,
                            sentences=True)  # fmt: skip
    assert out["sentences"]["BERTScore F1"][0] == 0.0
    assert out["sentences"]["BERTScore F1"][1] == pytest.approx(1.0, abs=1e-5)
