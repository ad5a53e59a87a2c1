"""Tests for distillmt.losses.uld_loss (Universal Logit Distillation): hand-computed values on tiny vocabularies,
its identities, alignment and masking, layouts, chunking and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from distillmt.losses import aligned_rows, uld_loss

pytestmark = pytest.mark.unit


def py_softmax(row: list[float], temp: float = 1.0) -> list[float]:
    es = [math.exp(x / temp) for x in row]
    return [e / sum(es) for e in es]


def py_uld(p: list[float], q: list[float]) -> float:
    """Sorted in decreasing order, the shorter padded with zeros, L1 distance: written out with plain floats."""
    p, q = sorted(p, reverse=True), sorted(q, reverse=True)
    width = max(len(p), len(q))
    p, q = p + [0.0] * (width - len(p)), q + [0.0] * (width - len(q))
    return sum(abs(a - b) for a, b in zip(p, q, strict=True))


def logits_of(probs: list[float]) -> list[float]:
    return [math.log(x) for x in probs]


def one_pair(student_probs: list[float], teacher_probs: list[float], **kw) -> float:
    s = torch.tensor([logits_of(student_probs)])
    t = torch.tensor([logits_of(teacher_probs)])
    mask = torch.tensor([[True]])
    return float(uld_loss(s, t, mask, mask, **kw)["uld"])


def test_hand_computed_value_with_different_vocabularies():
    # teacher sorted: .6 .2 .1 .1; student sorted: .5 .3 .2 (0): |.1| + |.1| + |.1| + .1 = 0.4
    assert one_pair([0.5, 0.3, 0.2], [0.1, 0.6, 0.1, 0.2]) == pytest.approx(0.4, abs=1e-6)
    # the same pair the other way round: the student's vocabulary is now the larger one
    assert one_pair([0.1, 0.6, 0.1, 0.2], [0.5, 0.3, 0.2]) == pytest.approx(0.4, abs=1e-6)
    # a sure student against a uniform teacher: |1 - .25| + 3 x .25
    assert one_pair([1 - 2e-9, 1e-9, 1e-9], [0.25] * 4) == pytest.approx(1.5, abs=1e-6)


# Two sequences, each side with its own length and number of target rows (the tokenizations differ)
S = [[[0.2, -1.0, 0.7], [1.3, 0.0, -0.4], [0.5, 0.5, -2.0], [0.9, 0.1, 0.3]],
     [[-0.6, 1.1, 0.0], [0.3, 0.3, 0.3], [2.0, -1.0, 0.4], [0.0, 0.8, -0.8]]]  # fmt: skip
T = [[[1.0, 0.0, -1.0, 0.5, 0.2], [0.1, 2.0, 0.3, -0.7, 0.0], [0.4, -0.2, 0.9, 1.1, -1.5]],
     [[0.0, 0.0, 0.0, 0.0, 2.5], [-1.2, 0.6, 0.6, 0.0, 0.3], [0.7, 0.2, -0.1, 1.6, 0.4]]]  # fmt: skip
S_MASK = [[False, True, True, False], [True, False, False, False]]  # 2 and 1 student targets
T_MASK = [
    [True, True, True],
    [False, True, True],
]  # 3 and 2 teacher targets: pairs (0,1)-(0,0), (0,2)-(0,1), (1,0)-(1,1)


def reference(temp: float) -> float:
    pairs = [((0, 1), (0, 0)), ((0, 2), (0, 1)), ((1, 0), (1, 1))]
    values = [py_uld(py_softmax(T[tb][tt], temp), py_softmax(S[sb][st], temp)) for (sb, st), (tb, tt) in pairs]
    return sum(values) / len(values)


@pytest.mark.parametrize("temp", [1.0, 2.0, 0.5])
def test_alignment_by_target_index_and_token_mean(temp):
    out = uld_loss(torch.tensor(S), torch.tensor(T), torch.tensor(S_MASK), torch.tensor(T_MASK), temperature=temp)
    assert out["aligned"] == 3
    assert out["uld"].dtype == torch.float32
    assert float(out["uld"]) == pytest.approx(reference(temp), abs=1e-6)


def test_rows_layout_equals_full_layout():
    s, t, sm, tm = torch.tensor(S), torch.tensor(T), torch.tensor(S_MASK), torch.tensor(T_MASK)
    full = uld_loss(s, t, sm, tm, temperature=2.0)["uld"]
    rows = uld_loss(s[sm], t[tm], sm, tm, temperature=2.0)["uld"]
    assert float(rows) == pytest.approx(float(full), abs=1e-7)


def test_aligned_rows_keeps_the_first_targets_of_each_sequence():
    mask = torch.tensor([[False, True, True, True], [True, False, True, False]])
    assert aligned_rows(mask, torch.tensor([2, 5])).tolist() == [True, True, False, True, True]


def random_logits(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * 2


def test_identical_distributions_give_zero():
    s = random_logits(2, 5, 11)
    mask = torch.ones(2, 5, dtype=torch.bool)
    assert float(uld_loss(s, s.clone(), mask, mask, temperature=2.0)["uld"]) == pytest.approx(0.0, abs=1e-7)


def test_a_permuted_vocabulary_gives_zero():
    s = random_logits(2, 5, 11)
    perm = torch.randperm(11, generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 5, dtype=torch.bool)
    assert float(uld_loss(s, s[..., perm], mask, mask)["uld"]) == pytest.approx(0.0, abs=1e-7)


def test_symmetric_in_student_and_teacher():
    s, t = random_logits(2, 4, 7, seed=1), random_logits(2, 4, 13, seed=2)
    mask = torch.ones(2, 4, dtype=torch.bool)
    forward = uld_loss(s, t, mask, mask, temperature=1.5)["uld"]
    backward = uld_loss(t, s, mask, mask, temperature=1.5)["uld"]
    assert float(forward) == pytest.approx(float(backward), abs=1e-7)
    assert 0.0 < float(forward) <= 2.0


def test_zero_probability_columns_and_padding_rows_change_nothing():
    s, t = random_logits(2, 4, 7, seed=1), random_logits(2, 4, 13, seed=2)
    mask = torch.ones(2, 4, dtype=torch.bool)
    base = float(uld_loss(s, t, mask, mask)["uld"])
    # zero probabilities appended to a vocabulary (logits of -inf)
    zeros = torch.full((2, 4, 9), float("-inf"))
    assert float(uld_loss(torch.cat([s, zeros], -1), t, mask, mask)["uld"]) == pytest.approx(base, abs=1e-7)
    assert float(uld_loss(s, torch.cat([t, zeros], -1), mask, mask)["uld"]) == pytest.approx(base, abs=1e-7)
    # padding rows of an embedding matrix (any logits) left out by the real vocabulary sizes
    s_pad, t_pad = torch.cat([s, random_logits(2, 4, 5, seed=4)], -1), torch.cat([t, random_logits(2, 4, 3)], -1)
    padded = uld_loss(s_pad, t_pad, mask, mask, student_vocab=7, teacher_vocab=13)["uld"]
    assert float(padded) == pytest.approx(base, abs=1e-7)


def test_masked_and_unaligned_positions_are_ignored():
    s, t = torch.tensor(S), torch.tensor(T)
    sm, tm = torch.tensor(S_MASK), torch.tensor(T_MASK)
    base = float(uld_loss(s, t, sm, tm)["uld"])
    s2, t2 = s.clone(), t.clone()
    s2[~sm] = 50.0  # positions that predict no target (prompt, padding)
    t2[~tm] = -50.0
    t2[0, 2] = 9.0  # the teacher's 3rd target of sequence 0 has no student counterpart
    t2[1, 2, 0] = 7.0  # ... nor its 2nd of sequence 1
    assert float(uld_loss(s2, t2, sm, tm)["uld"]) == pytest.approx(base, abs=1e-7)


def test_gradient_finite_reaches_aligned_student_rows_only():
    s = torch.tensor(S, requires_grad=True)
    t = torch.tensor(T, requires_grad=True)
    sm, tm = torch.tensor(S_MASK), torch.tensor(T_MASK)
    uld_loss(s, t, sm, tm, temperature=2.0)["uld"].backward()
    assert torch.isfinite(s.grad).all()
    assert t.grad is None  # the teacher is detached
    aligned = torch.zeros_like(sm)
    aligned[0, 1] = aligned[0, 2] = aligned[1, 0] = True
    assert (s.grad[~aligned] == 0).all()
    # (a row can get none: there every sorted student probability exceeds the teacher's, so the loss is
    # 1 − Σ p_top + Σ p_rest whatever the student does; (0, 1) is such a row here)
    assert s.grad[aligned].abs().sum() > 0


def test_gradient_descent_lowers_it():
    t = random_logits(3, 6, 17, seed=5)
    s = random_logits(3, 6, 9, seed=6).requires_grad_(True)
    mask = torch.ones(3, 6, dtype=torch.bool)
    opt = torch.optim.SGD([s], lr=5.0)
    first = None
    for _ in range(30):
        opt.zero_grad()
        loss = uld_loss(s, t, mask, mask)["uld"]
        first = float(loss.detach()) if first is None else first
        loss.backward()
        opt.step()
    assert float(uld_loss(s.detach(), t, mask, mask)["uld"]) < 0.5 * first


def test_chunking_gives_the_same_value_and_gradient():
    s1 = random_logits(2, 6, 10, seed=7).requires_grad_(True)
    s2 = s1.detach().clone().requires_grad_(True)
    t = random_logits(2, 6, 12, seed=8)
    mask = torch.ones(2, 6, dtype=torch.bool)
    one = uld_loss(s1, t, mask, mask, chunk_size=None)["uld"]
    chunked = uld_loss(s2, t, mask, mask, chunk_size=1)["uld"]
    one.backward()
    chunked.backward()
    assert float(chunked) == pytest.approx(float(one), abs=1e-6)
    assert torch.allclose(s1.grad, s2.grad, atol=1e-7)


def test_no_aligned_token_is_an_exact_zero_with_a_gradient_path():
    s = random_logits(1, 3, 5).requires_grad_(True)
    t = random_logits(1, 4, 6)
    out = uld_loss(s, t, torch.tensor([[False, True, True]]), torch.zeros(1, 4, dtype=torch.bool))
    assert out["aligned"] == 0 and float(out["uld"]) == 0.0
    out["uld"].backward()
    assert (s.grad == 0).all()


def test_bf16_logits_give_an_fp32_loss():
    s, t = random_logits(2, 4, 7, seed=1), random_logits(2, 4, 13, seed=2)
    mask = torch.ones(2, 4, dtype=torch.bool)
    exact = uld_loss(s, t, mask, mask)["uld"]
    low = uld_loss(s.bfloat16(), t.bfloat16(), mask, mask)["uld"]
    assert low.dtype == torch.float32
    assert float(low) == pytest.approx(float(exact), abs=2e-2)


def test_bad_shapes_are_refused():
    s, t = random_logits(2, 4, 7), random_logits(3, 4, 9)
    with pytest.raises(ValueError, match="same B"):
        uld_loss(s, t, torch.ones(2, 4, dtype=torch.bool), torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="rows"):
        uld_loss(s.reshape(8, 7), t[:2], torch.ones(2, 3, dtype=torch.bool), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="temperature"):
        mask = torch.ones(2, 4, dtype=torch.bool)
        uld_loss(s, t[:2], mask, mask, temperature=0.0)
