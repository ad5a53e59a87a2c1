"""The one training loop: supervised fine-tuning on references or teacher labels, and logit KD (online teacher,
offline teacher cache, or on-policy GKD), on ``accelerate``.

Read top to bottom: setup → resume → loop (window of micro-batches → optimizer step → log/eval/checkpoint) → save.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from distillmt.errors import DistillmtError
from distillmt.io import atomic_write_bytes, write_json
from distillmt.prompts import IGNORE_INDEX, pad_batch


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


def _masked_ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of token cross-entropies over target positions; only the target rows are cast to fp32."""
    shift_labels = labels[:, 1:]
    mask = shift_labels.ne(IGNORE_INDEX)
    rows = logits[:, :-1][mask].float()
    if rows.numel() == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(rows, shift_labels[mask], reduction="sum")


def _make_scheduler(optimizer: Any, schedule: str, warmup: int, total: int) -> Any:
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total)


def _latest_checkpoint(ckpt_dir: Path) -> Path | None:
    done = sorted(p for p in ckpt_dir.glob("step-*") if (p / "state.json").exists() and not p.name.endswith(".tmp"))
    return done[-1] if done else None


def _save_checkpoint(ckpt_dir: Path, model: Any, optimizer: Any, scheduler: Any, state: dict) -> None:
    """A checkpoint folder appears under its final name only when complete (written as .tmp, then renamed)."""
    from safetensors.torch import save_file

    final = ckpt_dir / f"step-{state['step']:07d}"
    tmp = ckpt_dir / f"step-{state['step']:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(trainable, str(tmp / "trainable.safetensors"))
    for name, obj in (("optimizer.pt", optimizer.state_dict()), ("scheduler.pt", scheduler.state_dict())):
        import io

        buf = io.BytesIO()
        torch.save(obj, buf)
        atomic_write_bytes(tmp / name, buf.getvalue())
    write_json(tmp / "state.json", state)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in ckpt_dir.glob("step-*"):  # keep the newest only: it has everything resume needs
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(path: Path, model: Any, optimizer: Any, scheduler: Any) -> dict:
    from safetensors.torch import load_file

    trainable = load_file(str(path / "trainable.safetensors"))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(trainable) != names:
        raise DistillmtError(
            f"checkpoint {path} does not match this model's trainable parameters; delete it to restart"
        )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in trainable.items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True, map_location="cpu"))
    return json.loads((path / "state.json").read_text())


