"""The one training loop: supervised fine-tuning on references or teacher labels, and logit KD (online teacher,
offline teacher cache, or on-policy GKD), on ``accelerate``.

Two parts, as in torchtune's KD recipe and TRL's GKD trainer: :func:`loss_step` scores one micro-batch for every
method (CE alone, or ``alpha·CE + (1 − alpha)·T²·D`` against the online teacher or the cached top-k, or ``T²·D`` on
the student's own samples) and returns the loss with its logged parts; :func:`train` reads top to bottom: setup →
resume → loop (pick the window's data → accumulate its gradients → optimizer step → log/eval/checkpoint) → save, and
never branches on the KD method.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from distillmt import engines
from distillmt.errors import DistillmtError
from distillmt.io import atomic_write_bytes, atomic_write_text, write_json
from distillmt.losses import fused_kd_loss, fused_linear_kd_loss, kd_loss, topk_kd_loss
from distillmt.prompts import IGNORE_INDEX, pad_batch, pad_left

log = logging.getLogger("distillmt.train")


@dataclass
class KDSettings:
    """What logit KD needs besides the student: loss = alpha*CE + (1-alpha)*T^2*D(teacher, student)."""

    alpha: float
    temperature: float
    divergence: str
    beta: float
    chunk_size: int
    vocab_size: int
    teacher: Any = None  # a causal LM, or None when the teacher comes from `cache`
    cache: Any = None  # a logit_cache.TeacherCache
    on_policy_prob: float = 0.0  # GKD's lambda: share of steps whose targets the student samples itself
    on_policy_temperature: float = 1.0
    on_policy_max_new_tokens: int = 48
    end_token_id: int | None = None
    fused: bool = False  # online teacher: the objective's gradient in closed form (losses.fused_kd_loss)
    teacher_prefix: PrefixCache | None = None  # the prompt prefix every example shares: the live teacher skips it


MIN_SHARED_PREFIX = 8  # shorter shared prefixes (the plain template's "English:") are not worth a cache


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


def make_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffled batches of similar length (less padding), the same for a given seed and epoch so resume is exact."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    pool = batch_size * 50
    batches = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start : start + pool], key=lambda i: lengths[i])
        batches.extend(chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def _target_tokens(labels: torch.Tensor) -> int:
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
    rows (a forward pre-hook on the output layer selects them from the last hidden states) halved a student step of
    the default experiment (0.49x, measured side by side). The model is called as usual, so DDP's hooks and
    accelerate's autocast still apply. ``past``: a frozen model's cached shared prefix (:meth:`PrefixCache.past`).
    """
    head = getattr(model, "module", model).get_output_embeddings()
    return _forward_with_head(model, head, batch, rows, past, lambda h: h).logits


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
        # (logits_to_keep=1, which would skip the prefix rows' unused logits, made a real 0.5B LoRA step 0.3 s slower
        # in a side-by-side test, for a reason not found; on a 64-wide model it saved time)
        out = getattr(model, "module", model)(input_ids=self.ids[None], use_cache=True)
        if out.cache is None:  # a model that returns no cache (gradient checkpointing in training)
            return None
        return [(layer.keys, layer.values) for layer in out.cache.layers]


def teacher_past(kd: KDSettings, batch: dict) -> tuple | None:
    """The live teacher's cached shared prefix for this batch, or None."""
    return kd.teacher_prefix.past(kd.teacher, batch["input_ids"]) if kd.teacher_prefix is not None else None


def _plain_head(model: Any) -> torch.nn.Linear | None:
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
    :func:`distillmt.losses.fused_linear_kd_loss` takes. The model must have a :func:`_plain_head`. ``past``: as in
    :func:`target_logits`."""
    head, kept = _plain_head(model), []

    def keep_rows(hidden: torch.Tensor) -> torch.Tensor:
        kept.append(hidden)
        return hidden[:0]

    _forward_with_head(model, head, batch, rows, past, keep_rows)
    return kept[0], head.weight


def _ce_sum(rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of token cross-entropies of the target rows ``[N, V]``, cast to fp32."""
    if rows.numel() == 0:
        return rows.sum() * 0.0
    return F.cross_entropy(rows.float(), targets, reduction="sum")


def _targets(labels: torch.Tensor) -> torch.Tensor:
    """The target ids ``[N]`` in the order of :func:`target_logits`'s rows."""
    shifted = labels[:, 1:]
    return shifted[shifted.ne(IGNORE_INDEX)]


