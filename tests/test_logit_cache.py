"""Tests for distillmt.logit_cache with a tiny Qwen2 model built in code (no download)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import build_tiny_qwen

from distillmt.errors import DistillmtError
from distillmt.logit_cache import TeacherCache, build_teacher_cache, cache_key, data_fingerprint, example_key
from distillmt.losses import kd_loss, topk_kd_loss

pytestmark = pytest.mark.unit

VOCAB = 64
PAD = 0
TEACHER_ID = "tiny/teacher"


def kd_term(*args, **kwargs) -> torch.Tensor:
    return kd_loss(*args, **kwargs)["kd"]


def topk_term(*args, **kwargs) -> torch.Tensor:
    return topk_kd_loss(*args, **kwargs)["kd"]


def tiny_model(seed: int) -> transformers.Qwen2ForCausalLM:
    model = build_tiny_qwen(VOCAB, num_layers=2, seed=seed).eval()
    with torch.no_grad():  # random init gives near-uniform outputs; sharpen them so divergences are O(0.1..1)
        model.lm_head.weight.mul_(25.0)
    return model


def make_examples() -> list[dict]:
    g = torch.Generator().manual_seed(123)
    examples = []
    for prompt_len, target_len in [(3, 4), (5, 2), (2, 6), (4, 3), (6, 5)]:
        ids = torch.randint(1, VOCAB, (prompt_len + target_len,), generator=g).tolist()
        labels = [-100] * prompt_len + ids[prompt_len:]
        examples.append({"input_ids": ids, "labels": labels})
    return examples


@pytest.fixture(scope="module")
def teacher():
    return tiny_model(0)


@pytest.fixture(scope="module")
def student():
    return tiny_model(1)


@pytest.fixture(scope="module")
def examples():
    return make_examples()


def build(teacher, examples, out_dir, **overrides):
    kwargs = dict(
        teacher_id=TEACHER_ID,
        k=8,
        temperature=2.0,
        vocab_size=VOCAB,
        batch_size=2,
        shard_size=2,
        pad_token_id=PAD,
        progress=False,
    )
    kwargs.update(overrides)
    return build_teacher_cache(teacher, examples, out_dir, **kwargs)


@pytest.fixture(scope="module")
def built(teacher, examples, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache")
    return build(teacher, examples, out)


def collate(examples: list[dict]):
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), PAD, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    attn = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        attn[i, :n] = 1
    return ids, labels, attn


# ------------------------------------------------------------------------------------------------------------


def test_keys_are_deterministic_and_content_addressed(examples):
    e = examples[0]
    assert example_key(e["input_ids"], e["labels"]) == example_key(list(e["input_ids"]), list(e["labels"]))
    assert example_key(e["input_ids"], e["labels"]) != example_key(e["input_ids"][:-1], e["labels"][:-1])
    changed = list(e["labels"])
    changed[0] = e["input_ids"][0]  # same tokens, different mask
    assert example_key(e["input_ids"], e["labels"]) != example_key(e["input_ids"], changed)
    fp = data_fingerprint(examples)
    assert fp != data_fingerprint(examples[::-1])
    base = dict(teacher_id="a", k=8, temperature=1.0, vocab_size=64, data_fingerprint=fp)
    assert cache_key(**base) == cache_key(**base)
    for field, value in [("teacher_id", "b"), ("k", 9), ("temperature", 2.0), ("vocab_size", 65)]:
        assert cache_key(**{**base, field: value}) != cache_key(**base)


def test_manifest_and_layout(built, examples):
    manifest = json.loads((built.out_dir / "manifest.json").read_text())
    assert manifest["complete"] is True
    assert manifest["bytes_per_token"] == 8 * (2 + 4)
    assert manifest["n_examples"] == len(examples)
    n_targets = sum(sum(1 for t in range(1, len(e["labels"])) if e["labels"][t] != -100) for e in examples)
    assert manifest["n_tokens"] == n_targets
    assert manifest["total_bytes"] == n_targets * 8 * 6
    assert [s["file"] for s in manifest["shards"]] == [f"shard-0000{i}.safetensors" for i in range(3)]
    assert sorted(p.name for p in built.out_dir.iterdir()) == sorted(
        ["manifest.json"] + [s["file"] for s in manifest["shards"]]
    )
    assert len(built) == len(examples)


def test_gather_is_aligned_with_labels(built, teacher, examples):
    ids, labels, attn = collate(examples)
    with torch.no_grad():
        logits = teacher(input_ids=ids, attention_mask=attn).logits
    lp_ref = F.log_softmax(logits / 2.0, dim=-1)
    lp, idx = built.gather([e["input_ids"] for e in examples], [e["labels"] for e in examples], ids.shape[1])
    assert lp.shape == idx.shape == (len(examples), ids.shape[1], 8)
    assert lp.dtype == torch.float32 and idx.dtype == torch.long
    for b, e in enumerate(examples):
        for t in range(ids.shape[1]):
            if t >= 1 and t < len(e["labels"]) and e["labels"][t] != -100:
                vals, top = lp_ref[b, t - 1].topk(8)
                assert torch.equal(idx[b, t], top)
                assert torch.allclose(lp[b, t], vals, atol=1e-2)
            else:
                assert torch.all(lp[b, t] == 0) and torch.all(idx[b, t] == 0)


def test_round_trip_full_vocab_equals_online_kd(teacher, student, examples, tmp_path):
    temp = 2.0
    cache = build(teacher, examples, tmp_path / "full", k=VOCAB, temperature=temp)
    cache.check(teacher_id=TEACHER_ID, k=VOCAB, temperature=temp, vocab_size=VOCAB, examples=examples)
    ids, labels, attn = collate(examples)
    with torch.no_grad():
        t_logits = teacher(input_ids=ids, attention_mask=attn).logits
    s_logits = student(input_ids=ids, attention_mask=attn).logits
    lp, idx = cache.gather([e["input_ids"] for e in examples], [e["labels"] for e in examples], ids.shape[1])
    for kind, beta in [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("skew_kl", 0.1), ("tvd", 0.5)]:
        full = kd_term(s_logits, t_logits, labels, divergence=kind, beta=beta, temperature=temp)
        cached = topk_term(s_logits, lp, idx, labels, divergence=kind, beta=beta, temperature=temp)
        # float16 storage of the log-probs is the only difference
        assert torch.allclose(cached, full, rtol=1e-3, atol=1e-4), (kind, cached.item(), full.item())
    cached.backward()
    assert torch.isfinite(student.model.embed_tokens.weight.grad).all()
    student.zero_grad(set_to_none=True)


def test_round_trip_small_k_is_a_lower_bound(built, teacher, student, examples):
    ids, labels, attn = collate(examples)
    with torch.no_grad():
        t_logits = teacher(input_ids=ids, attention_mask=attn).logits
        s_logits = student(input_ids=ids, attention_mask=attn).logits
    lp, idx = built.gather([e["input_ids"] for e in examples], [e["labels"] for e in examples], ids.shape[1])
    full = kd_term(s_logits, t_logits, labels, temperature=2.0)
    cached = topk_term(s_logits, lp, idx, labels, temperature=2.0)
    # merging the vocabulary into k+1 buckets can only lower a KL (data processing inequality)
    assert torch.isfinite(cached) and 0 < cached.item() <= full.item() * 1.01 + 1e-4


@pytest.mark.parametrize(
    "field,value,word",
    [
        ("teacher_id", "other/teacher", "teacher"),
        ("k", 4, "k:"),
        ("temperature", 1.0, "temperature"),
        ("vocab_size", 60, "vocab_size"),
    ],
)
def test_stale_settings_are_refused(built, examples, field, value, word):
    settings = dict(teacher_id=TEACHER_ID, k=8, temperature=2.0, vocab_size=VOCAB)
    built.check(**settings, examples=examples)
    settings[field] = value
    with pytest.raises(DistillmtError, match=word):
        built.check(**settings, examples=examples)


def test_changed_examples_are_refused(built, examples):
    settings = dict(teacher_id=TEACHER_ID, k=8, temperature=2.0, vocab_size=VOCAB)
    retokenised = [dict(e) for e in examples]
    retokenised[2] = {"input_ids": [1] + examples[2]["input_ids"], "labels": [-100] + examples[2]["labels"]}
    with pytest.raises(DistillmtError, match="data: 1 of 5"):
        built.check(**settings, examples=retokenised)
    # entries are addressed by content: another order or a subset of the cached examples is fine
    built.check(**settings, examples=examples[::-1])
    built.check(**settings, examples=examples[1:3])


def test_gather_with_missing_example_raises(built, examples):
    ids = [examples[0]["input_ids"], examples[1]["input_ids"] + [5]]
    labels = [examples[0]["labels"], examples[1]["labels"] + [5]]
    with pytest.raises(DistillmtError, match="teacher cache has no entry for a training example"):
        built.gather(ids, labels, 16)


def test_resume_after_kill_reuses_finished_shards(teacher, examples, tmp_path):
    out = tmp_path / "resume"
    first = build(teacher, examples, out)
    ids = [e["input_ids"] for e in examples]
    labels = [e["labels"] for e in examples]
    ref = first.gather(ids, labels, 12)
    mtimes = {name: (out / name).stat().st_mtime_ns for name in ("shard-00000.safetensors", "shard-00001.safetensors")}
    # simulate a kill while the last shard was being computed: no manifest, no last shard, a stray temp file
    (out / "manifest.json").unlink()
    (out / "shard-00002.safetensors").unlink()
    (out / ".shard-00002.safetensors.abc.tmp").write_bytes(b"partial")
    with pytest.raises(DistillmtError, match="manifest.json missing"):
        TeacherCache(out)
    calls = []
    handle = teacher.register_forward_hook(lambda *a: calls.append(1))
    try:
        second = build(teacher, examples, out)
    finally:
        handle.remove()
    assert len(calls) == 1  # only the last shard (one example) was recomputed
    for name, mtime in mtimes.items():
        assert (out / name).stat().st_mtime_ns == mtime
    assert (out / "shard-00002.safetensors").exists()
    assert not (out / ".shard-00002.safetensors.abc.tmp").exists()
    assert json.loads((out / "manifest.json").read_text())["reused_shards"] == 2
    got = second.gather(ids, labels, 12)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    # a finished cache with the same settings is returned as is, without running the teacher
    handle = teacher.register_forward_hook(lambda *a: calls.append(1))
    try:
        build(teacher, examples, out)
    finally:
        handle.remove()
    assert len(calls) == 1


def test_folder_with_other_cache_needs_overwrite(built, teacher, examples, tmp_path):
    out = tmp_path / "other"
    shutil.copytree(built.out_dir, out)
    with pytest.raises(DistillmtError, match="already holds a teacher cache"):
        build(teacher, examples, out, k=4)
    cache = build(teacher, examples, out, k=4, overwrite=True)
    assert cache.k == 4
    cache.check(teacher_id=TEACHER_ID, k=4, temperature=2.0, vocab_size=VOCAB, examples=examples)


def test_missing_or_incomplete_manifest(built, tmp_path):
    with pytest.raises(DistillmtError, match="manifest.json missing"):
        TeacherCache(tmp_path)
    out = tmp_path / "copy"
    shutil.copytree(built.out_dir, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["complete"] = False
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DistillmtError, match="incomplete"):
        TeacherCache(out)
    manifest["complete"] = True
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "shard-00001.safetensors").unlink()
    with pytest.raises(DistillmtError, match="missing shard-00001"):
        TeacherCache(out)


def test_build_validates_arguments(teacher, examples, tmp_path):
    with pytest.raises(DistillmtError, match="k must be"):
        build(teacher, examples, tmp_path / "a", k=VOCAB + 1)
    with pytest.raises(DistillmtError, match="differ in length"):
        build(teacher, [{"input_ids": [1, 2, 3], "labels": [-100, 2]}], tmp_path / "b")
    with pytest.raises(DistillmtError, match="logits per token"):
        build(teacher, examples, tmp_path / "c", vocab_size=VOCAB + 8)


def test_shared_prompt_prefix_is_computed_once_and_changes_nothing(teacher, examples, tmp_path, monkeypatch):
    """Examples that share a 10-token prompt prefix: the teacher skips it after computing it once, and the cached
    top-k equals a build that runs the teacher over the whole rows."""
    import distillmt.logit_cache as logit_cache

    prefix = list(range(1, 11))
    prefixed = [{"input_ids": prefix + e["input_ids"], "labels": [-100] * 10 + e["labels"]} for e in examples]
    calls = []
    real_past = logit_cache.PrefixCache.past

    def counting_past(self, model, input_ids):
        out = real_past(self, model, input_ids)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(logit_cache.PrefixCache, "past", counting_past)
    with_prefix = build(teacher, prefixed, tmp_path / "prefix", k=VOCAB)
    assert calls and all(calls)  # every batch ran after the cached prefix
    monkeypatch.setattr(logit_cache, "shared_prefix", lambda _examples: [])
    whole = build(teacher, prefixed, tmp_path / "whole", k=VOCAB)
    args = (
        [e["input_ids"] for e in prefixed],
        [e["labels"] for e in prefixed],
        max(len(e["input_ids"]) for e in prefixed),
    )
    (lp_a, idx_a), (lp_b, idx_b) = with_prefix.gather(*args), whole.gather(*args)
    assert torch.allclose(lp_a.float(), lp_b.float(), atol=2e-3)
    mask = lp_b.float() > -10  # ties among tiny probabilities may order differently
    assert torch.equal(idx_a[mask], idx_b[mask])
