"""The one training loop: supervised fine-tuning on references or teacher labels, and logit KD (online teacher,
offline teacher cache, or on-policy GKD), on ``accelerate``.

Two parts, as in torchtune's KD recipe and TRL's GKD trainer: :func:`loss_step` scores one micro-batch for every
method (CE alone, or ``alpha·CE + (1 − alpha)·T²·D`` against the online teacher or the cached top-k, or ``T²·D`` on
the student's own samples) and returns the loss with its logged parts; :func:`train` reads top to bottom: setup →
resume → loop (pick the window's data → accumulate its gradients → optimizer step → log/eval/checkpoint) → save, and
never branches on the KD method.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from distillmt import engines
from distillmt.checkpoints import Best, list_checkpoints, resume, save_checkpoint
from distillmt.errors import DistillmtError
from distillmt.forward import (
    PrefixCache,
    TrainingAttention,
    plain_head,
    shared_prefix,
    target_hidden,
    target_ids,
    target_logits,
    target_positions,
    target_tokens,
    width_multiple,
)
from distillmt.io import atomic_write_text
from distillmt.losses import fused_kd_loss, fused_linear_kd_loss, kd_loss, topk_kd_loss, uld_loss
from distillmt.prompts import IGNORE_INDEX, pad_batch, pad_left
from distillmt.sections import GKDConfig, SoftKDConfig, TrainConfig
from distillmt.tracking import log_values

log = logging.getLogger("distillmt.train")


class TeacherExamples:
    """The teacher's own encoding of the training examples, for a teacher whose tokenizer differs from the student's
    (ULD): ``teacher[i]`` is ``student[i]``'s pair in the teacher's tokenizer and prompt template. A micro-batch of
    student examples finds its teacher rows by the examples' token ids (examples with the same ids share the first
    one's teacher rows), so the training loop hands the objective its examples as it does for the logit cache."""

    def __init__(self, student: list[dict], teacher: list[dict], *, vocab_size: int, pad_token_id: int):
        if len(student) != len(teacher):
            raise ValueError(f"{len(student)} student examples but {len(teacher)} teacher examples: pair them 1:1")
        self.examples, self.vocab_size, self.pad_token_id = teacher, vocab_size, pad_token_id
        self._index: dict[tuple, int] = {}
        for i, e in enumerate(student):
            self._index.setdefault(self._key(e), i)

    @staticmethod
    def _key(example: dict) -> tuple:
        return tuple(example["input_ids"]), tuple(example["labels"])

    def batch(self, student_examples: list[dict]) -> dict[str, torch.Tensor]:
        """The teacher's padded batch for these student examples, row by row."""
        try:
            rows = [self.examples[self._index[self._key(e)]] for e in student_examples]
        except KeyError:
            raise ValueError("a training example has no teacher encoding (built for other examples?)") from None
        return pad_batch(rows, self.pad_token_id)


