"""Tests for distillmt.losses: reference values are computed independently with plain Python floats and loops."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from distillmt.losses import DIVERGENCES, divergence, kd_loss, shift_for_causal, topk_kd_loss

pytestmark = pytest.mark.unit

KINDS = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.3), ("skew_kl", 0.1), ("tvd", 0.5)]

# 2 x 3 x 4 logits as plain lists (the hand-computed references read these, never the tensors)
S_LIST = [
    [[0.5, -1.0, 2.0, 0.0], [1.5, 0.2, -0.3, 0.7], [0.0, 0.0, 1.0, -2.0]],
    [[-0.5, 0.3, 0.8, 1.2], [2.2, -1.1, 0.4, 0.0], [0.9, 0.1, -0.6, 0.3]],
]
T_LIST = [
    [[1.0, 0.0, 1.5, -0.5], [0.3, 0.9, -1.2, 0.4], [2.0, -1.0, 0.0, 0.5]],
    [[0.0, 0.0, 0.0, 3.0], [1.0, -0.5, 1.1, 0.2], [-0.3, 0.6, 0.2, 1.4]],
]
# sequence 0: both later positions are targets; sequence 1: only position 2 (unequal counts per sequence)
LABELS_LIST = [[-100, 2, 0], [-100, -100, 3]]


# ---------------------------------------------------------------------------------------------------- references


def py_softmax(row: list[float], temp: float = 1.0) -> list[float]:
    xs = [x / temp for x in row]
    mx = max(xs)
    es = [math.exp(x - mx) for x in xs]
    z = sum(es)
    return [e / z for e in es]


def py_kl(p: list[float], q: list[float]) -> float:
    total = 0.0
    for pi, qi in zip(p, q, strict=True):
        if pi > 0:
            total += pi * (math.log(pi) - math.log(qi))
    return total


def py_div(p: list[float], q: list[float], kind: str, beta: float) -> float:
    if kind == "forward_kl":
        return py_kl(p, q)
    if kind == "reverse_kl":
        return py_kl(q, p)
    if kind == "tvd":
        return 0.5 * sum(abs(pi - qi) for pi, qi in zip(p, q, strict=True))
    if kind == "jsd":
        if beta == 0:
            return py_kl(p, q)
        if beta == 1:
            return py_kl(q, p)
        m = [beta * pi + (1 - beta) * qi for pi, qi in zip(p, q, strict=True)]
        return beta * py_kl(p, m) + (1 - beta) * py_kl(q, m)
    if kind == "skew_kl":
        m = [beta * pi + (1 - beta) * qi for pi, qi in zip(p, q, strict=True)]
        return py_kl(p, m)
    raise AssertionError(kind)


def py_loss(s_list, t_list, labels_list, kind, beta, temp=1.0) -> float:
    total, count = 0.0, 0
    for b in range(len(labels_list)):
        for t in range(len(labels_list[b]) - 1):
            if labels_list[b][t + 1] == -100:
                continue
            total += py_div(py_softmax(t_list[b][t], temp), py_softmax(s_list[b][t], temp), kind, beta)
            count += 1
    return total / count


def kd_term(*args, **kwargs) -> torch.Tensor:
    """The divergence term of :func:`kd_loss` (what training weights by (1 - alpha)·T²)."""
    return kd_loss(*args, **kwargs)["kd"]


def topk_term(*args, **kwargs) -> torch.Tensor:
    return topk_kd_loss(*args, **kwargs)["kd"]


def tensors(requires_grad: bool = False):
    s = torch.tensor(S_LIST, dtype=torch.float32, requires_grad=requires_grad)
    t = torch.tensor(T_LIST, dtype=torch.float32)
    lab = torch.tensor(LABELS_LIST)
    return s, t, lab


def random_batch(seed: int = 0, b: int = 3, t: int = 7, v: int = 11, scale: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(b, t, v, generator=g) * scale).requires_grad_(True)
    te = torch.randn(b, t, v, generator=g) * scale
    lab = torch.randint(0, v, (b, t), generator=g)
    lab[:, :2] = -100  # prompt
    lab[0, -2:] = -100  # padding
    lab[1, 3] = -100
    return s, te, lab


# ---------------------------------------------------------------------------------------------------- divergence


def test_shift_for_causal():
    logits = torch.arange(2 * 3 * 4).reshape(2, 3, 4)
    labels = torch.tensor([[0, 1, 2], [3, 4, 5]])
    sl, ll = shift_for_causal(logits, labels)
    assert torch.equal(sl, logits[:, :2]) and torch.equal(ll, labels[:, 1:])


@pytest.mark.parametrize("kind,beta", KINDS + [("jsd", 0.0), ("jsd", 1.0), ("skew_kl", 0.0), ("skew_kl", 1.0)])
def test_divergence_of_identical_distributions_is_zero(kind, beta):
    logp = F.log_softmax(torch.randn(5, 9) * 3, dim=-1)
    assert torch.allclose(divergence(logp, logp, kind, beta), torch.zeros(5), atol=1e-6)
    s, t, lab = tensors()
    assert kd_term(s, s, lab, divergence=kind, beta=beta).abs().item() < 1e-6


@pytest.mark.parametrize("kind,beta", KINDS)
def test_divergence_per_token_matches_hand_computed(kind, beta):
    p = py_softmax(T_LIST[0][1])
    q = py_softmax(S_LIST[0][1])
    logp = torch.tensor([math.log(x) for x in p], dtype=torch.float64)[None]
    logq = torch.tensor([math.log(x) for x in q], dtype=torch.float64)[None]
    got = divergence(logp, logq, kind, beta)
    assert got.shape == (1,)
    assert got.item() == pytest.approx(py_div(p, q, kind, beta), rel=1e-9, abs=1e-12)


def test_every_list_of_divergence_names_agrees():
    import dataclasses

    from distillmt.sections import SoftKDConfig

    field = next(f for f in dataclasses.fields(SoftKDConfig) if f.name == "divergence")
    assert field.metadata["choices"] == list(DIVERGENCES)
    assert all(name in field.metadata["help"] for name in DIVERGENCES)
    assert {kind for kind, _ in KINDS} == set(DIVERGENCES)  # every divergence is tested against hand-computed values
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    assert all(f"`{name}`" in readme for name in DIVERGENCES)


def test_unknown_divergence_lists_allowed_names():
    s, t, lab = tensors()
    with pytest.raises(ValueError) as exc:
        kd_term(s, t, lab, divergence="kl")
    for name in DIVERGENCES:
        assert name in str(exc.value)
    with pytest.raises(ValueError):
        divergence(s, t, "wasserstein")
    with pytest.raises(ValueError):
        kd_term(s, t, lab, divergence="jsd", beta=1.5)


# ---------------------------------------------------------------------------------------------------- full loss


@pytest.mark.parametrize("temp", [1.0, 2.0])
@pytest.mark.parametrize("kind,beta", KINDS)
def test_kd_term_matches_hand_computed(kind, beta, temp):
    s, t, lab = tensors()
    got = kd_term(s, t, lab, divergence=kind, beta=beta, temperature=temp)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(py_loss(S_LIST, T_LIST, LABELS_LIST, kind, beta, temp), rel=1e-5, abs=1e-7)


def test_jsd_endpoints_are_forward_and_reverse_kl():
    s, t, lab = random_batch()
    fkl = kd_term(s, t, lab, divergence="forward_kl")
    rkl = kd_term(s, t, lab, divergence="reverse_kl")
    assert torch.equal(kd_term(s, t, lab, divergence="jsd", beta=0.0), fkl)
    assert torch.equal(kd_term(s, t, lab, divergence="jsd", beta=1.0), rkl)
    assert torch.equal(kd_term(s, t, lab, divergence="skew_kl", beta=0.0), fkl)
    assert not torch.allclose(fkl, rkl)
    # the interior of the JSD family stays below both KLs' mixture bound and is positive
    mid = kd_term(s, t, lab, divergence="jsd", beta=0.5)
    assert 0 < mid.item() <= math.log(2) + 1e-6


def test_forward_kl_agrees_with_torch_kl_div():
    s, t, lab = random_batch(seed=3)
    got = kd_term(s, t, lab, divergence="forward_kl", temperature=1.5)
    sl, ll = shift_for_causal(s, lab)
    mask = ll != -100
    q_log = F.log_softmax(sl[mask] / 1.5, dim=-1)
    p_log = F.log_softmax(t[:, :-1][mask] / 1.5, dim=-1)
    ref = F.kl_div(q_log, p_log, log_target=True, reduction="sum") / mask.sum()
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind,beta", KINDS)
def test_all_masked_batch_gives_exact_zero_and_backward_works(kind, beta):
    s, t, lab = random_batch()
    lab = torch.full_like(lab, -100)
    loss = kd_term(s, t, lab, divergence=kind, beta=beta)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))
    out = kd_loss(s, t, lab, divergence=kind, beta=beta)
    assert all(v.item() == 0.0 for v in out.values())
    (out["ce"] + out["kd"]).backward()
    idx = torch.zeros_like(t, dtype=torch.long)[..., :3]
    assert topk_term(s, t[..., :3], idx, lab, divergence=kind, beta=beta).item() == 0.0


@pytest.mark.parametrize("kind,beta", KINDS)
@pytest.mark.parametrize("scale", [2.0, 1e4])
def test_gradients_finite_and_only_into_student(kind, beta, scale):
    s, t, lab = random_batch(seed=5, scale=scale)
    t.requires_grad_(True)
    loss = kd_term(s, t, lab, divergence=kind, beta=beta, chunk_size=4)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    if scale < 100:  # at +-1e4 the softmax saturates and exact zero gradients are correct
        assert s.grad.abs().sum() > 0
    assert t.grad is None
    s.grad = None
    out = kd_loss(s, t, lab, divergence=kind, beta=beta, temperature=2.0, chunk_size=4)
    (0.5 * out["ce"] + 0.5 * 4.0 * out["kd"]).backward()
    assert torch.isfinite(s.grad).all() and t.grad is None


def test_temperature_scaling():
    s, t, lab = random_batch(seed=7)
    for kind, beta in KINDS:
        vals = [kd_term(s, t, lab, divergence=kind, beta=beta, temperature=x).item() for x in (1, 10, 1e4)]
        assert vals[0] > vals[1] > vals[2] and vals[2] < 1e-3  # KLs shrink like 1/T^2, TVD like 1/T
        # temperature T means softmax(logits / T)
        t2 = kd_term(s, t, lab, divergence=kind, beta=beta, temperature=2.0)
        ref = kd_term(s / 2, t / 2, lab, divergence=kind, beta=beta, temperature=1.0)
        t1 = kd_term(s, t, lab, divergence=kind, beta=beta, temperature=1.0)
        assert torch.allclose(t2, ref, rtol=1e-5)
        assert not torch.allclose(t1, t2)


@pytest.mark.parametrize("kind,beta", KINDS)
def test_chunked_equals_unchunked(kind, beta):
    s, t, lab = random_batch(seed=11)
    ref = kd_term(s, t, lab, divergence=kind, beta=beta, chunk_size=None)
    (ref_grad,) = torch.autograd.grad(ref, s)
    for cs in (1, 3, 1024):
        got = kd_term(s, t, lab, divergence=kind, beta=beta, chunk_size=cs)
        (grad,) = torch.autograd.grad(got, s)
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-7)
        assert torch.allclose(grad, ref_grad, rtol=1e-4, atol=1e-7)
    ref_kd = kd_loss(s, t, lab, divergence=kind, beta=beta, temperature=2.0, chunk_size=None)
    for cs in (1, 3):
        got_kd = kd_loss(s, t, lab, divergence=kind, beta=beta, temperature=2.0, chunk_size=cs)
        for key in ref_kd:
            assert torch.allclose(got_kd[key], ref_kd[key], rtol=1e-5, atol=1e-7)
    with torch.no_grad():  # the no-grad path (no checkpointing) gives the same value
        assert torch.allclose(kd_term(s, t, lab, divergence=kind, beta=beta, chunk_size=2), ref, rtol=1e-5)


@pytest.mark.parametrize("kind,beta", KINDS)
def test_padded_vocab_rows_are_ignored(kind, beta):
    s, t, lab = random_batch(seed=13)
    v = s.shape[-1]
    t_padded = torch.cat([t, torch.full(t.shape[:2] + (2,), 1e4)], dim=-1)
    ref = kd_term(s, t, lab, divergence=kind, beta=beta)
    assert torch.allclose(kd_term(s, t_padded, lab, divergence=kind, beta=beta, vocab_size=v), ref)
    assert torch.allclose(kd_term(s, t_padded, lab, divergence=kind, beta=beta), ref)  # default: min
    s_padded = torch.cat([s.detach(), torch.full(s.shape[:2] + (3,), 50.0)], dim=-1)
    assert torch.allclose(kd_term(s_padded, t_padded, lab, divergence=kind, beta=beta, vocab_size=v), ref)
    out = kd_loss(s_padded, t_padded, lab, divergence=kind, beta=beta, vocab_size=v)
    assert torch.allclose(out["kd"], ref)
    with pytest.raises(ValueError):
        kd_term(s, t_padded, lab, vocab_size=v + 1)


@pytest.mark.parametrize("kind,beta", KINDS)
def test_masked_positions_do_not_affect_the_loss(kind, beta):
    s, t, lab = random_batch(seed=17)
    # positions whose prediction is not a target: t where labels[:, t + 1] is masked, and the last position
    not_target = torch.ones_like(lab, dtype=torch.bool)
    not_target[:, :-1] = lab[:, 1:] == -100
    s2 = s.detach().clone()
    t2 = t.clone()
    s2[not_target] = torch.randn_like(s2[not_target]) * 100
    t2[not_target] = torch.randn_like(t2[not_target]) * 100
    ref = kd_term(s, t, lab, divergence=kind, beta=beta)
    assert torch.allclose(kd_term(s2, t2, lab, divergence=kind, beta=beta), ref)
    ref_kd = kd_loss(s, t, lab, divergence=kind, beta=beta)
    got_kd = kd_loss(s2, t2, lab, divergence=kind, beta=beta)
    for key in ref_kd:
        assert torch.allclose(got_kd[key], ref_kd[key])


def test_every_target_token_has_equal_weight():
    s, t, lab = tensors()
    got = kd_term(s, t, lab).item()
    # 3 target tokens: (0, pos 0), (0, pos 1), (1, pos 1); the per-sequence mean would weigh them 1/4, 1/4, 1/2
    per = [py_kl(py_softmax(T_LIST[b][i]), py_softmax(S_LIST[b][i])) for b, i in ((0, 0), (0, 1), (1, 1))]
    assert got == pytest.approx(sum(per) / 3, rel=1e-5)
    assert got != pytest.approx((per[0] + per[1]) / 4 + per[2] / 2, rel=1e-3)


# ---------------------------------------------------------------------------------------------------- kd_loss


def test_kd_loss_ce_is_cross_entropy():
    s, t, lab = random_batch(seed=19)
    out = kd_loss(s, t, lab, temperature=3.0)
    sl, ll = shift_for_causal(s, lab)
    ref = F.cross_entropy(sl.reshape(-1, sl.shape[-1]), ll.reshape(-1), ignore_index=-100)
    assert set(out) == {"ce", "kd", "forward_kl"}  # the objective is mixed in one place: train.loss_step
    assert torch.allclose(out["ce"], ref, rtol=1e-5)
    # hand-computed CE on the 2x3x4 example
    s0, t0, lab0 = tensors()
    ce = kd_loss(s0, t0, lab0)["ce"].item()
    nll = [-math.log(py_softmax(S_LIST[b][i])[LABELS_LIST[b][i + 1]]) for b, i in ((0, 0), (0, 1), (1, 1))]
    assert ce == pytest.approx(sum(nll) / 3, rel=1e-5)


def test_kd_loss_terms_and_metrics():
    s, t, lab = random_batch(seed=23)
    out = kd_loss(s, t, lab, temperature=2.0, divergence="jsd", beta=0.5)
    assert out["kd"].item() == pytest.approx(
        py_loss(s.tolist(), t.tolist(), lab.tolist(), "jsd", 0.5, temp=2.0), rel=1e-5
    )
    fkl = py_loss(s.tolist(), t.tolist(), lab.tolist(), "forward_kl", 0.5, temp=1.0)
    assert out["forward_kl"].item() == pytest.approx(fkl, rel=1e-5) and not out["forward_kl"].requires_grad


def test_bf16_inputs_are_computed_in_fp32():
    s, t, lab = random_batch(seed=29)
    ref = kd_term(s.detach().bfloat16().float(), t.bfloat16().float(), lab)
    got = kd_term(s.detach().bfloat16(), t.bfloat16(), lab)
    assert got.dtype == torch.float32
    assert torch.allclose(got, ref, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------- top-k


def _aligned_topk(t: torch.Tensor, k: int, temp: float):
    """Teacher top-k log-probs at temperature temp, aligned with labels (position t predicts labels[:, t])."""
    lp = F.log_softmax(t / temp, dim=-1)
    vals, idx = lp.topk(k, dim=-1)
    aligned_vals = torch.zeros_like(vals)
    aligned_idx = torch.zeros_like(idx)
    aligned_vals[:, 1:] = vals[:, :-1]
    aligned_idx[:, 1:] = idx[:, :-1]
    return aligned_vals, aligned_idx


@pytest.mark.parametrize("temp", [1.0, 2.0])
@pytest.mark.parametrize("kind,beta", KINDS)
def test_topk_with_full_vocab_equals_online_kd(kind, beta, temp):
    s, t, lab = random_batch(seed=31)
    vals, idx = _aligned_topk(t, t.shape[-1], temp)
    ref = kd_term(s, t, lab, divergence=kind, beta=beta, temperature=temp)
    (ref_grad,) = torch.autograd.grad(ref, s)
    for cs in (None, 2):
        got = topk_term(s, vals, idx, lab, divergence=kind, beta=beta, temperature=temp, chunk_size=cs)
        (grad,) = torch.autograd.grad(got, s)
        assert torch.allclose(got, ref, rtol=1e-4, atol=1e-5)
        assert torch.allclose(grad, ref_grad, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("kind,beta", KINDS)
def test_padded_student_gives_same_ce_and_divergence_online_and_cached(kind, beta):
    """A student whose embedding matrix is padded (more logit columns than tokens): the cached path with k equal to
    the real vocabulary renormalises over the same columns as the online path, so CE and D agree."""
    s, t, lab = random_batch(seed=43)
    v = t.shape[-1]
    junk = torch.full((*s.shape[:2], 5), 4.0)  # padding rows with real mass, as an untrained padded head has
    s_padded = torch.cat([s.detach(), junk], dim=-1).requires_grad_(True)
    vals, idx = _aligned_topk(t, v, 2.0)
    online = kd_loss(s_padded, t, lab, divergence=kind, beta=beta, temperature=2.0, vocab_size=v)
    cached = topk_kd_loss(s_padded, vals, idx, lab, divergence=kind, beta=beta, temperature=2.0, vocab_size=v)
    assert torch.allclose(cached["ce"], online["ce"], rtol=1e-6)
    assert torch.allclose(cached["kd"], online["kd"], rtol=1e-4, atol=1e-5)
    # without vocab_size the padded columns would count: CE differs (the bug this guards against)
    assert not torch.allclose(topk_kd_loss(s_padded, vals, idx, lab)["ce"], online["ce"], rtol=1e-3)


def test_topk_is_a_lower_bound_that_grows_with_k():
    s, t, lab = random_batch(seed=37, v=16)
    full = kd_term(s, t, lab).item()
    values = []
    for k in (1, 2, 4, 8, 16):
        vals, idx = _aligned_topk(t, k, 1.0)
        loss = topk_term(s, vals, idx, lab)
        assert torch.isfinite(loss)
        values.append(loss.item())
    assert all(a <= b + 1e-6 for a, b in zip(values, values[1:], strict=False))
    assert 0 <= values[0] and values[-1] == pytest.approx(full, rel=1e-4)


def test_topk_hand_computed_buckets():
    # one target token, k = 2: buckets {2, 0, rest}
    s = torch.tensor([[S_LIST[0][0], S_LIST[0][1]]], requires_grad=True)
    lab = torch.tensor([[-100, 1]])
    p = py_softmax(T_LIST[0][0])
    q = py_softmax(S_LIST[0][0])
    top = sorted(range(4), key=lambda i: -p[i])[:2]
    vals = torch.zeros(1, 2, 2)
    idx = torch.zeros(1, 2, 2, dtype=torch.long)
    vals[0, 1] = torch.tensor([math.log(p[i]) for i in top])
    idx[0, 1] = torch.tensor(top)
    pb = [p[i] for i in top] + [1 - sum(p[i] for i in top)]
    qb = [q[i] for i in top] + [1 - sum(q[i] for i in top)]
    for kind, beta in KINDS:
        got = topk_term(s, vals, idx, lab, divergence=kind, beta=beta)
        assert got.item() == pytest.approx(py_div(pb, qb, kind, beta), rel=1e-5, abs=1e-7)


def test_topk_shape_and_index_errors():
    s, t, lab = random_batch()
    vals, idx = _aligned_topk(t, 3, 1.0)
    with pytest.raises(ValueError):
        topk_term(s, vals, idx[..., :2], lab)
    with pytest.raises(ValueError):
        topk_term(s, vals, idx + 100, lab)


def _trl_generalized_jsd(student_logits, teacher_logits, labels, beta, temperature):
    """TRL's GKDTrainer.generalized_jsd_loss (trl/experimental/gkd/gkd_trainer.py) transcribed, on shifted inputs."""
    s = F.log_softmax(student_logits / temperature, dim=-1)
    t = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        jsd = F.kl_div(s, t, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(t, s, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta)
        m = torch.logsumexp(torch.stack([s + torch.log(1 - b), t + torch.log(b)]), dim=0)
        jsd = b * F.kl_div(m, t, reduction="none", log_target=True)
        jsd = jsd + (1 - b) * F.kl_div(m, s, reduction="none", log_target=True)
    mask = labels != -100
    return jsd[mask].sum() / mask.sum()


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_jsd_matches_trl_generalized_jsd(beta):
    s, t, lab = random_batch(seed=41)
    got = kd_term(s, t, lab, divergence="jsd", beta=beta, temperature=2.0)
    ref = _trl_generalized_jsd(s[:, :-1], t[:, :-1], lab[:, 1:], beta, 2.0)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------------- fused


@pytest.mark.parametrize("kind,beta", KINDS + [("jsd", 0.0), ("jsd", 1.0), ("skew_kl", 0.0), ("skew_kl", 1.0)])
@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_fused_loss_and_gradient_equal_autograd(kind, beta, temp):
    """The closed-form gradient of fused_kd_loss is the one autograd finds through kd_loss, for every divergence."""
    from distillmt.losses import fused_kd_loss

    s, t, lab = random_batch(seed=47)
    ref = kd_loss(s, t, lab, divergence=kind, beta=beta, temperature=temp)
    w_ce, w_kd = 0.3, 0.7 * temp**2
    (ref_grad,) = torch.autograd.grad(w_ce * ref["ce"] + w_kd * ref["kd"], s)
    for cs in (None, 3):
        out = fused_kd_loss(
            s, t, lab, ce_weight=w_ce, kd_weight=w_kd, divergence=kind, beta=beta, temperature=temp, chunk_size=cs
        )
        (grad,) = torch.autograd.grad(out["loss"], s)
        for key in ("ce", "kd", "forward_kl"):
            assert torch.allclose(out[key], ref[key], rtol=1e-5, atol=1e-7), key
        assert torch.allclose(out["loss"], w_ce * ref["ce"] + w_kd * ref["kd"], rtol=1e-5)
        assert torch.allclose(grad, ref_grad, rtol=1e-4, atol=1e-7)


def test_fused_loss_padded_vocab_masking_bf16_and_empty():
    from distillmt.losses import fused_kd_loss

    s, t, lab = random_batch(seed=53)
    v = t.shape[-1]
    s_padded = torch.cat([s.detach(), torch.full((*s.shape[:2], 3), 5.0)], -1).requires_grad_(True)
    ref = kd_loss(s_padded, t, lab, temperature=2.0, vocab_size=v)
    (ref_grad,) = torch.autograd.grad(0.5 * ref["ce"] + 2.0 * ref["kd"], s_padded)
    out = fused_kd_loss(s_padded, t, lab, ce_weight=0.5, kd_weight=2.0, temperature=2.0, vocab_size=v)
    (grad,) = torch.autograd.grad(out["loss"], s_padded)
    assert torch.allclose(grad, ref_grad, rtol=1e-4, atol=1e-7) and grad[..., v:].abs().sum() == 0
    low = s.detach().bfloat16().requires_grad_(True)
    out = fused_kd_loss(low, t.bfloat16(), lab, ce_weight=0.5, kd_weight=0.5)
    (grad,) = torch.autograd.grad(out["loss"], low)
    assert out["loss"].dtype == torch.float32 and grad.dtype == torch.bfloat16
    ref = kd_loss(low.detach().float().requires_grad_(True), t.bfloat16().float(), lab)
    assert torch.allclose(out["loss"], 0.5 * ref["ce"] + 0.5 * ref["kd"], rtol=1e-5)
    empty = fused_kd_loss(s, t, torch.full_like(lab, -100), ce_weight=1.0, kd_weight=1.0)
    assert empty["loss"].item() == 0.0
    empty["loss"].backward()


# ---------------------------------------------------------------------------------------------------- target rows


@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)])
def test_target_rows_layout_equals_the_full_layout(kind, beta):
    """Passing only the target rows ([N, V] logits, [N] ids), as training does, gives the same terms and, at those
    rows, the same gradient as the full [B, T, V] layout, for all three loss functions."""
    from distillmt.losses import fused_kd_loss

    s, t, lab = random_batch(seed=59)
    mask = lab[:, 1:] != -100
    s_rows = s.detach()[:, :-1][mask].requires_grad_(True)
    t_rows, ids = t[:, :-1][mask], lab[:, 1:][mask]
    args = {"divergence": kind, "beta": beta, "temperature": 2.0, "chunk_size": 3}
    full, rows = kd_loss(s, t, lab, **args), kd_loss(s_rows, t_rows, ids, **args)
    (g_full,) = torch.autograd.grad(full["ce"] + full["kd"], s)
    (g_rows,) = torch.autograd.grad(rows["ce"] + rows["kd"], s_rows)
    for key in ("ce", "kd", "forward_kl"):
        assert torch.allclose(rows[key], full[key], rtol=1e-6), key
    assert torch.allclose(g_rows, g_full[:, :-1][mask], atol=1e-7) and g_full[:, :-1][~mask].abs().sum() == 0
    fused_full = fused_kd_loss(s, t, lab, ce_weight=0.3, kd_weight=1.2, **args)
    fused_rows = fused_kd_loss(s_rows, t_rows, ids, ce_weight=0.3, kd_weight=1.2, **args)
    assert torch.allclose(fused_rows["loss"], fused_full["loss"], rtol=1e-6)
    # the cache is aligned with the labels: row r of the top-k predicts ids[r]
    lp, idx = F.log_softmax(t / 2.0, -1).topk(4, dim=-1)
    lp_lab, idx_lab = torch.zeros_like(lp), torch.zeros_like(idx)
    lp_lab[:, 1:], idx_lab[:, 1:] = lp[:, :-1], idx[:, :-1]
    topk_full = topk_kd_loss(s, lp_lab, idx_lab, lab, **args)
    topk_rows = topk_kd_loss(s_rows, lp[:, :-1][mask], idx[:, :-1][mask], ids, **args)
    for key in ("ce", "kd"):
        assert torch.allclose(topk_rows[key], topk_full[key], rtol=1e-6), key


