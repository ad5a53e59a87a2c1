"""Distillation losses for causal LMs: pure functions over logits, fp32 inside, masked mean over target tokens.

One public function per job: :func:`divergence` (D between two distributions, per row), :func:`kd_loss` (the CE and
D terms of a micro-batch against an online teacher's full logits) and :func:`topk_kd_loss` (the same terms against
a teacher known through its cached top-k). Neither mixes them: the objective ``alpha·CE + (1 − alpha)·T²·D`` is
written once, in ``distillmt.train.loss_step``. Two faster forms of the online teacher's objective take its weights
and return its gradient in closed form (``soft_kd.fused``): :func:`fused_kd_loss` from the logits and
:func:`fused_linear_kd_loss` from the last hidden states and output weights, never holding the logits. Between
models whose tokenizers differ, :func:`uld_loss` (Universal Logit Distillation) compares the sorted distributions
of the i-th target tokens of each side's own tokenization.

Conventions used everywhere in this module:

* ``p`` is the **teacher** distribution, ``q`` the **student** distribution, both at temperature ``T``
  (``softmax(logits / T)``). Callers pass either the model's *raw* logits ``[B, T, V]`` and the *unshifted*
  labels ``[B, T]`` exactly as HF causal LMs take them (the loss functions do the causal shift themselves: logits
  at position ``t`` predict ``labels[:, t + 1]``), or only the **target rows**: logits ``[N, V]`` and the ids they
  predict ``[N]``, already aligned (what training passes, since it runs the output layer at target positions
  alone; see ``distillmt.train.target_logits``). Positions whose label is ``ignore_index`` (prompt and padding)
  are ignored in both layouts.
* The reduction is a masked mean over target tokens: every target token of the batch has the same weight
  (it is *not* a mean of per-sequence means). With no target token at all the result is an exact ``0.0`` that
  still has a gradient path to the student logits (so ``backward()`` works and gives zero gradients).
* Only the first ``vocab_size`` columns are compared (default: the smaller of the two last dimensions) and both
  distributions are renormalised there, so the padding rows of a padded embedding matrix (Qwen2.5-1.5B has
  152,064 rows for 151,936 real tokens) never count as tokens.
* Teacher logits are detached: gradients only ever flow into the student logits.
* Memory: the selected target rows are gathered first (in the input dtype), then processed in chunks of
  ``chunk_size`` rows (fewer at a large vocabulary: :func:`rows_per_chunk` keeps a chunk within a memory budget);
  each chunk is cast to fp32 on its own, and when a gradient is needed each chunk runs under
  activation checkpointing, so the fp32 intermediates of one chunk are the most that is ever alive at once
  (no fp32 copy of ``[B, T, V]`` is built, not even across chunks for the backward pass).

Divergences (``divergence(p_logprobs, q_logprobs, kind, beta)``; every value is a sum over the last dimension):

* ``forward_kl``: KL(p‖q) = Σ p (log p − log q). The true KL, teacher entropy included (torchtune's
  ``ForwardKLLoss`` and DistiLLM drop the constant entropy term and report a cross entropy; we don't, so a
  student equal to its teacher scores exactly 0).
* ``reverse_kl``: KL(q‖p) = Σ q (log q − log p).
* ``jsd``: the generalised Jensen-Shannon divergence of the GKD paper (Agarwal et al. 2024, eq. 1) with TRL's
  convention (``GKDTrainer.generalized_jsd_loss`` in ``trl/experimental/gkd/gkd_trainer.py``):
  ``m = beta·p + (1 − beta)·q`` and ``JSD_beta = beta·KL(p‖m) + (1 − beta)·KL(q‖m)`` for ``0 < beta < 1``;
  the endpoints are special-cased exactly as in TRL: ``beta == 0`` → forward KL(p‖q), ``beta == 1`` → reverse
  KL(q‖p). (The formula itself tends to 0 at both ends, so the endpoints are a deliberate discontinuity.)
  ``beta = 0.5`` is the symmetric JSD.
* ``skew_kl``: DistiLLM's skew forward KL (Ko et al. 2024, ``skewed_forward_kl`` in ``jongwooko/distillm``,
  ``distillm/losses.py``): ``KL(p ‖ beta·p + (1 − beta)·q)`` with skew coefficient ``beta`` (DistiLLM's ``lam``,
  default 0.1 there; pass ``beta=0.1`` to match it; this module's default ``beta=0.5`` is shared with ``jsd``).
  ``beta = 0`` is exactly forward KL, ``beta = 1`` gives 0. Unlike DistiLLM's code we keep the teacher entropy
  term, so the value is a true KL (same gradient).
* ``tvd``: total variation distance 0.5·Σ|p − q|.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

DIVERGENCES: tuple[str, ...] = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd")

# Smallest probability mass given to the "rest of the vocabulary" bucket of a top-k distribution: keeps its log
# finite when the top-k entries already hold (numerically) all of the mass, e.g. when k equals the vocabulary size.
_MIN_REST_MASS = 1e-7


def _check_kind(kind: str, beta: float) -> None:
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence {kind!r}; allowed: {', '.join(DIVERGENCES)}")
    if kind in ("jsd", "skew_kl") and not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"beta must be in [0, 1] for divergence {kind!r}, got {beta}")


def _kl(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p‖q) = Σ p (log p − log q) over the last dim; terms with p == 0 count 0 (also when log p = −inf)."""
    finfo_min = torch.finfo(logp.dtype).min
    logp = logp.clamp(min=finfo_min)  # -inf -> finite: avoids (-inf) - (-inf) = nan; clamp's gradient there is 0
    logq = logq.clamp(min=finfo_min)
    return (logp.exp() * (logp - logq)).sum(-1)