@dataclass
class Objective:
    """What logit KD learns from besides the references: ``alpha·CE + (1 − alpha)·T²·D(teacher, student)`` with the
    settings of ``kd`` (its alpha, T, divergence, beta, chunk size, fused), D taken against a live ``teacher`` or its
    top-k ``cache`` (a :class:`distillmt.logit_cache.TeacherCache`); with ``gkd``, a share ``gkd.lmbda`` of the steps
    train on the student's own samples (GKD), where ``T²·D`` alone counts. With ``kd.cross_tokenizer == "uld"`` it is
    ``CE + kd.uld_weight·ULD`` (:func:`distillmt.losses.uld_loss`) against the live teacher run on its own encoding
    of the examples (``teacher_examples``; ``teacher_prefix`` is then the teacher's shared prefix in its own ids).
    The sections are used as they are, but for GKD's own divergence and beta, which replace ``kd``'s where set
    (:meth:`GKDConfig.objective`)."""

    kd: SoftKDConfig
    vocab_size: int
    teacher: Any = None
    cache: Any = None
    gkd: GKDConfig | None = None
    end_token_id: int | None = None  # where an on-policy sample ends
    teacher_prefix: PrefixCache | None = None  # the prompt prefix every example shares: the live teacher skips it
    teacher_examples: TeacherExamples | None = None  # ULD: the teacher's own encoding of the examples
    # GKD: the model that samples the on-policy targets, given the model in training (a plain copy with the LoRA
    # adapter merged, much faster to decode on a CPU); None: the model in training itself
    sampler: Callable[[Any], Any] | None = None

    def __post_init__(self) -> None:
        uld = self.kd.cross_tokenizer == "uld"
        if uld and (self.teacher is None or self.teacher_examples is None or self.gkd is not None):
            raise ValueError(
                "soft_kd.cross_tokenizer=uld needs the live teacher and its own encoding of the examples "
                "(teacher_examples); neither the logit cache nor GKD's on-policy samples have one"
            )
        if not uld and self.teacher_examples is not None:
            raise ValueError("teacher_examples are for soft_kd.cross_tokenizer=uld")
        if self.gkd is not None:
            self.kd = self.gkd.objective(self.kd)

    def weights(self, on_policy: bool) -> tuple[float, float]:
        """``(w_ce, w_kd)``, the one place they are set: the student's own samples are no reference, so CE drops;
        ULD keeps its paper's form, CE at weight 1 and ``uld_weight`` on ULD, without T²."""
        if self.kd.cross_tokenizer == "uld":
            return 1.0, self.kd.uld_weight
        t2 = self.kd.temperature**2
        return (0.0, t2) if on_policy else (self.kd.alpha, (1 - self.kd.alpha) * t2)

    def divergence_args(self) -> dict[str, Any]:
        """The settings every loss function of :mod:`distillmt.losses` takes, read from ``kd`` as they are."""
        kd = self.kd
        return {"temperature": kd.temperature, "divergence": kd.divergence, "beta": kd.beta,
                "vocab_size": self.vocab_size, "chunk_size": kd.chunk_size}  # fmt: skip


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


def teacher_past(objective: Objective, batch: dict) -> tuple | None:
    """The live teacher's cached shared prefix for this batch, or None."""
    prefix = objective.teacher_prefix
    return prefix.past(objective.teacher, batch["input_ids"]) if prefix is not None else None


