"""The training loop: gradient accumulation equals one big batch, resume equals an uninterrupted run, KD learns."""

import json

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import distillmt.train as train_mod
from distillmt.train import KDSettings, make_batches, train

VOCAB = 40


def tiny_model(seed: int = 0, hidden: int = 16) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    return Qwen2ForCausalLM(cfg)


def examples(n: int = 8, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = torch.randint(3, VOCAB, (3 + i % 3,), generator=g).tolist()
        t = torch.randint(3, VOCAB, (2 + i % 4,), generator=g).tolist() + [1]
        out.append({"input_ids": p + t, "labels": [-100] * len(p) + t})
    return out


def params(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


COMMON = dict(
    pad_token_id=0,
    lr=1e-2,
    warmup_ratio=0.0,
    schedule="constant",
    save_every=0,
    progress=False,
    device="cpu",
    weight_decay=0.0,
)


def test_make_batches_deterministic_and_complete():
    lengths = [5, 3, 8, 1, 9, 2, 7]
    a = make_batches(lengths, 3, seed=1, epoch=0)
    assert a == make_batches(lengths, 3, seed=1, epoch=0)
    assert a != make_batches(lengths, 3, seed=1, epoch=1) or a != make_batches(lengths, 3, seed=2, epoch=0)
    assert sorted(i for b in a for i in b) == list(range(len(lengths)))


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    # Sequences of different lengths: a mean of per-micro-batch means would differ from the token-weighted mean.
    ex = examples(8)
    big, acc = tiny_model(), tiny_model()
    train(big, ex, [], tmp_path / "a", max_steps=1, batch_size=8, grad_accum=1, max_grad_norm=0, **COMMON)
    train(acc, ex, [], tmp_path / "b", max_steps=1, batch_size=2, grad_accum=4, max_grad_norm=0, **COMMON)
    assert torch.allclose(params(big), params(acc), atol=1e-6)


def test_resume_after_interrupt_equals_uninterrupted_run(tmp_path, monkeypatch):
    ex = examples(12)
    straight = tiny_model()
    train(straight, ex, ex[:2], tmp_path / "straight", max_steps=6, batch_size=4, **COMMON)

    real_save = train_mod._save_checkpoint
    calls = {"n": 0}

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "_save_checkpoint", save_then_die)
    first = tiny_model()
    with pytest.raises(KeyboardInterrupt):
        train(first, ex, ex[:2], tmp_path / "resumed", max_steps=6, batch_size=4, **{**COMMON, "save_every": 3})
    monkeypatch.setattr(train_mod, "_save_checkpoint", real_save)
    assert (tmp_path / "resumed" / "checkpoints" / "step-0000003" / "state.json").exists()
    second = tiny_model(seed=123)  # a fresh process would start from other weights: the checkpoint must win
    summary = train(second, ex, ex[:2], tmp_path / "resumed", max_steps=6, batch_size=4, **{**COMMON, "save_every": 3})
    assert summary["resumed_from"] == "step-0000003"
    assert torch.allclose(params(straight), params(second), atol=1e-6)
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)  # no duplicated log lines after resume


def test_logit_kd_moves_student_towards_teacher(tmp_path):
    ex = examples(8)
    teacher = tiny_model(seed=5, hidden=32)
    student = tiny_model(seed=1)
    kd = KDSettings(
        alpha=0.0, temperature=1.0, divergence="forward_kl", beta=0.5, chunk_size=7, vocab_size=VOCAB, teacher=teacher
    )
    train(
        student,
        ex,
        [],
        tmp_path / "kd",
        max_steps=30,
        batch_size=8,
        log_every=1,
        kd=kd,
        **{k: v for k, v in COMMON.items() if k != "lr"},
        lr=3e-2,
    )
    logs = [json.loads(line) for line in (tmp_path / "kd" / "metrics.jsonl").read_text().splitlines()]
    fkl = [r["forward_kl"] for r in logs if "forward_kl" in r]
    assert fkl[-1] < 0.5 * fkl[0]


def test_on_policy_kd_runs_and_logs(tmp_path):
    ex = examples(4)
    kd = KDSettings(
        alpha=0.5,
        temperature=2.0,
        divergence="jsd",
        beta=0.5,
        chunk_size=64,
        vocab_size=VOCAB,
        teacher=tiny_model(seed=5),
        on_policy_prob=1.0,
        on_policy_max_new_tokens=4,
        end_token_id=1,
    )
    summary = train(tiny_model(), ex, [], tmp_path / "gkd", max_steps=2, batch_size=4, log_every=1, kd=kd, **COMMON)
    logs = [json.loads(line) for line in (tmp_path / "gkd" / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 2 and all(r["on_policy"] for r in logs if "on_policy" in r)