def divergence(p_logprobs: Tensor, q_logprobs: Tensor, kind: str, beta: float = 0.5) -> Tensor:
    """Per-row divergence between teacher ``p`` and student ``q``, given as log-probabilities over the last dim.

    ``p_logprobs`` and ``q_logprobs`` have the same shape ``[..., V]`` (normally ``[N, V]``); returns ``[...]``
    (normally ``[N]``). ``kind`` is one of :data:`DIVERGENCES`; see the module docstring for the exact definitions
    (direction: forward_kl = KL(p‖q), reverse_kl = KL(q‖p); jsd/skew_kl use ``beta`` as documented there).
    Mixtures are computed in log space (``logaddexp``) for stability.
    """
    _check_kind(kind, beta)
    if p_logprobs.shape != q_logprobs.shape:
        raise ValueError(
            f"p and q log-probs must have the same shape, got {tuple(p_logprobs.shape)} and {tuple(q_logprobs.shape)}"
        )
    beta = float(beta)
    if kind == "forward_kl":
        return _kl(p_logprobs, q_logprobs)
    if kind == "reverse_kl":
        return _kl(q_logprobs, p_logprobs)
    if kind == "tvd":
        return 0.5 * (p_logprobs.exp() - q_logprobs.exp()).abs().sum(-1)
    if kind == "jsd":
        if beta == 0.0:
            return _kl(p_logprobs, q_logprobs)
        if beta == 1.0:
            return _kl(q_logprobs, p_logprobs)
        log_m = torch.logaddexp(p_logprobs + math.log(beta), q_logprobs + math.log1p(-beta))
        return beta * _kl(p_logprobs, log_m) + (1.0 - beta) * _kl(q_logprobs, log_m)
    # skew_kl
    if beta == 0.0:
        return _kl(p_logprobs, q_logprobs)
    if beta == 1.0:
        return q_logprobs[..., :0].sum(-1)  # exact zeros [...] with a gradient path to q
    log_m = torch.logaddexp(p_logprobs + math.log(beta), q_logprobs + math.log1p(-beta))
    return _kl(p_logprobs, log_m)


_divergence_fn = divergence  # the loss functions' keyword argument ``divergence`` shadows this function


