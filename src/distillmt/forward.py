"""How a causal LM is run for training and scoring: only the rows that predict a target token reach the output
layer, the prompt prefix every example shares is computed once, and on a CPU attention runs in fp32 while training.

Used by the training loop (:mod:`distillmt.train`), the teacher cache (:mod:`distillmt.logit_cache`) and
generation (:mod:`distillmt.generate`); it knows nothing of losses or optimizers.
"""

from __future__ import annotations

from typing import Any

import torch

from distillmt import engines
from distillmt.prompts import IGNORE_INDEX

MIN_SHARED_PREFIX = 8  # shorter shared prefixes (the plain template's "English:") are not worth a cache

# On a CPU, oneDNN runs bf16 matmuls with a kernel built for each shape it meets. Training batches of every length,
# and output layers fed every count of target rows, would build new kernels all the time; rounded up to these
# multiples, a stage meets a few dozen shapes (docs/benchmarks/default-run-cpu.md). fp32 matmuls (MKL) and GPUs need
# no rounding.
BF16_WIDTH_MULTIPLE = 8  # a training batch's length
BF16_ROWS_MULTIPLE = 64  # the rows an output layer gets


def shared_prefix(examples: list[dict]) -> list[int]:
    """The token ids every example starts with, up to the last prompt position before the first target's row (a
    chat template's system prompt and instruction: with Qwen's template, more than half of a Tatoeba example's
    tokens); empty when shorter than :data:`MIN_SHARED_PREFIX`. A model's keys and values there are the same for
    every example, so they are computed once (:class:`PrefixCache`)."""
    if not examples:
        return []
    limit = min(next(i for i, y in enumerate(e["labels"]) if y != IGNORE_INDEX) - 1 for e in examples)
    return common_prefix([e["input_ids"] for e in examples], limit)


def common_prefix(seqs: list[list[int]], limit: int) -> list[int]:
    """The longest start, at most ``limit`` tokens, that every sequence shares; empty when shorter than
    :data:`MIN_SHARED_PREFIX` (or when there are no sequences)."""
    if not seqs:
        return []
    first, n = seqs[0], max(limit, 0)
    for ids in seqs[1:]:
        n = next((i for i in range(n) if ids[i] != first[i]), n)
    return list(first[:n]) if n >= MIN_SHARED_PREFIX else []


def target_tokens(labels: torch.Tensor) -> int:
    return int(labels[:, 1:].ne(IGNORE_INDEX).sum())