def test_target_rows_layout_shape_errors():
    s = torch.zeros(5, 7)
    with pytest.raises(ValueError, match=r"labels must be \[N\] = \(5,\)"):
        kd_loss(s, s, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"teacher_logits must be \[N, \*\]"):
        kd_loss(s, torch.zeros(4, 7), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="target rows"):
        kd_loss(torch.zeros(7), torch.zeros(7), torch.zeros((), dtype=torch.long))


# ---------------------------------------------------------------------------------------------------- fused linear


@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("tvd", 0.5)])
@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_fused_linear_equals_autograd_through_the_output_layer(kind, beta, temp):
    """Logits computed chunk by chunk from hidden states give kd_loss's terms, and the gradient autograd finds for
    the hidden states and the output weight through `h @ W.T` and kd_loss."""
    from distillmt.losses import fused_linear_kd_loss

    g = torch.Generator().manual_seed(61)
    n, hs, ht, v = 9, 5, 7, 13
    h_s = torch.randn(n, hs, generator=g).requires_grad_(True)
    w_s = torch.randn(v + 2, hs, generator=g).requires_grad_(True)  # 2 padding rows: ignored
    h_t, w_t = torch.randn(n, ht, generator=g), torch.randn(v, ht, generator=g)
    ids = torch.randint(0, v, (n,), generator=g)
    ref = kd_loss(h_s @ w_s.T, h_t @ w_t.T, ids, divergence=kind, beta=beta, temperature=temp, vocab_size=v)
    (rg_h, rg_w) = torch.autograd.grad(0.3 * ref["ce"] + 0.7 * temp**2 * ref["kd"], (h_s, w_s))
    for cs in (None, 4):
        out = fused_linear_kd_loss(
            h_s, w_s, h_t, w_t, ids, ce_weight=0.3, kd_weight=0.7 * temp**2, divergence=kind, beta=beta,
            temperature=temp, chunk_size=cs, vocab_size=v,
        )  # fmt: skip
        for key in ("ce", "kd", "forward_kl"):
            assert torch.allclose(out[key], ref[key], rtol=1e-5, atol=1e-7), key
        g_h, g_w = torch.autograd.grad(out["loss"] * 2.0, (h_s, w_s))  # an incoming gradient scales both
        assert torch.allclose(g_h, 2 * rg_h, rtol=1e-4, atol=1e-6)
        assert torch.allclose(g_w, 2 * rg_w, rtol=1e-4, atol=1e-6) and g_w[v:].abs().sum() == 0


