"""bf16 on a CPU: training batches and output-layer rows rounded up to a few shapes (oneDNN builds a kernel per
shape), with the same logits, loss and gradients as unrounded ones; fp32 left alone; oneDNN's kernel cache sized."""

import os

import pytest
import torch
from conftest import build_tiny_qwen, random_examples

from distillmt import engines
from distillmt.forward import (
    BF16_ROWS_MULTIPLE,
    BF16_WIDTH_MULTIPLE,
    bf16_on_cpu,
    target_logits,
    target_positions,
    width_multiple,
)
from distillmt.prompts import IGNORE_INDEX, pad_batch
from distillmt.sections import TrainConfig
from distillmt.train import _ce_sum, evaluate_loss, train

VOCAB = 40


def tiny(seed: int = 0, dtype: torch.dtype = torch.float32):
    return build_tiny_qwen(VOCAB, hidden_size=16, seed=seed, pad_token_id=0).to(dtype)


@pytest.mark.unit
def test_pad_batch_rounds_the_width_up_and_masks_the_extra_columns():
    ex = random_examples(3)
    longest = max(len(e["input_ids"]) for e in ex)
    plain, rounded = pad_batch(ex, 0), pad_batch(ex, 0, multiple_of=16)
    assert plain["input_ids"].shape[1] == longest
    assert rounded["input_ids"].shape[1] == -(-longest // 16) * 16 > longest
    extra = rounded["labels"][:, longest:]
    assert (extra == IGNORE_INDEX).all() and (rounded["attention_mask"][:, longest:] == 0).all()
    for k in plain:
        assert torch.equal(rounded[k][:, :longest], plain[k])


@pytest.mark.unit
def test_width_multiple_only_where_a_model_runs_in_bf16_on_the_cpu():
    fp32, bf16 = tiny(), tiny(dtype=torch.bfloat16)
    assert width_multiple(fp32) == 1
    assert width_multiple(fp32, autocast_bf16=True) == BF16_WIDTH_MULTIPLE
    assert width_multiple(fp32, bf16) == BF16_WIDTH_MULTIPLE  # an fp32 student with a bf16 live teacher
    assert width_multiple(fp32, None) == 1
    w = torch.zeros(2, 2)
    assert not bf16_on_cpu(w) and bf16_on_cpu(w.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert bf16_on_cpu(w)


@pytest.mark.unit
def test_rounded_rows_give_the_same_target_logits_and_gradients_under_bf16():
    """Under CPU bf16 autocast the output layer gets its target rows padded to a multiple of BF16_ROWS_MULTIPLE;
    what comes back is exactly the target rows, equal to the full forward's, and gradients match."""
    ex = random_examples(5)
    batch = pad_batch(ex, 0)
    rows = target_positions(batch["labels"])
    n = int(rows.sum())
    assert n % BF16_ROWS_MULTIPLE  # the rows really get padded
    a, b = tiny(seed=2), tiny(seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = target_logits(a, batch, rows)
        full = b(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[rows]
    assert got.shape == (n, VOCAB)
    assert torch.equal(got, full)
    got.float().sum().backward()
    full.float().sum().backward()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-3, rtol=1e-2)


@pytest.mark.unit
def test_a_wider_batch_gives_the_same_validation_loss():
    model, valid = tiny(seed=4), random_examples(9, seed=5)
    plain = evaluate_loss(model, valid, pad_token_id=0, batch_size=4, device="cpu")
    wide = evaluate_loss(model, valid, pad_token_id=0, batch_size=4, device="cpu", multiple_of=32)
    assert wide == pytest.approx(plain, rel=1e-5)
    batch = pad_batch(valid[:4], 0, multiple_of=32)
    rows = target_positions(batch["labels"])
    ce = _ce_sum(target_logits(model, batch, rows), batch["labels"][:, 1:][batch["labels"][:, 1:] != IGNORE_INDEX])
    assert torch.isfinite(ce)


def test_bf16_training_rounds_its_batches_and_fp32_training_does_not(tmp_path, monkeypatch):
    import distillmt.train as train_mod

    widths: dict[str, set[int]] = {"no": set(), "bf16": set()}
    real = train_mod.pad_batch
    for precision in widths:

        def spy(examples, pad, multiple_of=1, _seen=widths[precision]):
            out = real(examples, pad, multiple_of)
            _seen.add(out["input_ids"].shape[1])
            return out

        monkeypatch.setattr(train_mod, "pad_batch", spy)
        cfg = TrainConfig(max_steps=3, batch_size=4, save_every=0, mixed_precision=precision)
        summary = train(tiny(), random_examples(12), random_examples(4, seed=9), tmp_path / precision, cfg,
                        pad_token_id=0, progress=False, device="cpu")  # fmt: skip
        assert summary["steps"] == 3
    assert all(w % BF16_WIDTH_MULTIPLE == 0 for w in widths["bf16"])
    assert any(w % BF16_WIDTH_MULTIPLE for w in widths["no"])  # fp32 batches keep their own lengths


@pytest.mark.unit
def test_configure_cpu_sizes_onednn_cache_unless_the_user_did(monkeypatch):
    threads = torch.get_num_threads()
    try:
        monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
        engines.configure_cpu(1)
        assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(engines.ONEDNN_CACHE_CAPACITY)
        assert torch.get_num_threads() == 1
        monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "77")
        engines.configure_cpu(1)
        assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "77"
    finally:
        torch.set_num_threads(threads)