def shift_for_causal(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Align logits with the tokens they predict: ``(logits[:, :-1], labels[:, 1:])`` (views, no copy).

    The loss functions in this module call this themselves: pass them the model's raw logits ``[B, T, V]`` and the
    unshifted labels ``[B, T]`` as HF models take them.
    """
    return logits[:, :-1], labels[:, 1:]


# ----------------------------------------------------------------------------------------------------------------
# internals


def _check_shapes(student_logits: Tensor, labels: Tensor, other: Tensor | None, other_name: str) -> None:
    if student_logits.dim() not in (2, 3):
        raise ValueError(f"student_logits must be [B, T, V] or target rows [N, V], got {tuple(student_logits.shape)}")
    lead = tuple(student_logits.shape[:-1])
    names = "[B, T]" if student_logits.dim() == 3 else "[N]"
    if tuple(labels.shape) != lead:
        raise ValueError(f"labels must be {names} = {lead}, got {tuple(labels.shape)}")
    if other is not None and (other.dim() != student_logits.dim() or tuple(other.shape[:-1]) != lead):
        raise ValueError(f"{other_name} must be {names[:-1]}, *] with {names[1:-1]} = {lead}, got {tuple(other.shape)}")


def _target_rows(
    student_logits: Tensor, labels: Tensor, ignore_index: int, *others: Tensor, others_follow_labels: bool = False
) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """``(student rows [N, V], target mask, shifted labels, other rows)`` from either layout (module docstring).

    In the ``[B, T, *]`` layout the others are aligned with the logits (an online teacher's logits) or, with
    ``others_follow_labels``, with the labels (a cached top-k). Rows already in the ``[N, *]`` layout are used as
    they are when none is masked (no copy).
    """
    if student_logits.dim() == 2:
        s, lab, others = student_logits, labels, list(others)
    else:
        s, lab = shift_for_causal(student_logits, labels)
        others = [o[:, 1:] if others_follow_labels else o[:, :-1] for o in others]
    mask = lab != ignore_index
    if student_logits.dim() == 2 and bool(mask.all()):
        return s, mask, lab, others
    return s[mask], mask, lab, [o[mask.to(o.device)] for o in others]


def _check_temperature(temperature: float) -> float:
    temperature = float(temperature)
    if not temperature > 0.0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    return temperature


def _resolve_vocab(vocab_size: int | None, *sizes: int) -> int:
    smallest = min(sizes)
    if vocab_size is None:
        return smallest
    vocab_size = int(vocab_size)
    if not 0 < vocab_size <= smallest:
        raise ValueError(f"vocab_size must be in [1, {smallest}] (the smaller logits width), got {vocab_size}")
    return vocab_size


def _chunks(n: int, chunk_size: int | None):
    if chunk_size is None:
        yield 0, n
        return
    chunk_size = int(chunk_size)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    for start in range(0, n, chunk_size):
        yield start, min(start + chunk_size, n)


# fp32 [rows, V] buffers alive at once in a chunk of the fused losses (student and teacher log-probs at T = 1 and
# at T, the divergence's temporaries, the gradient), and the memory they may take together
_FP32_BUFFERS = 8
CHUNK_BUDGET_BYTES = 512 * 2**20


def rows_per_chunk(vocab: int, chunk_size: int | None) -> int | None:
    """Rows per chunk: at most ``chunk_size`` and at most what keeps a chunk's fp32 buffers within
    :data:`CHUNK_BUDGET_BYTES` (at a 151,936-token vocabulary, 110 rows; at 4,000, 4,194), so memory does not grow
    with the vocabulary. ``None`` with ``chunk_size=None``: one chunk."""
    if chunk_size is None:
        return None
    return max(1, min(int(chunk_size), CHUNK_BUDGET_BYTES // (_FP32_BUFFERS * 4 * int(vocab))))


def _target_ids(shifted_labels: Tensor, mask: Tensor, vocab: int, ignore_index: int) -> Tensor:
    """The target token ids (long) at the masked positions, checked to lie in the compared vocabulary."""
    targets = shifted_labels[mask].to(torch.long)
    if int(targets.min()) < 0 or int(targets.max()) >= vocab:
        raise ValueError(f"labels must be in [0, {vocab}) at target positions (or equal ignore_index={ignore_index})")
    return targets


def _zero(student_logits: Tensor) -> Tensor:
    """An exact 0.0 (fp32) with a gradient path to ``student_logits`` (its gradient is zero)."""
    return student_logits[..., :0].float().sum()


def _run(fn, *args: Tensor):
    """Call ``fn(*args)``; under activation checkpointing when a gradient is needed (frees the chunk's fp32
    intermediates after the forward pass and recomputes them one chunk at a time in the backward pass)."""
    if torch.is_grad_enabled() and any(a.requires_grad for a in args):
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


# ----------------------------------------------------------------------------------------------------------------
# full-vocabulary distillation


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    ignore_index: int = -100,
    vocab_size: int | None = None,
    chunk_size: int | None = 1024,
) -> dict[str, Tensor]:
    """The terms of soft-label KD against a full teacher (the online teacher), over the same target tokens.

    ``student_logits`` ``[B, T, Vs]`` and ``teacher_logits`` ``[B, T, Vt]`` are raw model outputs, ``labels``
    ``[B, T]`` the unshifted labels; the causal shift and the ``ignore_index`` mask are applied here (or target
    rows: ``[N, Vs]``, ``[N, Vt]`` and their target ids ``[N]``, see the module docstring). Only the first
    ``vocab_size`` columns (default ``min(Vs, Vt)``) are compared, both sides renormalised there. ``chunk_size``
    selected target rows are processed at a time (``None``: one chunk). Returns a dict of fp32 scalars, each a mean
    over target tokens:

    * ``"ce"``: cross entropy of the student on the labels at T = 1 (student renormalised over the first
      ``vocab_size`` columns, like the divergence),
    * ``"kd"``: the divergence D(p_T, q_T) between teacher ``p`` and student ``q`` at temperature ``T`` (direction
      as in the module docstring; no T² factor),
    * ``"forward_kl"``: the true KL(teacher‖student) at T = 1, detached (a monitoring metric).

    The training objective ``alpha·ce + (1 − alpha)·T²·kd`` is mixed by the caller (``distillmt.train.loss_step``),
    the T² keeping the soft-target gradient scale independent of T. Everything comes from one chunked pass; no fp32
    ``[B, T, V]`` copy is built.
    """
    kind = divergence
    _check_kind(kind, beta)
    _check_shapes(student_logits, labels, teacher_logits, "teacher_logits")
    temperature = _check_temperature(temperature)
    vocab = _resolve_vocab(vocab_size, student_logits.shape[-1], teacher_logits.shape[-1])

    s_rows, mask, lab, (t_rows,) = _target_rows(student_logits, labels, ignore_index, teacher_logits.detach())
    n = int(mask.sum())
    if n == 0:
        zero = _zero(student_logits)
        return {"ce": zero, "kd": zero, "forward_kl": zero.detach()}
    targets = _target_ids(lab, mask, vocab, ignore_index)

    def chunk_sums(s_chunk: Tensor, t_chunk: Tensor, tgt: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        s32 = s_chunk[:, :vocab].float()
        t32 = t_chunk[:, :vocab].float()
        logq1 = F.log_softmax(s32, dim=-1)
        logp1 = F.log_softmax(t32, dim=-1)
        ce = -logq1.gather(1, tgt[:, None]).sum()
        with torch.no_grad():
            fkl = _kl(logp1, logq1).sum()
        if temperature == 1.0:
            d = _divergence_fn(logp1, logq1, kind, beta).sum()
        else:
            logq = F.log_softmax(s32 / temperature, dim=-1)
            logp = F.log_softmax(t32 / temperature, dim=-1)
            d = _divergence_fn(logp, logq, kind, beta).sum()
        return ce, d, fkl

    ce_total = _zero(student_logits)
    d_total = _zero(student_logits)
    fkl_total = torch.zeros((), dtype=torch.float32, device=student_logits.device)
    for a, b in _chunks(n, rows_per_chunk(vocab, chunk_size)):
        ce, d, fkl = _run(chunk_sums, s_rows[a:b], t_rows[a:b], targets[a:b])
        ce_total = ce_total + ce
        d_total = d_total + d
        fkl_total = fkl_total + fkl.detach()
    return {"ce": ce_total / n, "kd": d_total / n, "forward_kl": (fkl_total / n).detach()}


# ----------------------------------------------------------------------------------------------------------------
# fused: the objective and its gradient in one chunked pass, in closed form


def divergence_grad(p_logprobs: Tensor, q_logprobs: Tensor, kind: str, beta: float = 0.5) -> Tensor:
    """d D(p, q) / d z per row, where ``q = softmax(z)`` (multiply by 1/T for ``q = softmax(z / T)``), ``[..., V]``.

    With ``g = dD/dq`` the chain rule through the softmax gives ``q ⊙ (g − Σ q g)``; written out per divergence:
    forward KL ``q − p``; reverse KL ``q ⊙ (log q − log p − KL(q‖p))``; JSD_beta ``q ⊙ (g − Σ q g)`` with
    ``g = (1 − beta)(log q − log m)``, ``m = beta·p + (1 − beta)·q``; skew KL the same with ``g = −(1 − beta)·p/m``;
    TVD the same with ``g = sign(q − p)/2``. Endpoints as in :func:`divergence` (jsd 0/1 = forward/reverse KL, skew
    0 = forward KL, skew 1 = 0).
    """
    _check_kind(kind, beta)
    beta = float(beta)
    if kind == "jsd" and beta in (0.0, 1.0):
        kind = "forward_kl" if beta == 0.0 else "reverse_kl"
    if kind == "skew_kl" and beta == 0.0:
        kind = "forward_kl"
    q = q_logprobs.exp()
    if kind == "forward_kl":
        return q - p_logprobs.exp()
    if kind == "skew_kl" and beta == 1.0:
        return torch.zeros_like(q)
    if kind == "reverse_kl":
        finfo_min = torch.finfo(q_logprobs.dtype).min
        g = q_logprobs.clamp(min=finfo_min) - p_logprobs.clamp(min=finfo_min)
    elif kind == "tvd":
        g = 0.5 * torch.sign(q - p_logprobs.exp())
    else:
        log_m = torch.logaddexp(p_logprobs + math.log(beta), q_logprobs + math.log1p(-beta))
        if kind == "jsd":
            g = (1.0 - beta) * (q_logprobs - log_m)
        else:  # skew_kl: -(1 - beta) p / m, 0 where p is 0
            g = -(1.0 - beta) * torch.exp(p_logprobs - log_m).nan_to_num(0.0)
    g = torch.where(q > 0, g, torch.zeros_like(g))
    return q * (g - (q * g).sum(-1, keepdim=True))


def _chunk_objective(
    s32: Tensor,
    t32: Tensor,
    tgt: Tensor,
    temperature: float,
    kind: str,
    beta: float,
    ce_w: float,
    kd_w: float,
    want_grad: bool,
) -> tuple[Tensor, Tensor | None]:
    """One chunk of fp32 rows: the sums ``[objective, CE, D, forward KL]`` and, with ``want_grad``, the objective's
    gradient with respect to the student's logits in closed form (``[rows, V]``, fp32)."""  # fmt: skip
    logq1, logp1 = F.log_softmax(s32, dim=-1), F.log_softmax(t32, dim=-1)
    ce = -logq1.gather(1, tgt[:, None]).sum()
    logq, logp = (logq1, logp1) if temperature == 1.0 else (
        F.log_softmax(s32 / temperature, dim=-1), F.log_softmax(t32 / temperature, dim=-1)
    )  # fmt: skip
    d = _divergence_fn(logp, logq, kind, beta).sum()
    sums = torch.stack([ce_w * ce + kd_w * d, ce, d, _kl(logp1, logq1).sum()])
    if not want_grad:
        return sums, None
    g = kd_w / temperature * divergence_grad(logp, logq, kind, beta)
    if ce_w:
        g += ce_w * logq1.exp()
        g[torch.arange(g.shape[0], device=g.device), tgt] -= ce_w
    return sums, g


class _FusedKD(torch.autograd.Function):
    """Forward: the objective ``ce_weight·CE + kd_weight·D`` (sums over the rows) and its gradient with respect to
    the student rows, chunk by chunk in fp32, the gradient kept in the logits' dtype; backward: that gradient times
    the incoming scalar. Nothing is recomputed and no fp32 intermediate outlives its chunk."""

    @staticmethod
    def forward(ctx, s_rows, t_rows, targets, vocab, temperature, kind, beta, ce_weight, kd_weight, chunk_size):
        grad = torch.zeros_like(s_rows) if s_rows.requires_grad else None
        sums = torch.zeros(4, dtype=torch.float32, device=s_rows.device)  # objective, CE, D, forward KL
        for a, b in _chunks(s_rows.shape[0], rows_per_chunk(vocab, chunk_size)):
            s32, t32 = s_rows[a:b, :vocab].float(), t_rows[a:b, :vocab].float()
            args = (temperature, kind, beta, ce_weight, kd_weight, grad is not None)
            chunk, g = _chunk_objective(s32, t32, targets[a:b], *args)
            sums += chunk
            if g is not None:
                grad[a:b, :vocab] = g.to(grad.dtype)
        ctx.save_for_backward(grad)
        objective, ce, d, fkl = (v.clone() for v in sums)
        ctx.mark_non_differentiable(ce, d, fkl)
        return objective, ce, d, fkl

    @staticmethod
    def backward(ctx, g_objective, *_):
        (grad,) = ctx.saved_tensors
        return (grad * g_objective.to(grad.dtype) if grad is not None else None,) + (None,) * 9


def fused_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    ce_weight: float,
    kd_weight: float,
    temperature: float = 1.0,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    ignore_index: int = -100,
    vocab_size: int | None = None,
    chunk_size: int | None = 1024,
) -> dict[str, Tensor]:
    """:func:`kd_loss`'s terms and the objective ``ce_weight·CE + kd_weight·D`` (means over target tokens; the
    training loop passes ``alpha`` and ``(1 − alpha)·T²``), with the gradient computed in closed form in the same
    chunked pass (:func:`divergence_grad`) instead of by autograd through the softmaxes: one gradient buffer in the
    logits' dtype is the only thing kept, and nothing is recomputed in the backward pass.

    Same inputs, shapes, masking, vocabulary handling and values as :func:`kd_loss`. Returns ``"loss"`` (the
    objective, the only differentiable output), ``"ce"``, ``"kd"`` and ``"forward_kl"`` (detached).
    """
    kind = divergence
    _check_kind(kind, beta)
    _check_shapes(student_logits, labels, teacher_logits, "teacher_logits")
    temperature = _check_temperature(temperature)
    vocab = _resolve_vocab(vocab_size, student_logits.shape[-1], teacher_logits.shape[-1])
    s_rows, mask, lab, (t_rows,) = _target_rows(student_logits, labels, ignore_index, teacher_logits.detach())
    n = int(mask.sum())
    if n == 0:
        zero = _zero(student_logits)
        return {"loss": zero, "ce": zero.detach(), "kd": zero.detach(), "forward_kl": zero.detach()}
    targets = _target_ids(lab, mask, vocab, ignore_index)
    weights = (float(ce_weight), float(kd_weight))
    out = _FusedKD.apply(s_rows, t_rows, targets, vocab, temperature, kind, float(beta), *weights, chunk_size)
    return dict(zip(("loss", "ce", "kd", "forward_kl"), (v / n for v in out), strict=True))


# ----------------------------------------------------------------------------------------------------------------
# fused linear: the logits themselves computed chunk by chunk from the last hidden states


class _FusedLinearKD(torch.autograd.Function):
    """:class:`_FusedKD` with the output layers folded in: each chunk's student and teacher logits are computed from
    the hidden rows and the output weights, used, and freed; the gradient goes straight to the student's hidden rows
    (and to its output weight when that is trained), so no ``[N, V]`` tensor outlives its chunk."""

    @staticmethod
    def forward(ctx, s_hidden, s_weight, t_hidden, t_weight, targets, vocab, temperature, kind, beta, ce_w, kd_w, rows):
        grad_h = torch.zeros_like(s_hidden) if s_hidden.requires_grad else None
        grad_w = (
            torch.zeros(s_weight.shape, dtype=torch.float32, device=s_weight.device) if s_weight.requires_grad else None
        )
        sums = torch.zeros(4, dtype=torch.float32, device=s_hidden.device)  # objective, CE, D, forward KL
        w_s, w_t = s_weight[:vocab], t_weight[:vocab]
        want_grad = grad_h is not None or grad_w is not None
        for a, b in _chunks(s_hidden.shape[0], rows):
            h = s_hidden[a:b]
            s32 = (h @ w_s.T).float()  # in the weights' dtype, as the output layer would compute it
            t32 = (t_hidden[a:b] @ w_t.T).float()
            chunk, g = _chunk_objective(s32, t32, targets[a:b], temperature, kind, beta, ce_w, kd_w, want_grad)
            sums += chunk
            if g is None:
                continue
            g = g.to(w_s.dtype)
            if grad_h is not None:
                grad_h[a:b] = g @ w_s
            if grad_w is not None:
                grad_w[:vocab] += (g.T @ h).float()
        ctx.save_for_backward(grad_h, None if grad_w is None else grad_w.to(s_weight.dtype))
        objective, ce, d, fkl = (v.clone() for v in sums)
        ctx.mark_non_differentiable(ce, d, fkl)
        return objective, ce, d, fkl

    @staticmethod
    def backward(ctx, g_objective, *_):
        grad_h, grad_w = ctx.saved_tensors
        scale = [None if g is None else g * g_objective.to(g.dtype) for g in (grad_h, grad_w)]
        return (scale[0], scale[1]) + (None,) * 10


def fused_linear_kd_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    targets: Tensor,
    *,
    ce_weight: float,
    kd_weight: float,
    temperature: float = 1.0,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    vocab_size: int | None = None,
    chunk_size: int | None = 1024,
) -> dict[str, Tensor]:
    """:func:`fused_kd_loss` computed from the last hidden states instead of the logits (the fused-linear idea of
    Liger-kernel and Cut Cross-Entropy, in plain PyTorch on any device): the student's logits ``h_s @ W_s.T`` and the
    teacher's ``h_t @ W_t.T`` exist one chunk of rows at a time, so the ``[N, V]`` logits of neither model are ever
    held, and the objective's gradient (closed form, :func:`divergence_grad`) is pushed through the output layer in
    the same pass.

    ``student_hidden`` ``[N, Hs]`` and ``teacher_hidden`` ``[N, Ht]`` are the models' last hidden states at the
    target rows (``distillmt.train.target_hidden``), ``student_weight`` ``[Vs, Hs]`` and ``teacher_weight``
    ``[Vt, Ht]`` their output layers' weights (no bias), ``targets`` ``[N]`` the ids the rows predict. The teacher
    side is detached. Only the first ``vocab_size`` rows of each weight (default: the smaller) are used. Chunks hold
    at most ``chunk_size`` rows and at most what a memory budget allows (:func:`rows_per_chunk`). Returns the same
    dict as :func:`fused_kd_loss`: ``"loss"`` (differentiable with respect to the student's hidden rows and, when
    it requires grad, its weight), ``"ce"``, ``"kd"``, ``"forward_kl"``, each a mean over the rows.
    """
    kind = divergence
    _check_kind(kind, beta)
    temperature = _check_temperature(temperature)
    if student_hidden.dim() != 2 or teacher_hidden.dim() != 2 or targets.shape != student_hidden.shape[:1]:
        raise ValueError(
            f"hidden states must be [N, H] and targets [N]; got student {tuple(student_hidden.shape)}, teacher "
            f"{tuple(teacher_hidden.shape)}, targets {tuple(targets.shape)}"
        )
    if teacher_hidden.shape[0] != student_hidden.shape[0]:
        raise ValueError(f"student and teacher rows differ: {student_hidden.shape[0]} vs {teacher_hidden.shape[0]}")
    if student_weight.shape[1] != student_hidden.shape[1] or teacher_weight.shape[1] != teacher_hidden.shape[1]:
        raise ValueError("each output weight must be [V, H] with the H of its hidden states")
    vocab = _resolve_vocab(vocab_size, student_weight.shape[0], teacher_weight.shape[0])
    n = student_hidden.shape[0]
    if n == 0:
        zero = _zero(student_hidden) + _zero(student_weight)
        return {"loss": zero, "ce": zero.detach(), "kd": zero.detach(), "forward_kl": zero.detach()}
    targets = _target_ids(targets, torch.ones_like(targets, dtype=torch.bool), vocab, -100)
    rows = rows_per_chunk(vocab, chunk_size)
    args = (vocab, temperature, kind, float(beta), float(ce_weight), float(kd_weight), rows)
    out = _FusedLinearKD.apply(
        student_hidden, student_weight, teacher_hidden.detach(), teacher_weight.detach(), targets, *args
    )
    return dict(zip(("loss", "ce", "kd", "forward_kl"), (v / n for v in out), strict=True))