def _ce_sum(rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of token cross-entropies of the target rows ``[N, V]``, cast to fp32."""
    if rows.numel() == 0:
        return rows.sum() * 0.0
    return F.cross_entropy(rows.float(), targets, reduction="sum")


def _make_scheduler(optimizer: Any, schedule: str, warmup: int, total: int) -> Any:
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total)


class _MetricsLog:
    """metrics.jsonl, and every record to the ``trackers`` asked for (accelerate's, see :mod:`distillmt.tracking`).
    On resume, lines past the checkpoint are dropped (they will be logged again), and so is a line a kill cut short."""

    def __init__(self, out_dir: Path, step: int, write: bool = True, trackers: Sequence[Any] = ()):
        self.path, self.write, self.trackers = out_dir / "metrics.jsonl", write, trackers
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

    def log_step(self, step: int, *, summary: bool, valid: dict[str, float | None] | None, **extra: Any) -> None:
        """One optimizer step's line, if it has anything to say: the running means (every ``log_every`` steps and
        at the end, with ``extra``) and/or the validation measures (``valid_ce``, ``valid_chrf``)."""
        record: dict[str, Any] = {"step": step}
        if summary:
            record.update(self.means(), **extra)
        record.update({k: v for k, v in (valid or {}).items() if v is not None})
        if len(record) > 1:
            self.log(record)

    def log(self, record: dict) -> None:
        if not self.write:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        log_values(self.trackers, record, record["step"])


@torch.no_grad()
def evaluate_loss(
    model: Any,
    examples: list[dict],
    *,
    pad_token_id: int,
    batch_size: int,
    device: Any,
    share_prefix: bool = True,
    multiple_of: int = 1,
) -> float | None:
    """Token-weighted mean cross-entropy on ``examples`` (the validation loss); None when there are none.
    ``share_prefix``: run the prompt prefix every example shares once per batch (:class:`PrefixCache`);
    ``multiple_of``: what a batch's length is rounded up to (:func:`distillmt.forward.width_multiple`)."""
    if not examples:
        return None
    prefix = PrefixCache(shared_prefix(examples) if share_prefix else [], frozen=False)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    for b in range(0, len(order), batch_size):
        batch = pad_batch([examples[i] for i in order[b : b + batch_size]], pad_token_id, multiple_of)
        batch = {k: v.to(device) for k, v in batch.items()}
        rows = target_logits(model, batch, target_positions(batch["labels"]), prefix.past(model, batch["input_ids"]))
        total += float(_ce_sum(rows, target_ids(batch["labels"])))
        count += rows.shape[0]
    model.train(was_training)
    if engines.sharded(model):  # a forward without backward leaves FSDP2's root parameters gathered
        engines.reshard(model)
    return total / max(count, 1)


@torch.no_grad()
def _on_policy_examples(
    model: Any, examples: list[dict], objective: Objective, pad_token_id: int, device: Any
) -> list[dict]:
    """GKD: replace each target by the student's own sample; the prompt stays, labels cover the sampled tokens."""
    gkd, end = objective.gkd, objective.end_token_id
    prompts = [e["input_ids"][: next(i for i, y in enumerate(e["labels"]) if y != IGNORE_INDEX)] for e in examples]
    enc = pad_left(prompts, pad_token_id)
    width = enc["input_ids"].shape[1]
    was_training = model.training
    model.eval()
    sampler = objective.sampler(model) if objective.sampler is not None else model
    out = sampler.generate(
        input_ids=enc["input_ids"].to(device),
        attention_mask=enc["attention_mask"].to(device),
        do_sample=True,
        temperature=gkd.temperature,
        top_k=0,
        max_new_tokens=gkd.max_new_tokens,
        eos_token_id=end,
        pad_token_id=pad_token_id,
    )
    model.train(was_training)
    new = []
    for i, p in enumerate(prompts):
        gen = out[i, width:].tolist()
        if end in gen:
            gen = gen[: gen.index(end) + 1]
        gen = gen or [end]
        new.append({"input_ids": p + gen, "labels": [IGNORE_INDEX] * len(p) + gen})
    return new


def _online_teacher_terms(
    logits: torch.Tensor, batch: dict, objective: Objective, weights: tuple[float, float] | None = None
) -> dict[str, torch.Tensor]:
    rows, targets = target_positions(batch["labels"]), target_ids(batch["labels"])
    with torch.no_grad():
        t_logits = target_logits(objective.teacher, batch, rows, teacher_past(objective, batch))
    # one chunked fp32 pass gives CE, the divergence at T and the true forward KL at T=1 (and, fused, the objective
    # with its gradient)
    args = objective.divergence_args()
    if weights is not None:
        return fused_kd_loss(logits, t_logits, targets, ce_weight=weights[0], kd_weight=weights[1], **args)
    return kd_loss(logits, t_logits, targets, **args)


def _fused_terms(
    model: Any, batch: dict, objective: Objective, weights: tuple[float, float], past: tuple | None
) -> dict:
    """The online objective with its gradient in closed form; from both models' last hidden states (neither
    model's logits are ever held) when both output layers are plain, else from the target rows' logits."""
    rows = target_positions(batch["labels"])
    teacher = objective.teacher
    if plain_head(model) is None or plain_head(teacher) is None:
        return _online_teacher_terms(target_logits(model, batch, rows, past), batch, objective, weights)
    h_s, w_s = target_hidden(model, batch, rows, past)
    with torch.no_grad():
        h_t, w_t = target_hidden(teacher, batch, rows, teacher_past(objective, batch))
    args = {**objective.divergence_args(), "ce_weight": weights[0], "kd_weight": weights[1]}
    return fused_linear_kd_loss(h_s, w_s, h_t, w_t, target_ids(batch["labels"]), **args)


def _uld_terms(logits: torch.Tensor, batch: dict, examples: list[dict], objective: Objective) -> dict[str, Any]:
    """ULD between the student's target rows and those of the live teacher run on its own encoding of the same
    examples; each side's i-th target token is paired (:func:`distillmt.losses.uld_loss`)."""
    side = objective.teacher_examples
    t_batch = {k: v.to(logits.device) for k, v in side.batch(examples).items()}
    t_rows = target_positions(t_batch["labels"])
    with torch.no_grad():
        t_logits = target_logits(objective.teacher, t_batch, t_rows, teacher_past(objective, t_batch))
    kd = objective.kd
    return uld_loss(logits, t_logits, target_positions(batch["labels"]), t_rows, temperature=kd.temperature,
                    student_vocab=objective.vocab_size, teacher_vocab=side.vocab_size, chunk_size=kd.chunk_size)  # fmt: skip


def _cached_teacher_terms(logits: torch.Tensor, batch: dict, examples: list[dict], objective: Objective) -> dict:
    labels = batch["labels"]
    lp, idx = objective.cache.gather(
        [e["input_ids"] for e in examples], [e["labels"] for e in examples], labels.shape[1]
    )
    mask = labels[:, 1:].ne(IGNORE_INDEX).to(lp.device)  # the cache is aligned with the labels
    return topk_kd_loss(
        logits,
        lp[:, 1:][mask].to(logits.device),
        idx[:, 1:][mask].to(logits.device),
        target_ids(labels),
        **objective.divergence_args(),
    )


def loss_step(
    model: Any,
    batch: dict,
    examples: list[dict],
    objective: Objective | None,
    on_policy: bool = False,
    prefix: PrefixCache | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one micro-batch, for every method, and its logged parts.

    Returns ``(loss_sum, parts)``: ``loss_sum`` is summed over the micro-batch's target tokens (the loop divides by
    the target tokens of the whole accumulation window); ``parts`` are means over its target tokens: ``ce``, and
    with KD ``kd`` (the divergence D, no T²) and, with an online teacher, ``forward_kl``. Without KD the loss is CE
    on the labels (references or teacher labels); with KD it is ``alpha·CE + (1 − alpha)·T²·D``, D taken against
    the online teacher or the cached top-k; on-policy (GKD) targets are the student's own samples, which are no
    reference, so only ``T²·D`` counts there. Between tokenizers (ULD) it is ``CE + uld_weight·ULD``, ``kd`` being
    the ULD's mean over the target tokens paired with the teacher's. ``prefix``: the student's shared prompt prefix
    (trained, not frozen), run once for the whole micro-batch.
    """
    labels = batch["labels"]
    n = target_tokens(labels)
    past = prefix.past(model, batch["input_ids"]) if prefix is not None else None
    if objective is None:
        ce_sum = _ce_sum(target_logits(model, batch, target_positions(labels), past), target_ids(labels))
        return ce_sum, {"ce": float(ce_sum.detach()) / max(n, 1)}
    w_ce, w_kd = objective.weights(on_policy)
    if objective.teacher_examples is not None:  # ULD: the teacher reads its own tokenization of the examples
        logits = target_logits(model, batch, target_positions(labels), past)
        ce_sum, terms = _ce_sum(logits, target_ids(labels)), _uld_terms(logits, batch, examples, objective)
        # ULD is summed over the aligned tokens and, like CE, divided by the window's target tokens
        loss_sum = w_ce * ce_sum + w_kd * terms["uld"] * terms["aligned"]
        return loss_sum, {"ce": float(ce_sum.detach()) / max(n, 1), "kd": float(terms["uld"].detach())}
    if objective.kd.fused and objective.cache is None:  # the same objective, its gradient in closed form
        terms = _fused_terms(model, batch, objective, (w_ce, w_kd), past)
        parts = {"ce": float(terms["ce"]), "kd": float(terms["kd"]), "forward_kl": float(terms["forward_kl"])}
        return terms["loss"] * n, parts
    logits = target_logits(model, batch, target_positions(labels), past)  # [N, V]: the output layer at targets alone
    terms = (
        _online_teacher_terms(logits, batch, objective)
        if objective.cache is None
        else _cached_teacher_terms(logits, batch, examples, objective)
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
    window: list[list[dict]], step: int, seed: int, objective: Objective | None, model: Any, pad: int, dev: Any
) -> tuple[list[list[dict]], bool]:
    """GKD's choice of data (TRL's ``training_step``): with probability lambda the targets are the student's own
    samples. Returns the window and whether it is on-policy."""
    lmbda = objective.gkd.lmbda if objective is not None and objective.gkd is not None else 0.0
    on_policy = lmbda > 0 and random.Random(seed + step).random() < lmbda
    if on_policy:
        window = [_on_policy_examples(model, mb, objective, pad, dev) for mb in window]
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
    objective: Objective | None,
    on_policy: bool,
    accelerator: Any,
    pad: int,
    prefix: PrefixCache | None = None,
    multiple_of: int = 1,
) -> tuple[dict[str, float], int]:
    """Accumulate the gradients of this process's share of one window; returns the window's logged means and token
    count (prompt included, padding not), summed over the processes. ``multiple_of``: as in :func:`evaluate_loss`."""
    dev, n_proc = accelerator.device, accelerator.num_processes
    window, weights = _shard(window, accelerator)
    batches = [{k: v.to(dev) for k, v in pad_batch(mb, pad, multiple_of).items()} for mb in window]
    # Normalise by the target tokens of the whole window (over every process), so gradient accumulation and data
    # parallelism give the same update as one big batch (a mean of per-micro-batch means would overweight short
    # batches). DDP and DeepSpeed average the processes' gradients: each process scales its sum by their number to undo
    # that.
    n_local = [target_tokens(b["labels"]) * int(w) for b, w in zip(batches, weights, strict=True)]
    n_window = max(_sum_over_processes(accelerator, [sum(n_local)])[0] if n_proc > 1 else sum(n_local), 1)
    stats: dict[str, float] = {}
    for i, batch in enumerate(batches):
        sync = i == len(batches) - 1
        ctx = accelerator.no_sync(model) if not sync and n_proc > 1 else nullcontext()
        with ctx, accelerator.autocast():
            loss_sum, parts = loss_step(model, batch, window[i], objective, on_policy, prefix)
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
        last = list_checkpoints(ckpt_dir)
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


def _best_of(cfg: TrainConfig, score_valid: Callable[[Any], float] | None) -> Best | None:
    """The record of the best weights so far when ``cfg.keep_best`` (None otherwise)."""
    if not cfg.keep_best:
        return None
    if not cfg.eval_every:
        raise DistillmtError(
            "keep_best needs eval_every > 0: the best weights are picked among the validations every eval_every steps"
        )
    if cfg.select_by == "valid_chrf" and score_valid is None:
        raise DistillmtError("select_by=valid_chrf needs score_valid: a function that translates the validation split")
    return Best(metric=cfg.select_by)


class _Validation:
    """The validation measures at a step: the CE, and with ``score`` the chrF of the validation split's translations
    (``score(model)``, run in eval mode with the model's own attention). With ``best`` (``keep_best``) the weights
    of the best one so far are kept, and :meth:`finish` puts them back into the model. The start is a candidate too:
    a second training phase (KD after fine-tuning) may only make the model worse."""

    def __init__(
        self,
        measure: Callable[[], float | None],
        best: Best | None,
        model: Any,
        optimizer: Any,
        score_valid: Callable[[Any], float] | None = None,
        attention: TrainingAttention | None = None,
    ):
        if score_valid is not None and engines.sharded(model):
            raise DistillmtError("translating the validation split while training is not supported under FSDP")
        self.measure, self.best, self.model, self.optimizer = measure, best, model, optimizer
        self.score_valid, self.attention = score_valid, attention
        self.last: tuple[int, dict[str, float | None]] | None = None
        self.planned_steps: int | None = None  # set when training stopped early

    def score(self) -> float:
        # the model as it translates after training: eval mode (no dropout), its own attention
        if self.attention is not None:
            self.attention.restore()
        self.model.eval()
        try:
            return self.score_valid(self.model)
        finally:
            self.model.train()
            if self.attention is not None:
                self.attention.apply()

    def __call__(self, step: int) -> dict[str, float | None]:
        if self.last is not None and self.last[0] == step:  # the end of training, just validated
            return self.last[1]
        measured = {"valid_ce": self.measure()}
        if self.score_valid is not None:
            measured["valid_chrf"] = self.score()
        if self.best is not None:
            self.best.offer(step, measured, self.model, self.optimizer)
        self.last = (step, measured)
        return measured

    def start(self, step: int, metrics: _MetricsLog) -> None:
        """With ``keep_best``, the validation of the starting weights, logged at step 0 (not again on resume)."""
        if self.best is not None and step == 0:
            metrics.log({"step": 0, **self(0)})

    def stalled(self, step: int, patience_steps: int, total_steps: int, desc: str) -> bool:
        """Early stopping: the best is ``patience_steps`` or more behind ``step`` (never without ``patience``)."""
        best = self.best.step if self.best is not None else None
        if not patience_steps or best is None or step - best < patience_steps or step >= total_steps:
            return False
        log.info(
            "%s: stopped early at step %d of %d: no better validation since step %d", desc, step, total_steps, best
        )
        self.planned_steps = total_steps
        return True

    def record(self) -> dict[str, Any]:
        """The best step and its measures for the last line of metrics.jsonl (nothing without ``keep_best``)."""
        return self.best.state() if self.best is not None else {}

    def finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        """The training summary; with ``keep_best`` the best weights back in the model, and the figures of
        :meth:`Best.summary` (``valid_ce`` is then the saved model's); ``stopped_early`` and ``planned_steps`` when it
        stopped early."""
        if self.planned_steps is not None:
            summary = {**summary, "stopped_early": True, "planned_steps": self.planned_steps}
        if self.best is None:
            return summary
        self.best.restore(self.model, self.optimizer)
        return {**summary, **self.best.summary(summary["valid_ce"])}


def _schedule(model: Any, examples: list[dict], cfg: TrainConfig, seed: int) -> tuple[_Window, int, Any, Any]:
    """Which examples each step sees, how many steps, and AdamW with its learning-rate schedule."""
    window_at = _Window(examples, cfg.batch_size, cfg.grad_accum, seed)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * window_at.micro_per_epoch / cfg.grad_accum))
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
    scheduler = _make_scheduler(optimizer, cfg.schedule, int(cfg.warmup_ratio * total_steps), total_steps)
    return window_at, total_steps, optimizer, scheduler


def _teacher_ready(objective: Objective | None, model: Any, accelerator: Any) -> int:
    """Put a live teacher on the training device, frozen and in eval mode; returns what a batch's length is rounded
    up to for the model in training and that teacher (:func:`distillmt.forward.width_multiple`)."""
    teacher = objective.teacher if objective is not None else None
    if teacher is not None:
        teacher.to(accelerator.device).eval().requires_grad_(False)
    return width_multiple(model, teacher, autocast_bf16=accelerator.mixed_precision == "bf16")


def _freeze_gc() -> None:
    """Every training step makes and drops thousands of autograd objects, so Python's collector runs often, and each
    full collection would walk every training example again: the objects alive now are frozen, skipped until
    ``gc.unfreeze()``."""
    gc.collect()
    gc.freeze()


def make_optimizer(model: Any, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, without weight decay on norms and biases."""
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


def train(
    model: Any,
    train_examples: list[dict],
    valid_examples: list[dict],
    out_dir: str | Path,
    cfg: TrainConfig,
    objective: Objective | None = None,
    *,
    pad_token_id: int,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
    desc: str = "train",
    share_prefix: bool = True,
    trackers: Sequence[Any] = (),
    score_valid: Callable[[Any], float] | None = None,
) -> dict[str, Any]:
    """Train ``model`` in place on tokenised examples ({"input_ids", "labels"}) with the budget and optimizer of
    ``cfg``: CE on the labels, or logit KD with ``objective``. Resumes from the newest usable checkpoint in
    ``out_dir``, where checkpoints and metrics go; returns a summary (steps, losses, tokens/s). ``share_prefix``: the
    prompt prefix all examples share runs once per micro-batch (:class:`distillmt.forward.PrefixCache`).
    ``trackers``: started accelerate trackers (:func:`distillmt.tracking.tracker_run`) that also get every record of
    metrics.jsonl at its step, from the main process; the caller finishes them. ``score_valid(model)``: the chrF of
    the validation split's translations, for ``cfg.select_by=valid_chrf`` (see ``_Validation``)."""
    if not train_examples:
        raise DistillmtError("no training examples")
    best = _best_of(cfg, score_valid)
    ckpt_dir = Path(out_dir) / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)

    # --- setup
    accelerator = engines.make_accelerator(device, cfg.mixed_precision)
    engines.configure_deepspeed(accelerator, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                                max_grad_norm=cfg.max_grad_norm)  # fmt: skip
    window_at, total_steps, optimizer, scheduler = _schedule(model, train_examples, cfg, seed)
    engines.same_start(model, accelerator)
    attention = TrainingAttention(model, accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped, dev = accelerator.unwrap_model(model), accelerator.device
    share_prefix = _prefix_shareable(model, train_examples, share_prefix, desc)
    multiple = _teacher_ready(objective, unwrapped, accelerator)

    measure = partial(evaluate_loss, model, valid_examples, pad_token_id=pad_token_id, batch_size=cfg.batch_size,
                      device=dev, share_prefix=share_prefix, multiple_of=multiple)  # fmt: skip
    validate = _Validation(measure, best, unwrapped, optimizer, score_valid, attention)
    prefix = PrefixCache(shared_prefix(train_examples) if share_prefix else [], frozen=False)

    # --- resume
    p, resumed_from = resume(ckpt_dir, unwrapped, optimizer, scheduler, total_steps, best)
    metrics = _MetricsLog(ckpt_dir.parent, p.step, write=accelerator.is_main_process, trackers=trackers)
    save = partial(save_checkpoint, ckpt_dir, unwrapped, optimizer, scheduler, accelerator=accelerator, best=best)
    validate.start(p.step, metrics)

    # --- loop: pick the window's data, accumulate its gradients, step, then log / evaluate / checkpoint
    model.train()
    _freeze_gc()
    bar = tqdm(total=total_steps, initial=p.step, desc=desc, unit="step", disable=not progress, dynamic_ncols=True)
    try:
        while p.step < total_steps:
            t0 = time.perf_counter()
            # Dropout and sampling draw from a generator seeded by the step, so a resumed run repeats them exactly.
            torch.manual_seed(seed * 7919 + p.step)
            window, on_policy = _pick_targets(window_at(p.step), p.step, seed, objective, unwrapped, pad_token_id, dev)
            stats, tokens = _forward_backward(model, window, objective, on_policy, accelerator, pad_token_id, prefix,
                                              multiple)  # fmt: skip
            _check_finite(stats["loss"], p.step + 1, ckpt_dir)
            if cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            p.advance(tokens, time.perf_counter() - t0)
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.3f}", tok_s=f"{p.tokens_per_s:.0f}")
            metrics.add(stats)
            valid = validate(p.step) if cfg.eval_every and p.step % cfg.eval_every == 0 else None
            metrics.log_step(
                p.step,
                summary=p.step % cfg.log_every == 0 or p.step == total_steps,
                valid=valid,
                lr=scheduler.get_last_lr()[0],
                tokens_per_s=p.tokens_per_s,
                on_policy=on_policy,
            )
            if valid is not None and validate.stalled(p.step, cfg.patience * cfg.eval_every, total_steps, desc):
                break
            if cfg.save_every and p.step % cfg.save_every == 0 and p.step < total_steps:
                save(asdict(p))
    except KeyboardInterrupt:
        save(asdict(p))  # the optimizer state matches `step`: the interrupted window is simply redone
        raise
    finally:
        bar.close()
        attention.restore()
        gc.unfreeze()
    final = validate(p.step)
    metrics.log({"step": p.step, **final, **validate.record()})
    save(asdict(p))
    return validate.finish(p.summary(final["valid_ce"], resumed_from))