def test_fused_linear_frozen_weight_empty_rows_and_errors():
    from distillmt.losses import fused_linear_kd_loss, rows_per_chunk

    h_s, w = torch.randn(4, 3).requires_grad_(True), torch.randn(6, 3)
    out = fused_linear_kd_loss(h_s, w, h_s.detach(), w, torch.tensor([0, 1, 2, 5]), ce_weight=0.0, kd_weight=1.0)
    assert out["kd"].item() == pytest.approx(0.0, abs=1e-6)  # the student is its own teacher
    (g_h,) = torch.autograd.grad(out["loss"], h_s)
    assert g_h.abs().max() < 1e-6  # and D's gradient vanishes there
    empty = fused_linear_kd_loss(
        h_s[:0], w, h_s[:0].detach(), w, torch.zeros(0, dtype=torch.long), ce_weight=1, kd_weight=1
    )
    assert empty["loss"].item() == 0.0
    empty["loss"].backward()
    with pytest.raises(ValueError, match="must be in"):
        fused_linear_kd_loss(h_s, w, h_s.detach(), w, torch.tensor([0, 1, 2, 6]), ce_weight=1, kd_weight=1)
    with pytest.raises(ValueError, match=r"\[V, H\]"):
        fused_linear_kd_loss(h_s, w[:, :2], h_s.detach(), w, torch.tensor([0, 1, 2, 3]), ce_weight=1, kd_weight=1)
    assert (
        rows_per_chunk(151936, 1024) == 110 and rows_per_chunk(4000, 1024) == 1024 and rows_per_chunk(9, None) is None
    )