# ----------------------------------------------------------------------------------------------------------------
# top-k (offline teacher cache) distillation


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 − exp(x)) for x ≤ 0, stable, with the result clamped to ≥ log(_MIN_REST_MASS)."""
    x = x.clamp(max=math.log1p(-_MIN_REST_MASS))
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _buckets(topk_logprobs: Tensor) -> Tensor:
    """k log-probs → k+1 bucket log-probs (the k entries plus the remaining mass), renormalised."""
    rest = _log1mexp(torch.logsumexp(topk_logprobs, dim=-1, keepdim=True))
    out = torch.cat([topk_logprobs, rest], dim=-1)
    return out - torch.logsumexp(out, dim=-1, keepdim=True)


def topk_kd_loss(
    student_logits: Tensor,
    teacher_topk_logprobs: Tensor,
    teacher_topk_indices: Tensor,
    labels: Tensor,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    ignore_index: int = -100,
    chunk_size: int | None = 1024,
    vocab_size: int | None = None,
) -> dict[str, Tensor]:
    """The terms of soft-label KD against a teacher known only through its top-k log-probs (the offline cache).

    ``teacher_topk_logprobs`` (float) and ``teacher_topk_indices`` (integer) are ``[B, T, k]`` and **aligned with
    the labels**: position ``t`` holds the teacher's distribution for predicting ``labels[:, t]`` (already at
    temperature ``T``, as the cache stores it); entries at masked positions are ignored. ``student_logits``
    ``[B, T, V]`` are raw and ``labels`` ``[B, T]`` unshifted, as for :func:`kd_loss` (or target rows: ``[N, V]``
    student logits, ``[N, k]`` teacher top-k and ``[N]`` target ids, all aligned). Returns fp32 scalars, means
    over target tokens, with the same meaning as :func:`kd_loss`'s (no ``"forward_kl"``: the full teacher
    distribution is not known):

    * ``"ce"``: cross entropy of the student on the labels at T = 1, student renormalised over its first
      ``vocab_size`` columns, exactly as :func:`kd_loss` computes it;
    * ``"kd"``: the divergence on k+1 buckets: the k cached token ids plus "everything else". The teacher's buckets
      are its k log-probs and log(1 − Σ exp(top-k)); the student's are its log-softmax at temperature ``T``
      gathered at the same ids and its own remaining mass (each rest bucket is clamped to ≥ 1e-7 and each k+1
      distribution renormalised). Merging tokens into one bucket can only lower an f-divergence, so for forward KL
      the value is ≤ the full-vocab value; with k = V (every token cached) it equals :func:`kd_loss`'s (up to the
      1e-7 rest bucket).

    ``vocab_size``: the real vocabulary (e.g. a student whose embedding matrix is padded); default: all of the
    student's columns. Indices and labels must be < that size.
    """
    kind = divergence
    _check_kind(kind, beta)
    _check_shapes(student_logits, labels, teacher_topk_logprobs, "teacher_topk_logprobs")
    if teacher_topk_indices.shape != teacher_topk_logprobs.shape:
        raise ValueError(
            f"teacher_topk_indices {tuple(teacher_topk_indices.shape)} and teacher_topk_logprobs "
            f"{tuple(teacher_topk_logprobs.shape)} must have the same shape"
        )
    temperature = _check_temperature(temperature)
    vocab = _resolve_vocab(vocab_size, student_logits.shape[-1])

    teacher = (teacher_topk_logprobs.detach(), teacher_topk_indices.detach())
    s_rows, mask, lab, (t_lp, t_idx) = _target_rows(
        student_logits, labels, ignore_index, *teacher, others_follow_labels=True
    )
    n = int(mask.sum())
    if n == 0:
        zero = _zero(student_logits)
        return {"ce": zero, "kd": zero}
    targets = _target_ids(lab, mask, vocab, ignore_index)
    t_lp = t_lp.to(s_rows.device)
    t_idx = t_idx.to(device=s_rows.device, dtype=torch.long)
    if int(t_idx.min()) < 0 or int(t_idx.max()) >= vocab:
        raise ValueError(f"teacher_topk_indices must be in [0, {vocab}) at target positions")

    def chunk_sums(s_chunk: Tensor, lp_chunk: Tensor, idx_chunk: Tensor, tgt: Tensor) -> tuple[Tensor, Tensor]:
        s32 = s_chunk[:, :vocab].float()
        ce = -F.log_softmax(s32, dim=-1).gather(1, tgt[:, None]).sum()
        logq = _buckets(F.log_softmax(s32 / temperature, dim=-1).gather(1, idx_chunk))
        logp = _buckets(lp_chunk.float())
        return ce, _divergence_fn(logp, logq, kind, beta).sum()

    ce_total = _zero(student_logits)
    d_total = _zero(student_logits)
    for a, b in _chunks(n, rows_per_chunk(vocab, chunk_size)):
        ce, d = _run(chunk_sums, s_rows[a:b], t_lp[a:b], t_idx[a:b], targets[a:b])
        ce_total = ce_total + ce
        d_total = d_total + d
    return {"ce": ce_total / n, "kd": d_total / n}


# ----------------------------------------------------------------------------------------------------------------
# cross-tokenizer distillation: Universal Logit Distillation


def aligned_rows(mask: Tensor, counts: Tensor) -> Tensor:
    """Which of the target rows ``mask`` selects (``[B, T]`` bool; rows in row-major order, ``[mask.sum()]``) are
    among the first ``counts[b]`` target rows of their sequence ``b``: the rows :func:`uld_loss` pairs up."""
    rank = mask.long().cumsum(1) - 1  # the position of each target row among its sequence's target rows
    return (rank < counts.to(mask.device)[:, None])[mask]


def _uld_rows(mask: Tensor, counts: Tensor, logits: Tensor, name: str) -> Tensor:
    """The aligned rows of one side's logits in either layout (``[B, T, V]`` with its mask, or the ``[N, V]`` target
    rows the mask selects)."""
    if logits.dim() == 3:
        if tuple(logits.shape[:2]) != tuple(mask.shape):
            raise ValueError(f"{name}_mask must be [B, T] = {tuple(logits.shape[:2])}, got {tuple(mask.shape)}")
        rows = logits[mask.to(logits.device)]
    elif logits.dim() == 2:
        if logits.shape[0] != int(mask.sum()):
            raise ValueError(f"{name}_logits has {logits.shape[0]} rows but {name}_mask selects {int(mask.sum())}")
        rows = logits
    else:
        raise ValueError(f"{name}_logits must be [B, T, V] or target rows [N, V], got {tuple(logits.shape)}")
    return rows[aligned_rows(mask, counts).to(rows.device)]


def uld_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    student_mask: Tensor,
    teacher_mask: Tensor,
    *,
    temperature: float = 1.0,
    student_vocab: int | None = None,
    teacher_vocab: int | None = None,
    chunk_size: int | None = 1024,
) -> dict[str, Any]:
    """Universal Logit Distillation (Boizard et al. 2024, arXiv 2402.12030): soft-label KD between a teacher and a
    student whose tokenizers differ, so that their vocabularies cannot be compared token by token.

    Each model reads the example in its own tokenization; the i-th target token of the student is paired with the
    i-th target token of the teacher, for ``i < min(student targets, teacher targets)`` per sequence (the later
    targets of the longer side are left out). At each pair both distributions (``softmax(logits / T)``, fp32) are
    sorted in decreasing order, the smaller vocabulary is padded with zero probabilities, and the distance is the
    L1 distance between the sorted vectors: the paper's closed form of the Wasserstein-1 distance when moving mass
    between any two tokens costs the same (as its authors' ``DistillationLoss`` in ``Nicolas-BZRD/llm-recipes``
    and TRL's ``ULDLoss`` without GOLD's extensions compute it). It is symmetric, 0 exactly when the sorted
    distributions agree (so a permutation of a vocabulary costs nothing: the loss never knows which token is
    which, only how the mass is spread) and at most 2.

    ``student_logits`` ``[B, Ts, Vs]`` and ``student_mask`` ``[B, Ts]`` (bool: ``True`` where the logits predict a
    target token, i.e. ``forward.target_positions(labels)``; no causal shift is applied here), or only the rows the
    mask selects (``[N, Vs]``, row-major, what training passes); the teacher likewise, with its own ``Tt``, ``Vt``
    and row count, and the same batch size ``B``. ``student_vocab`` / ``teacher_vocab``: the real vocabularies
    (default: every column; the padding rows of a padded embedding matrix are no tokens), each side renormalised
    over its own. The teacher is detached. The aligned rows are processed ``chunk_size`` at a time (fewer at a large
    vocabulary, :func:`rows_per_chunk`), each chunk in fp32 under activation checkpointing when a gradient is needed.

    Returns ``{"uld": the mean over aligned target tokens (fp32 scalar; an exact 0 with a gradient path when there
    are none), "aligned": their number (int)}``. The reduction differs from the paper's code (a mean per sequence,
    then over sequences): every aligned token weighs the same, as everywhere in this module.
    """
    temperature = _check_temperature(temperature)
    if student_mask.dim() != 2 or teacher_mask.dim() != 2 or student_mask.shape[0] != teacher_mask.shape[0]:
        raise ValueError(
            f"student_mask and teacher_mask must be [B, T] with the same B, got {tuple(student_mask.shape)} and "
            f"{tuple(teacher_mask.shape)}"
        )
    s_mask, t_mask = student_mask.bool(), teacher_mask.bool()
    counts = torch.minimum(s_mask.sum(1), t_mask.to(s_mask.device).sum(1))
    vs = _resolve_vocab(student_vocab, student_logits.shape[-1])
    vt = _resolve_vocab(teacher_vocab, teacher_logits.shape[-1])
    s_rows = _uld_rows(s_mask, counts, student_logits, "student")
    t_rows = _uld_rows(t_mask, counts.to(t_mask.device), teacher_logits.detach(), "teacher").to(s_rows.device)
    n = s_rows.shape[0]
    if n == 0:
        return {"uld": _zero(student_logits), "aligned": 0}

    def chunk_sum(s_chunk: Tensor, t_chunk: Tensor) -> Tensor:
        q = F.softmax(s_chunk[:, :vs].float() / temperature, dim=-1).sort(dim=-1, descending=True).values
        p = F.softmax(t_chunk[:, :vt].float() / temperature, dim=-1).sort(dim=-1, descending=True).values
        v = min(vs, vt)  # past the smaller vocabulary the other side is 0: what is left of the larger one counts whole
        return (q[:, :v] - p[:, :v]).abs().sum() + q[:, v:].sum() + p[:, v:].sum()

    total = _zero(student_logits)
    for a, b in _chunks(n, rows_per_chunk(max(vs, vt), chunk_size)):
        total = total + _run(chunk_sum, s_rows[a:b], t_rows[a:b])
    return {"uld": total / n, "aligned": n}