def _make_scheduler(optimizer: Any, schedule: str, warmup: int, total: int) -> Any:
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total)


def _checkpoints(ckpt_dir: Path) -> list[Path]:
    """Finished checkpoint folders, oldest first (a folder gets its final name only once complete)."""
    return sorted(p for p in ckpt_dir.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))


def _save_checkpoint(
    ckpt_dir: Path, model: Any, optimizer: Any, scheduler: Any, state: dict, accelerator: Any = None
) -> None:
    """A checkpoint folder appears under its final name only when complete (written as .tmp, then renamed). The
    previous one is kept too, so a checkpoint damaged after the fact still leaves one to resume from. With several
    processes the main one writes it and the others wait (under DDP they hold the same state; under FSDP and
    DeepSpeed they first gather their shards, and the optimizer state is keyed by parameter name)."""
    main = accelerator is None or accelerator.is_main_process
    gathered = engines.gathered(model)
    if gathered or main:  # under FSDP and DeepSpeed every process takes part in gathering
        trainable, opt_state = engines.trained_state(model, optimizer)
    if main:
        _write_checkpoint(ckpt_dir, trainable, opt_state, scheduler.state_dict(), {**state, "sharded": gathered})
    if accelerator is not None and accelerator.num_processes > 1:
        accelerator.wait_for_everyone()


def _write_checkpoint(ckpt_dir: Path, trainable: dict, opt_state: dict, sched_state: dict, state: dict) -> None:
    import io

    from safetensors.torch import save_file

    final = ckpt_dir / f"step-{state['step']:07d}"
    tmp = ckpt_dir / f"step-{state['step']:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable, str(tmp / "trainable.safetensors"))
    for name, obj in (("optimizer.pt", opt_state), ("scheduler.pt", sched_state)):
        buf = io.BytesIO()
        torch.save(obj, buf)
        atomic_write_bytes(tmp / name, buf.getvalue())
    write_json(tmp / "state.json", state)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in _checkpoints(ckpt_dir)[:-2]:
        shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(path: Path, model: Any, optimizer: Any, scheduler: Any) -> dict:
    """Read every file of a checkpoint first, then apply it: a damaged file raises before the model is touched."""
    from safetensors.torch import load_file

    state = json.loads((path / "state.json").read_text())
    if not isinstance(state, dict) or not all(
        isinstance(state.get(k), (int, float)) for k in ("step", "tokens_seen", "train_seconds")
    ):
        raise ValueError("state.json lacks step, tokens_seen or train_seconds")
    trainable = load_file(str(path / "trainable.safetensors"))
    opt_state = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    sched_state = torch.load(path / "scheduler.pt", weights_only=True, map_location="cpu")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(trainable) != set(params):
        raise DistillmtError(
            f"checkpoint {path} does not match this model's trainable parameters; delete it to restart"
        )
    was, now = bool(state.get("sharded", False)), engines.gathered(model)
    if was != now:
        how = {True: "under FSDP or DeepSpeed", False: "without FSDP or DeepSpeed"}
        raise DistillmtError(
            f"checkpoint {path} was written {how[was]}; this run is {how[now]}: launch as before to resume"
        )
    engines.load_trained_state(model, optimizer, trainable, opt_state)
    scheduler.load_state_dict(sched_state)
    return state


@dataclass
class _Progress:
    """What a checkpoint's state.json records besides the weights."""

    step: int
    total_steps: int
    tokens_seen: int
    train_seconds: float

    def advance(self, tokens: int, seconds: float) -> None:
        self.step += 1
        self.tokens_seen += tokens
        self.train_seconds += seconds

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_seen / max(self.train_seconds, 1e-9)

    def summary(self, valid_ce: float | None, resumed_from: Path | None) -> dict[str, Any]:
        return {
            "steps": self.step,
            "tokens_seen": self.tokens_seen,
            "train_seconds": self.train_seconds,
            "tokens_per_s": self.tokens_per_s,
            "valid_ce": valid_ce,
            "resumed_from": resumed_from.name if resumed_from is not None else None,
        }