@torch.no_grad()
def evaluate_loss(model: Any, examples: list[dict], *, pad_token_id: int, batch_size: int, device: Any) -> float:
    """Token-weighted mean cross-entropy on ``examples`` (the validation loss)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    for b in range(0, len(order), batch_size):
        batch = pad_batch([examples[i] for i in order[b : b + batch_size]], pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        total += float(_masked_ce_sum(logits, batch["labels"]))
        count += _target_tokens(batch["labels"])
    model.train(was_training)
    return total / max(count, 1)


@torch.no_grad()
def _on_policy_examples(model: Any, examples: list[dict], kd: KDSettings, pad_token_id: int, device: Any) -> list[dict]:
    """GKD: replace each target by the student's own sample; the prompt stays, labels cover the sampled tokens."""
    prompts = [e["input_ids"][: next(i for i, y in enumerate(e["labels"]) if y != IGNORE_INDEX)] for e in examples]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding: generation continues at the right edge
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    was_training = model.training
    model.eval()
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
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
) -> dict[str, Any]:
    """Train ``model`` in place on tokenised examples ({"input_ids", "labels"}); checkpoints and metrics go to
    ``out_dir``. Resumes from the newest checkpoint there. Returns a summary (steps, losses, tokens/s)."""
    from accelerate import Accelerator

    from distillmt.losses import kd_loss, topk_distillation_loss

    if not train_examples:
        raise DistillmtError("no training examples")
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)

    # --- setup -------------------------------------------------------------------------------------------------
    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    if mixed_precision == "auto":
        mixed_precision = "bf16" if (not cpu and torch.cuda.is_bf16_supported()) else "no"
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=cpu)
    lengths = [len(e["input_ids"]) for e in train_examples]
    micro_per_epoch = math.ceil(len(train_examples) / batch_size)
    total_steps = max_steps or max(1, math.ceil(epochs * micro_per_epoch / grad_accum))
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]  # no weight decay on norms and biases
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )
    scheduler = _make_scheduler(optimizer, schedule, int(warmup_ratio * total_steps), total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    dev = accelerator.device
    if kd is not None and kd.teacher is not None:
        kd.teacher.to(dev).eval()
        for p in kd.teacher.parameters():
            p.requires_grad_(False)

    # --- resume ------------------------------------------------------------------------------------------------
    step, tokens_seen, train_seconds = 0, 0, 0.0
    last = _latest_checkpoint(ckpt_dir)
    if last is not None:
        state = _load_checkpoint(last, accelerator.unwrap_model(model), optimizer, scheduler)
        step, tokens_seen, train_seconds = state["step"], state["tokens_seen"], state["train_seconds"]
        if state.get("total_steps") != total_steps:
            raise DistillmtError(f"checkpoint {last} was made for {state.get('total_steps')} steps, not {total_steps}")
    metrics_path = out_dir / "metrics.jsonl"
    if metrics_path.exists():  # drop lines past the checkpoint: they will be logged again
        kept = [ln for ln in metrics_path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= step]
        metrics_path.write_text("".join(ln + "\n" for ln in kept))
    writer = None
    try:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out_dir / "tensorboard"))
    except ImportError:  # TensorBoard is optional; metrics.jsonl always has everything
        pass

    def log(record: dict) -> None:
        with open(metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    writer.add_scalar(k, v, record["step"])

    def save() -> None:
        state = {"step": step, "total_steps": total_steps, "tokens_seen": tokens_seen, "train_seconds": train_seconds}
        _save_checkpoint(ckpt_dir, accelerator.unwrap_model(model), optimizer, scheduler, state)

    # --- loop ----------------------------------------------------------------------------------------------------
    model.train()
    bar = tqdm(total=total_steps, initial=step, desc=desc, unit="step", disable=not progress, dynamic_ncols=True)
    epoch_batches: dict[int, list[list[int]]] = {}
    running: dict[str, float] = {}
    running_n = 0
    try:
        while step < total_steps:
            t0 = time.perf_counter()
            # Dropout and sampling draw from a generator seeded by the step, so a resumed run repeats them exactly.
            torch.manual_seed(seed * 7919 + step)
            window = []
            for m in range(step * grad_accum, (step + 1) * grad_accum):
                epoch, pos = divmod(m, micro_per_epoch)
                if epoch not in epoch_batches:
                    epoch_batches = {epoch: make_batches(lengths, batch_size, seed, epoch)}
                window.append([train_examples[i] for i in epoch_batches[epoch][pos]])
            on_policy = (
                kd is not None and kd.on_policy_prob > 0 and random.Random(seed + step).random() < kd.on_policy_prob
            )
            if on_policy:
                unwrapped = accelerator.unwrap_model(model)
                window = [_on_policy_examples(unwrapped, mb, kd, pad_token_id, dev) for mb in window]
            batches = [{k: v.to(dev) for k, v in pad_batch(mb, pad_token_id).items()} for mb in window]
            # Normalise by the target tokens of the whole window, so gradient accumulation gives the same update as
            # one big batch (a mean of per-micro-batch means would overweight short batches).
            n_window = max(sum(_target_tokens(b["labels"]) for b in batches), 1)
            step_stats: dict[str, float] = {}
            for i, batch in enumerate(batches):
                sync = i == len(batches) - 1
                ctx = accelerator.no_sync(model) if not sync and accelerator.num_processes > 1 else nullcontext()
                with ctx, accelerator.autocast():
                    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                    labels = batch["labels"]
                    n_mb = _target_tokens(labels)
                    fkl = None
                    if kd is not None and kd.cache is None:
                        with torch.no_grad():
                            t_logits = kd.teacher(
                                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                            ).logits
                        # one chunked fp32 pass gives CE, the divergence at T and the true forward KL at T=1
                        out = kd_loss(
                            logits,
                            t_logits,
                            labels,
                            alpha=kd.alpha,
                            temperature=kd.temperature,
                            divergence=kd.divergence,
                            beta=kd.beta,
                            vocab_size=kd.vocab_size,
                            chunk_size=kd.chunk_size,
                        )
                        ce_sum, d, fkl = out["ce"] * n_mb, out["kd"], out["forward_kl"]
                    else:
                        ce_sum = _masked_ce_sum(logits, labels)
                    if kd is None:
                        loss_sum = ce_sum
                        parts = {"ce": float(ce_sum.detach()) / max(n_mb, 1)}
                    else:
                        if kd.cache is not None:
                            lp, idx = kd.cache.gather(
                                [e["input_ids"] for e in window[i]], [e["labels"] for e in window[i]], labels.shape[1]
                            )
                            d = topk_distillation_loss(
                                logits,
                                lp.to(dev),
                                idx.to(dev),
                                labels,
                                divergence=kd.divergence,
                                temperature=kd.temperature,
                                beta=kd.beta,
                                chunk_size=kd.chunk_size,
                            )
                        kd_term = kd.temperature**2 * d
                        if on_policy:  # the student's own samples are no reference: only the teacher signal counts
                            loss_sum = kd_term * n_mb
                        else:
                            loss_sum = kd.alpha * ce_sum + (1 - kd.alpha) * kd_term * n_mb
                        parts = {"ce": float(ce_sum.detach()) / max(n_mb, 1), "kd": float(d.detach())}
                        if fkl is not None:
                            parts["forward_kl"] = float(fkl)
                    accelerator.backward(loss_sum / n_window)
                for k, v in parts.items():
                    step_stats[k] = step_stats.get(k, 0.0) + v * n_mb / n_window
                step_stats["loss"] = step_stats.get("loss", 0.0) + float(loss_sum.detach()) / n_window
            if max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens = sum(int(b["attention_mask"].sum()) for b in batches)
            tokens_seen += tokens
            train_seconds += time.perf_counter() - t0
            for k, v in step_stats.items():
                running[k] = running.get(k, 0.0) + v
            running_n += 1
            bar.update(1)
            bar.set_postfix(loss=f"{step_stats['loss']:.3f}", tok_s=f"{tokens_seen / max(train_seconds, 1e-9):.0f}")
            if step % log_every == 0 or step == total_steps:
                record = {
                    "step": step,
                    **{k: v / running_n for k, v in running.items()},
                    "lr": scheduler.get_last_lr()[0],
                    "tokens_per_s": tokens_seen / max(train_seconds, 1e-9),
                    "on_policy": on_policy,
                }
                running, running_n = {}, 0
                if eval_every and step % eval_every == 0 and valid_examples:
                    record["valid_ce"] = evaluate_loss(
                        model, valid_examples, pad_token_id=pad_token_id, batch_size=batch_size, device=dev
                    )
                log(record)
            elif eval_every and step % eval_every == 0 and valid_examples:
                log(
                    {
                        "step": step,
                        "valid_ce": evaluate_loss(
                            model, valid_examples, pad_token_id=pad_token_id, batch_size=batch_size, device=dev
                        ),
                    }
                )
            if save_every and step % save_every == 0 and step < total_steps:
                save()
    except KeyboardInterrupt:
        bar.close()
        save()  # the optimizer state matches `step`: the interrupted window is simply redone
        raise
    bar.close()
    valid_ce = (
        evaluate_loss(model, valid_examples, pad_token_id=pad_token_id, batch_size=batch_size, device=dev)
        if valid_examples
        else None
    )
    log({"step": step, "valid_ce": valid_ce})
    if writer is not None:
        writer.close()
    save()
    return {
        "steps": step,
        "tokens_seen": tokens_seen,
        "train_seconds": train_seconds,
        "tokens_per_s": tokens_seen / max(train_seconds, 1e-9),
        "valid_ce": valid_ce,
        "resumed_from": last.name if last is not None else None,
    }