def target_positions(labels: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` bool: the positions whose logits predict a target token (``labels[:, t + 1]`` is no ignore)."""
    rows = torch.zeros_like(labels, dtype=torch.bool)
    rows[:, :-1] = labels[:, 1:].ne(IGNORE_INDEX)
    return rows


def target_logits(model: Any, batch: dict, rows: torch.Tensor, past: tuple | None = None) -> torch.Tensor:
    """The logits of a causal LM at ``rows`` (``[B, T]`` bool) alone, ``[N, V]`` in row-major order.

    The output layer is the largest matmul of a small model with a large vocabulary (0.5B Qwen2.5: 136M of its 494M
    parameters, 151,936 columns), and prompt and padding positions need no logits; restricting it to the target
    rows (a forward pre-hook on the output layer selects them from the last hidden states) saves most of that
    matmul (docs/benchmarks). The model is called as usual, so DDP's hooks and
    accelerate's autocast still apply. ``past``: a frozen model's cached shared prefix (:meth:`PrefixCache.past`).
    """
    head = getattr(model, "module", model).get_output_embeddings()
    if not bf16_on_cpu(head.weight):
        return _forward_with_head(model, head, batch, rows, past, lambda h: h).logits
    n = int(rows[:, past[0] :].sum()) if past is not None else int(rows.sum())
    pad = lambda h: torch.nn.functional.pad(h, (0, 0, 0, -len(h) % BF16_ROWS_MULTIPLE))  # noqa: E731
    return _forward_with_head(model, head, batch, rows, past, pad).logits[:n]


def bf16_on_cpu(weight: torch.Tensor, autocast: bool | None = None) -> bool:
    """Whether a matmul with ``weight`` runs in bf16 on a CPU: bf16 weights, or under CPU bf16 autocast (``autocast``;
    None: whether it is on now)."""
    if weight.device.type != "cpu":
        return False
    if autocast is None:
        autocast = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    return weight.dtype == torch.bfloat16 or autocast


def width_multiple(*models: Any, autocast_bf16: bool = False) -> int:
    """What a CPU training batch's length is rounded up to (:data:`BF16_WIDTH_MULTIPLE` where any of ``models`` runs
    in bf16, its own weights or under autocast; else 1)."""
    weights = [next(iter(getattr(m, "module", m).parameters()), None) for m in models if m is not None]
    bf16 = any(w is not None and bf16_on_cpu(w, autocast_bf16) for w in weights)
    return BF16_WIDTH_MULTIPLE if bf16 else 1


def _forward_with_head(model: Any, head: Any, batch: dict, rows: torch.Tensor, past: tuple | None, take: Any) -> Any:
    """:func:`_forward` with the output layer's input cut to ``rows`` (those after the cached prefix, if any) and
    handed to ``take``, whose result the layer gets instead."""
    keep = rows[:, past[0] :] if past is not None else rows
    handle = head.register_forward_pre_hook(lambda _module, args: (take(args[0][keep]), *args[1:]))
    try:
        return _forward(model, batch, past)
    finally:
        handle.remove()


def _forward(model: Any, batch: dict, past: tuple | None) -> Any:
    """``model`` on ``batch``; with ``past = (p, keys_values)``, only on the positions after the first p, which all
    rows share and whose keys and values ``past`` holds (the attention mask still covers the whole rows)."""
    if past is None:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    p, kv = past
    cache = prefix_cache(kv, batch["input_ids"].shape[0])
    ids = batch["input_ids"][:, p:]
    return model(input_ids=ids, attention_mask=batch["attention_mask"], cache=cache, use_cache=True)


def prefix_cache(kv: list[tuple[torch.Tensor, torch.Tensor]], rows: int) -> Any:
    """A fresh ``DynamicCache`` holding one prefix's keys and values (``[1, heads, p, dim]`` per layer) for ``rows``
    rows: views, not copies; the model's first forward appends to them."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=[(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v in kv])


class PrefixCache:
    """A model's keys and values at the prompt prefix every example shares (:func:`shared_prefix`); :meth:`past`
    hands them to :func:`target_logits` and :func:`target_hidden`, which then run the model only on what follows the
    prefix. ``frozen``: a frozen model's (the live teacher's) are computed once, at the first use; a trained model's
    (the student's) at every call, with gradients, since its weights change every step: one row's forward instead of
    one per example, whose keys and values every row then attends to (the gradients of the rows add up there, as
    they would over the rows' own copies). A dropout layer there draws one mask for all the rows instead of one each.
    """

    def __init__(self, prefix: list[int], frozen: bool = True):
        self.ids, self.kv, self.frozen = torch.tensor(prefix, dtype=torch.long), None, frozen

    def past(self, model: Any, input_ids: torch.Tensor) -> tuple | None:
        """``(p, keys_values)`` for a batch whose rows all start with the prefix, else None (the whole forward)."""
        p = len(self.ids)
        if not p or input_ids.shape[1] <= p:
            return None
        self.ids = self.ids.to(input_ids.device)  # once: a no-op when already there
        if not bool((input_ids[:, :p] == self.ids).all()):
            return None
        if not self.frozen:
            kv = self._keys_values(model)
            return (p, kv) if kv is not None else None
        if self.kv is None:
            with torch.no_grad():
                self.kv = self._keys_values(model)
        return (p, self.kv) if self.kv is not None else None

    def _keys_values(self, model: Any) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        # DDP's wrapper expects one forward per backward (the rows' own, after this); the gradients that flow back
        # through the prefix still reach the same parameters before its hooks fire, so the inner module runs it
        # (without logits_to_keep=1: skipping the prefix rows' unused logits made a real 0.5B LoRA step slower, for a
        # reason not found)
        out = getattr(model, "module", model)(input_ids=self.ids[None], use_cache=True)
        if out.cache is None:  # a model that returns no cache (gradient checkpointing in training)
            return None
        return [(layer.keys, layer.values) for layer in out.cache.layers]


def plain_head(model: Any) -> torch.nn.Linear | None:
    """The output layer when it is a plain bias-free ``nn.Linear`` (so ``h @ W.T`` is its logits) whose weight this
    process holds whole (not an FSDP shard), else None."""
    head = getattr(model, "module", model).get_output_embeddings()
    plain = type(head) is torch.nn.Linear and head.bias is None
    return head if plain and not engines.sharded(head) else None


def target_hidden(
    model: Any, batch: dict, rows: torch.Tensor, past: tuple | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The last hidden states of a causal LM at ``rows`` (``[B, T]`` bool), ``[N, H]`` in row-major order, and its
    output weight ``[V, H]``, with the output layer skipped (it is handed an empty input): what
    :func:`distillmt.losses.fused_linear_kd_loss` takes. The model must have a :func:`plain_head`. ``past``: as in
    :func:`target_logits`."""
    head, kept = plain_head(model), []

    def keep_rows(hidden: torch.Tensor) -> torch.Tensor:
        kept.append(hidden)
        return hidden[:0]

    _forward_with_head(model, head, batch, rows, past, keep_rows)
    return kept[0], head.weight


def target_ids(labels: torch.Tensor) -> torch.Tensor:
    """The target ids ``[N]`` in the order of :func:`target_logits`'s rows."""
    shifted = labels[:, 1:]
    return shifted[shifted.ne(IGNORE_INDEX)]


FP32_SDPA = "distillmt_sdpa_fp32"


def sdpa_in_fp32(
    module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any, **kwargs: Any
) -> tuple[torch.Tensor, Any]:
    """transformers' SDPA attention with its inputs cast to fp32 and autocast off; the output in the values' dtype.
    Registered with transformers as :data:`FP32_SDPA` by :func:`register_fp32_sdpa`."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    mask = attention_mask
    if mask is not None and mask.is_floating_point():
        mask = mask.float()
    with torch.autocast(query.device.type, enabled=False):
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), mask, **kwargs)
    return out.to(value.dtype), weights


def register_fp32_sdpa() -> None:
    """Make :data:`FP32_SDPA` an attention implementation transformers models can switch to, with SDPA's mask (a
    registered attention without its mask type gets no padding mask)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(FP32_SDPA, sdpa_in_fp32)
    AttentionMaskInterface.register(FP32_SDPA, sdpa_mask)


class TrainingAttention:
    """On a CPU, a transformers model's SDPA attention runs in fp32 while it trains (:func:`sdpa_in_fp32`); its own
    implementation again afterwards.

    Under bf16 (autocast or bf16 weights) SDPA's CPU backward is slow at these sizes, and in fp32 the same kernel is
    fast, with gradients closer to fp32's than bf16 SDPA's (docs/benchmarks/train-step-teacher-cpu.md). Eager
    attention is faster still but computes its scores in bf16, further from the exact gradient than either. An fp32
    model gets plain SDPA. Generation keeps SDPA, as fast there; GPUs keep their own kernels."""

    def __init__(self, model: Any, device: torch.device):
        self.model, self.before = model, getattr(getattr(model, "config", None), "_attn_implementation", None)
        if device.type != "cpu" or self.before != "sdpa" or not hasattr(model, "set_attn_implementation"):
            self.before = None  # not a transformers model, or nothing to switch
            return
        register_fp32_sdpa()
        self.apply()

    def apply(self) -> None:
        if self.before is not None:
            self.model.set_attn_implementation(FP32_SDPA)

    def restore(self) -> None:
        if self.before is not None:
            self.model.set_attn_implementation(self.before)