def _resume(
    ckpt_dir: Path, model: Any, optimizer: Any, scheduler: Any, total_steps: int
) -> tuple[_Progress, Path | None]:
    """Load the newest usable checkpoint; a damaged one falls back to the one before, none usable restarts at 0."""
    for path in reversed(_checkpoints(ckpt_dir)):
        try:
            state = _load_checkpoint(path, model, optimizer, scheduler)
        except DistillmtError:
            raise
        except Exception as e:  # truncated or unreadable file: any of safetensors', torch's or json's errors
            log.warning("checkpoint %s is damaged (%s: %s): trying the one before", path, type(e).__name__, e)
            continue
        if state.get("total_steps") != total_steps:
            raise DistillmtError(f"checkpoint {path} was made for {state.get('total_steps')} steps, not {total_steps}")
        log.info("resuming %s from %s", ckpt_dir.parent.name, path.name)
        return _Progress(state["step"], total_steps, state["tokens_seen"], state["train_seconds"]), path
    if _checkpoints(ckpt_dir):
        log.warning("no usable checkpoint in %s: this training stage starts again from step 0", ckpt_dir)
    return _Progress(0, total_steps, 0, 0.0), None


class _MetricsLog:
    """metrics.jsonl (and TensorBoard when installed). On resume, lines past the checkpoint are dropped (they will
    be logged again), and so is a line a kill cut short."""

    def __init__(self, out_dir: Path, step: int, write: bool = True):
        self.path, self.write = out_dir / "metrics.jsonl", write
        if self.path.exists() and write:
            kept = []
            for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
                if not line.strip():
                    continue
                try:
                    if json.loads(line).get("step", 0) <= step:
                        kept.append(line)
                except (ValueError, AttributeError):
                    log.warning("%s: dropped a damaged line (%r)", self.path, line[:60])
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        self.running: dict[str, float] = {}
        self.running_n = 0
        self.writer = None
        if not write:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out_dir / "tensorboard"))
        except ImportError:  # TensorBoard is optional; metrics.jsonl always has everything
            pass

    def add(self, stats: dict[str, float]) -> None:
        """Add one optimizer step's logged parts to the running means of the next record."""
        for k, v in stats.items():
            self.running[k] = self.running.get(k, 0.0) + v
        self.running_n += 1

    def means(self) -> dict[str, float]:
        """The running means since the last call, then reset."""
        out = {k: v / self.running_n for k, v in self.running.items()}
        self.running, self.running_n = {}, 0
        return out

    def log_step(self, step: int, *, summary: bool, valid_ce: float | None, **extra: Any) -> None:
        """One optimizer step's line, if it has anything to say: the running means (every ``log_every`` steps and
        at the end, with ``extra``) and/or the validation loss."""
        record: dict[str, Any] = {"step": step}
        if summary:
            record.update(self.means(), **extra)
        if valid_ce is not None:
            record["valid_ce"] = valid_ce
        if len(record) > 1:
            self.log(record)

    def log(self, record: dict) -> None:
        if not self.write:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


@torch.no_grad()
def evaluate_loss(
    model: Any, examples: list[dict], *, pad_token_id: int, batch_size: int, device: Any, share_prefix: bool = True
) -> float | None:
    """Token-weighted mean cross-entropy on ``examples`` (the validation loss); None when there are none.
    ``share_prefix``: run the prompt prefix every example shares once per batch (:class:`PrefixCache`)."""
    if not examples:
        return None
    prefix = PrefixCache(shared_prefix(examples) if share_prefix else [], frozen=False)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    for b in range(0, len(order), batch_size):
        batch = pad_batch([examples[i] for i in order[b : b + batch_size]], pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        rows = target_logits(model, batch, target_positions(batch["labels"]), prefix.past(model, batch["input_ids"]))
        total += float(_ce_sum(rows, _targets(batch["labels"])))
        count += rows.shape[0]
    model.train(was_training)
    if engines.sharded(model):  # a forward without backward leaves FSDP2's root parameters gathered
        engines.reshard(model)
    return total / max(count, 1)


@torch.no_grad()
def _on_policy_examples(model: Any, examples: list[dict], kd: KDSettings, pad_token_id: int, device: Any) -> list[dict]:
    """GKD: replace each target by the student's own sample; the prompt stays, labels cover the sampled tokens."""
    prompts = [e["input_ids"][: next(i for i, y in enumerate(e["labels"]) if y != IGNORE_INDEX)] for e in examples]
    enc = pad_left(prompts, pad_token_id)
    width = enc["input_ids"].shape[1]
    was_training = model.training
    model.eval()
    out = model.generate(
        input_ids=enc["input_ids"].to(device),
        attention_mask=enc["attention_mask"].to(device),
        do_sample=True,
        temperature=kd.on_policy_temperature,
        top_k=0,
        max_new_tokens=kd.on_policy_max_new_tokens,
        eos_token_id=kd.end_token_id,
        pad_token_id=pad_token_id,
    )
    model.train(was_training)
    new = []
    for i, p in enumerate(prompts):
        gen = out[i, width:].tolist()
        if kd.end_token_id in gen:
            gen = gen[: gen.index(kd.end_token_id) + 1]
        gen = gen or [kd.end_token_id]
        new.append({"input_ids": p + gen, "labels": [IGNORE_INDEX] * len(p) + gen})
    return new


def _loss_args(kd: KDSettings) -> dict[str, Any]:
    """The KD loss functions' settings, from ``kd``."""
    return {"temperature": kd.temperature, "divergence": kd.divergence, "beta": kd.beta,
            "vocab_size": kd.vocab_size, "chunk_size": kd.chunk_size}  # fmt: skip


def _online_teacher_terms(
    logits: torch.Tensor, batch: dict, kd: KDSettings, weights: tuple[float, float] | None = None
) -> dict[str, torch.Tensor]:
    rows, targets = target_positions(batch["labels"]), _targets(batch["labels"])
    with torch.no_grad():
        t_logits = target_logits(kd.teacher, batch, rows, teacher_past(kd, batch))
    # one chunked fp32 pass gives CE, the divergence at T and the true forward KL at T=1 (and, fused, the objective
    # with its gradient)
    args = _loss_args(kd)
    if weights is not None:
        return fused_kd_loss(logits, t_logits, targets, ce_weight=weights[0], kd_weight=weights[1], **args)
    return kd_loss(logits, t_logits, targets, **args)


def _fused_terms(model: Any, batch: dict, kd: KDSettings, weights: tuple[float, float], past: tuple | None) -> dict:
    """The online objective with its gradient in closed form; from both models' last hidden states (neither
    model's logits are ever held) when both output layers are plain, else from the target rows' logits."""
    rows = target_positions(batch["labels"])
    if _plain_head(model) is None or _plain_head(kd.teacher) is None:
        return _online_teacher_terms(target_logits(model, batch, rows, past), batch, kd, weights)
    h_s, w_s = target_hidden(model, batch, rows, past)
    with torch.no_grad():
        h_t, w_t = target_hidden(kd.teacher, batch, rows, teacher_past(kd, batch))
    args = {**_loss_args(kd), "ce_weight": weights[0], "kd_weight": weights[1]}
    return fused_linear_kd_loss(h_s, w_s, h_t, w_t, _targets(batch["labels"]), **args)


def _cached_teacher_terms(logits: torch.Tensor, batch: dict, examples: list[dict], kd: KDSettings) -> dict:
    labels = batch["labels"]
    lp, idx = kd.cache.gather([e["input_ids"] for e in examples], [e["labels"] for e in examples], labels.shape[1])
    mask = labels[:, 1:].ne(IGNORE_INDEX).to(lp.device)  # the cache is aligned with the labels
    return topk_kd_loss(
        logits,
        lp[:, 1:][mask].to(logits.device),
        idx[:, 1:][mask].to(logits.device),
        _targets(labels),
        **_loss_args(kd),
    )


def loss_step(
    model: Any,
    batch: dict,
    examples: list[dict],
    kd: KDSettings | None,
    on_policy: bool = False,
    prefix: PrefixCache | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one micro-batch, for every method, and its logged parts.

    Returns ``(loss_sum, parts)``: ``loss_sum`` is summed over the micro-batch's target tokens (the loop divides by
    the target tokens of the whole accumulation window); ``parts`` are means over its target tokens: ``ce``, and
    with KD ``kd`` (the divergence D, no T²) and, with an online teacher, ``forward_kl``. Without KD the loss is CE
    on the labels (references or teacher labels); with KD it is ``alpha·CE + (1 − alpha)·T²·D``, D taken against
    the online teacher or the cached top-k; on-policy (GKD) targets are the student's own samples, which are no
    reference, so only ``T²·D`` counts there. ``prefix``: the student's shared prompt prefix (trained, not frozen),
    run once for the whole micro-batch.
    """
    labels = batch["labels"]
    n = _target_tokens(labels)
    past = prefix.past(model, batch["input_ids"]) if prefix is not None else None
    if kd is None:
        ce_sum = _ce_sum(target_logits(model, batch, target_positions(labels), past), _targets(labels))
        return ce_sum, {"ce": float(ce_sum.detach()) / max(n, 1)}
    # The objective's weights, the one place they are set: alpha·CE + (1 − alpha)·T²·D, and T²·D alone on the
    # student's own samples, which are no reference.
    w_ce, w_kd = (0.0, kd.temperature**2) if on_policy else (kd.alpha, (1 - kd.alpha) * kd.temperature**2)
    if kd.fused and kd.cache is None:  # the same objective, its gradient in closed form
        terms = _fused_terms(model, batch, kd, (w_ce, w_kd), past)
        parts = {"ce": float(terms["ce"]), "kd": float(terms["kd"]), "forward_kl": float(terms["forward_kl"])}
        return terms["loss"] * n, parts
    logits = target_logits(model, batch, target_positions(labels), past)  # [N, V]: the output layer at targets alone
    terms = (
        _online_teacher_terms(logits, batch, kd)
        if kd.cache is None
        else _cached_teacher_terms(logits, batch, examples, kd)
    )
    ce_sum, d = terms["ce"] * n, terms["kd"]
    loss_sum = w_kd * d * n if on_policy else w_ce * ce_sum + w_kd * d * n
    parts = {"ce": float(ce_sum.detach()) / max(n, 1), "kd": float(d.detach())}
    if "forward_kl" in terms:
        parts["forward_kl"] = float(terms["forward_kl"])
    return loss_sum, parts


class _Window:
    """Which examples each optimizer step sees: shuffled length-bucketed micro-batches per epoch, a pure function of
    (seed, step), so a resumed run sees exactly what an uninterrupted one would."""

    def __init__(self, examples: list[dict], batch_size: int, grad_accum: int, seed: int):
        self.examples, self.batch_size, self.grad_accum, self.seed = examples, batch_size, grad_accum, seed
        self.lengths = [len(e["input_ids"]) for e in examples]
        self.micro_per_epoch = math.ceil(len(examples) / batch_size)
        self._epoch: dict[int, list[list[int]]] = {}

    def __call__(self, step: int) -> list[list[dict]]:
        window = []
        for m in range(step * self.grad_accum, (step + 1) * self.grad_accum):
            epoch, pos = divmod(m, self.micro_per_epoch)
            if epoch not in self._epoch:
                self._epoch = {epoch: make_batches(self.lengths, self.batch_size, self.seed, epoch)}
            window.append([self.examples[i] for i in self._epoch[epoch][pos]])
        return window


def _pick_targets(
    window: list[list[dict]], step: int, seed: int, kd: KDSettings | None, model: Any, pad: int, dev: Any
):
    """GKD's choice of data (TRL's ``training_step``): with probability lambda the targets are the student's own
    samples. Returns the window and whether it is on-policy."""
    on_policy = kd is not None and kd.on_policy_prob > 0 and random.Random(seed + step).random() < kd.on_policy_prob
    if on_policy:
        window = [_on_policy_examples(model, mb, kd, pad, dev) for mb in window]
    return window, on_policy


def _shard(window: list[list[dict]], accelerator: Any) -> tuple[list[list[dict]], list[float]]:
    """This process's share of every micro-batch of the window (every P-th example, P processes) and the weight of
    each share: a process whose share is empty gets the micro-batch's first example at weight 0, so every process
    takes part in every gradient sync."""
    n, rank = accelerator.num_processes, accelerator.process_index
    if n == 1:
        return window, [1.0] * len(window)
    shares = [mb[rank::n] or mb[:1] for mb in window]
    return shares, [1.0 if mb[rank::n] else 0.0 for mb in window]


def _forward_backward(
    model: Any,
    window: list[list[dict]],
    kd: KDSettings | None,
    on_policy: bool,
    accelerator: Any,
    pad: int,
    prefix: PrefixCache | None = None,
) -> tuple[dict[str, float], int]:
    """Accumulate the gradients of this process's share of one window; returns the window's logged means and token
    count (prompt included), summed over the processes."""
    dev, n_proc = accelerator.device, accelerator.num_processes
    window, weights = _shard(window, accelerator)
    batches = [{k: v.to(dev) for k, v in pad_batch(mb, pad).items()} for mb in window]
    # Normalise by the target tokens of the whole window (over every process), so gradient accumulation and data
    # parallelism give the same update as one big batch (a mean of per-micro-batch means would overweight short
    # batches). DDP and DeepSpeed average the processes' gradients: each process scales its sum by their number to undo
    # that.
    n_local = [_target_tokens(b["labels"]) * int(w) for b, w in zip(batches, weights, strict=True)]
    n_window = max(_sum_over_processes(accelerator, [sum(n_local)])[0] if n_proc > 1 else sum(n_local), 1)
    stats: dict[str, float] = {}
    for i, batch in enumerate(batches):
        sync = i == len(batches) - 1
        ctx = accelerator.no_sync(model) if not sync and n_proc > 1 else nullcontext()
        with ctx, accelerator.autocast():
            loss_sum, parts = loss_step(model, batch, window[i], kd, on_policy, prefix)
            if n_proc > 1:
                loss_sum = loss_sum * weights[i] * n_proc
            engines.backward(accelerator, loss_sum / n_window, last=sync)
        for k, v in parts.items():
            stats[k] = stats.get(k, 0.0) + v * n_local[i] / n_window
        stats["loss"] = stats.get("loss", 0.0) + float(loss_sum.detach()) / n_window / n_proc
    tokens = sum(int(b["attention_mask"].sum()) * int(w) for b, w in zip(batches, weights, strict=True))
    if n_proc > 1:
        values = _sum_over_processes(accelerator, [*stats.values(), tokens])
        stats, tokens = dict(zip(stats, values[:-1], strict=True)), int(values[-1])
    return stats, tokens


def _sum_over_processes(accelerator: Any, values: list[float]) -> list[float]:
    total = accelerator.reduce(torch.tensor(values, dtype=torch.float64, device=accelerator.device), "sum")
    return total.tolist()


def _check_finite(loss: float, step: int, ckpt_dir: Path) -> None:
    if not math.isfinite(loss):
        last = _checkpoints(ckpt_dir)
        raise DistillmtError(
            f"training loss is {loss} at step {step}; nothing was saved from this step (last good checkpoint: "
            f"{last[-1] if last else 'none'}); lower the learning rate or check the data"
        )


def _prefix_shareable(model: Any, examples: list[dict], share_prefix: bool, desc: str) -> bool:
    """``share_prefix``, unless FSDP shards the model: FSDP2 frees a layer's gathered weights after the layer's first
    backward in a step, and the backward of the prefix's own forward, a second one through every layer, would find
    them gone."""
    if share_prefix and engines.sharded(model) and shared_prefix(examples):
        log.info("%s: under FSDP the prompt prefix runs in every row, not once per micro-batch", desc)
        return False
    return share_prefix


def _optimizer(model: Any, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [  # no weight decay on norms and biases
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    # no empty group (a LoRA adapter has no norms or biases): DeepSpeed drops it, and the scheduler's groups would
    # no longer match. fused: one kernel for all parameters instead of a loop of small ops per parameter (the
    # default on CPUs).
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, fused=fused or None)


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


class _TrainingAttention:
    """On a CPU, a transformers model's SDPA attention runs in fp32 while it trains (:func:`sdpa_in_fp32`); its own
    implementation again afterwards.

    Under bf16 (autocast or bf16 weights) SDPA's CPU backward is slow at these sizes, and in fp32 the same kernel is
    fast: the default teacher's step took 0.75x the time (fused AdamW included; docs/benchmarks/
    train-step-teacher-cpu.md), with gradients closer to fp32's than bf16 SDPA's. Eager attention is faster still
    (0.66x) but computes its scores in bf16, further from the exact gradient than either. An fp32 model gets plain
    SDPA. Generation keeps SDPA, as fast there; GPUs keep their own kernels."""

    def __init__(self, model: Any, device: torch.device):
        self.model, self.before = model, getattr(getattr(model, "config", None), "_attn_implementation", None)
        if device.type != "cpu" or self.before != "sdpa" or not hasattr(model, "set_attn_implementation"):
            self.before = None  # not a transformers model, or nothing to switch
            return
        register_fp32_sdpa()
        model.set_attn_implementation(FP32_SDPA)

    def restore(self) -> None:
        if self.before is not None:
            self.model.set_attn_implementation(self.before)


def train(
    model: Any,
    train_examples: list[dict],
    valid_examples: list[dict],
    out_dir: str | Path,
    *,
    pad_token_id: int,
    seed: int = 0,
    epochs: float = 1.0,
    max_steps: int = 0,
    batch_size: int = 32,
    grad_accum: int = 1,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    warmup_ratio: float = 0.05,
    schedule: str = "cosine",
    max_grad_norm: float = 1.0,
    mixed_precision: str = "auto",
    eval_every: int = 0,
    save_every: int = 100,
    log_every: int = 10,
    kd: KDSettings | None = None,
    device: str = "auto",
    progress: bool = True,
    desc: str = "train",
    share_prefix: bool = True,
) -> dict[str, Any]:
    """Train ``model`` in place on tokenised examples ({"input_ids", "labels"}), resuming from the newest usable
    checkpoint in ``out_dir``, where checkpoints and metrics go; returns a summary (steps, losses, tokens/s).
    ``share_prefix``: the prompt prefix all examples share runs once per micro-batch (:class:`PrefixCache`)."""
    if not train_examples:
        raise DistillmtError("no training examples")
    ckpt_dir = Path(out_dir) / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)

    # --- setup
    accelerator = engines.make_accelerator(device, mixed_precision)
    engines.configure_deepspeed(accelerator, batch_size=batch_size, grad_accum=grad_accum, max_grad_norm=max_grad_norm)
    window_at = _Window(train_examples, batch_size, grad_accum, seed)
    total_steps = max_steps or max(1, math.ceil(epochs * window_at.micro_per_epoch / grad_accum))
    optimizer = _optimizer(model, lr, weight_decay)
    scheduler = _make_scheduler(optimizer, schedule, int(warmup_ratio * total_steps), total_steps)
    engines.same_start(model, accelerator)
    attention = _TrainingAttention(model, accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped, dev = accelerator.unwrap_model(model), accelerator.device
    share_prefix = _prefix_shareable(model, train_examples, share_prefix, desc)
    if kd is not None and kd.teacher is not None:
        kd.teacher.to(dev).eval().requires_grad_(False)

    valid_ce = partial(evaluate_loss, model, valid_examples, pad_token_id=pad_token_id, batch_size=batch_size,
                       device=dev, share_prefix=share_prefix)  # fmt: skip
    prefix = PrefixCache(shared_prefix(train_examples) if share_prefix else [], frozen=False)

    # --- resume
    p, resumed_from = _resume(ckpt_dir, unwrapped, optimizer, scheduler, total_steps)
    metrics = _MetricsLog(ckpt_dir.parent, p.step, write=accelerator.is_main_process)
    save = partial(_save_checkpoint, ckpt_dir, unwrapped, optimizer, scheduler, accelerator=accelerator)

    # --- loop: pick the window's data, accumulate its gradients, step, then log / evaluate / checkpoint
    model.train()
    bar = tqdm(total=total_steps, initial=p.step, desc=desc, unit="step", disable=not progress, dynamic_ncols=True)
    try:
        while p.step < total_steps:
            t0 = time.perf_counter()
            # Dropout and sampling draw from a generator seeded by the step, so a resumed run repeats them exactly.
            torch.manual_seed(seed * 7919 + p.step)
            window, on_policy = _pick_targets(window_at(p.step), p.step, seed, kd, unwrapped, pad_token_id, dev)
            stats, tokens = _forward_backward(model, window, kd, on_policy, accelerator, pad_token_id, prefix)
            _check_finite(stats["loss"], p.step + 1, ckpt_dir)
            if max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            p.advance(tokens, time.perf_counter() - t0)
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.3f}", tok_s=f"{p.tokens_per_s:.0f}")
            metrics.add(stats)
            metrics.log_step(
                p.step,
                summary=p.step % log_every == 0 or p.step == total_steps,
                valid_ce=valid_ce() if eval_every and p.step % eval_every == 0 else None,
                lr=scheduler.get_last_lr()[0],
                tokens_per_s=p.tokens_per_s,
                on_policy=on_policy,
            )
            if save_every and p.step % save_every == 0 and p.step < total_steps:
                save(asdict(p))
    except KeyboardInterrupt:
        save(asdict(p))  # the optimizer state matches `step`: the interrupted window is simply redone
        raise
    finally:
        bar.close()
        attention.restore()
    final_ce = valid_ce()
    metrics.log({"step": p.step, "valid_ce": final_ce})
    metrics.close()
    save(asdict(p))
    return p.summary(final_ce, resumed_from)
