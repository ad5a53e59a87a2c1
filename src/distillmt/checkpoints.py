"""Training checkpoints: written whole or not at all, the last two kept, and resumed from the newest usable one.

A checkpoint folder ``step-NNNNNNN/`` holds the trainable weights (safetensors), the optimizer and scheduler state
(``torch.load(weights_only=True)``) and ``state.json`` (step, tokens seen, seconds trained). Under FSDP and
DeepSpeed the processes gather their shards first and the optimizer state is keyed by parameter name.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distillmt import engines
from distillmt.errors import DistillmtError
from distillmt.io import atomic_write_bytes, disk_full_error, write_json

log = logging.getLogger("distillmt.train")


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Finished checkpoint folders, oldest first (a folder gets its final name only once complete)."""
    return sorted(p for p in ckpt_dir.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))


def save_checkpoint(
    ckpt_dir: Path, model: Any, optimizer: Any, scheduler: Any, state: dict, accelerator: Any = None,
    best: Best | None = None,
) -> None:  # fmt: skip
    """A checkpoint folder appears under its final name only when complete (written as .tmp, then renamed). The
    previous one is kept too, so a checkpoint damaged after the fact still leaves one to resume from. With several
    processes the main one writes it and the others wait (under DDP they hold the same state; under FSDP and
    DeepSpeed they first gather their shards, and the optimizer state is keyed by parameter name). ``best``
    (``keep_best``): the best weights so far go with it (``best.safetensors``), their step and measures into
    state.json."""
    main = accelerator is None or accelerator.is_main_process
    gathered = engines.gathered(model)
    if gathered or main:  # under FSDP and DeepSpeed every process takes part in gathering
        trainable, opt_state = engines.trained_state(model, optimizer)
    if main:
        state = {**state, "sharded": gathered, **(best.state() if best is not None else {})}
        best_weights = best.weights if best is not None else None
        _write_checkpoint(ckpt_dir, trainable, opt_state, scheduler.state_dict(), state, best_weights)
    if accelerator is not None and accelerator.num_processes > 1:
        accelerator.wait_for_everyone()


def _write_checkpoint(
    ckpt_dir: Path, trainable: dict, opt_state: dict, sched_state: dict, state: dict, best: dict | None = None
) -> None:
    import io

    from safetensors.torch import save_file

    final = ckpt_dir / f"step-{state['step']:07d}"
    tmp = ckpt_dir / f"step-{state['step']:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_file(trainable, str(tmp / "trainable.safetensors"))
        if best is not None:
            save_file(best, str(tmp / BEST_FILE))
        for name, obj in (("optimizer.pt", opt_state), ("scheduler.pt", sched_state)):
            buf = io.BytesIO()
            torch.save(obj, buf)
            atomic_write_bytes(tmp / name, buf.getvalue())
        write_json(tmp / "state.json", state)
    except BaseException as e:
        # A half-written checkpoint is never resumed from, and on a full disk it holds the space the user needs.
        shutil.rmtree(tmp, ignore_errors=True)
        full = disk_full_error(e, final)
        if full is not None:
            raise full from e
        raise
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in list_checkpoints(ckpt_dir)[:-2]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path, model: Any, optimizer: Any, scheduler: Any, best: Best | None = None) -> dict:
    """Read every file of a checkpoint first, then apply it: a damaged file raises before the model is touched.
    ``best`` (``keep_best``) gets the best weights so far that the checkpoint holds, if any."""
    from safetensors.torch import load_file

    state = json.loads((path / "state.json").read_text())
    if not isinstance(state, dict) or not all(
        isinstance(state.get(k), (int, float)) for k in ("step", "tokens_seen", "train_seconds")
    ):
        raise ValueError("state.json lacks step, tokens_seen or train_seconds")
    trainable = load_file(str(path / "trainable.safetensors"))
    opt_state = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    sched_state = torch.load(path / "scheduler.pt", weights_only=True, map_location="cpu")
    kept = best is not None and state.get("best_step") is not None
    best_weights = load_file(str(path / BEST_FILE)) if kept else None
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(trainable) != set(params) or (best_weights is not None and set(best_weights) != set(params)):
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
    if best is not None and best_weights is not None:
        best.step, best.weights = int(state["best_step"]), best_weights
        best.scores = {k[5:]: float(v) for k, v in state.items() if k.startswith("best_valid_") and v is not None}
    return state


BEST_FILE = "best.safetensors"


@dataclass
class Best:
    """``TrainConfig.keep_best``: the best validation so far by ``metric`` (``valid_ce``: the lowest; ``valid_chrf``:
    the highest), its step, what was measured there (``scores``), and the trainable weights (or LoRA adapter) it was
    measured on, by name on the CPU. Every checkpoint carries them, so a resumed run remembers them; at the end they
    go back into the model, which is then what the stage saves."""

    metric: str = "valid_ce"
    step: int | None = None
    scores: dict[str, float] | None = None
    weights: dict[str, torch.Tensor] | None = None

    @property
    def valid_ce(self) -> float | None:
        return None if self.scores is None else self.scores.get("valid_ce")

    def offer(self, step: int, scores: dict[str, float | None], model: Any, optimizer: Any) -> bool:
        """Keep the model's weights if ``scores[metric]`` beats every one before (the first of equal ones wins).
        Under FSDP and DeepSpeed every process must call it (they gather the weights)."""
        value = scores.get(self.metric)
        if value is None or not math.isfinite(value):
            return False
        if self.scores is not None:
            before = self.scores[self.metric]
            if (value <= before) if self.metric == "valid_chrf" else (value >= before):
                return False
        trainable, _ = engines.trained_state(model, optimizer)
        # a copy: on the CPU the gathered tensors are the parameters themselves, which training goes on changing
        self.step, self.weights = step, {n: t.clone() for n, t in trainable.items()}
        self.scores = {k: float(v) for k, v in scores.items() if v is not None}
        return True

    def restore(self, model: Any, optimizer: Any) -> None:
        """Put the best weights back into ``model`` (the optimizer state stays as it is: training is over)."""
        if self.weights is not None:
            _, opt_state = engines.trained_state(model, optimizer)
            engines.load_trained_state(model, optimizer, self.weights, opt_state)

    def state(self) -> dict[str, Any]:
        """``best_step`` and ``best_<measure>`` for each measure taken at that step (None before any)."""
        scores = self.scores if self.scores is not None else {self.metric: None}
        return {"best_step": self.step, **{f"best_{k}": v for k, v in scores.items()}}

    def summary(self, final_ce: float | None) -> dict[str, Any]:
        """What a stage result records: the saved model's validation CE (the best's; the final one when none was
        measured), the best step and its measures, and the final CE."""
        valid_ce = self.valid_ce if self.step is not None else final_ce
        return {"valid_ce": valid_ce, **self.state(), "final_valid_ce": final_ce}


@dataclass
class Progress:
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
            "seconds_per_step": self.train_seconds / max(self.step, 1),
            "valid_ce": valid_ce,
            "resumed_from": resumed_from.name if resumed_from is not None else None,
        }


def resume(
    ckpt_dir: Path, model: Any, optimizer: Any, scheduler: Any, total_steps: int, best: Best | None = None
) -> tuple[Progress, Path | None]:
    """Load the newest usable checkpoint; a damaged one falls back to the one before, none usable restarts at 0.
    ``best`` (``keep_best``) gets the best weights so far that it holds."""
    for path in reversed(list_checkpoints(ckpt_dir)):
        try:
            state = load_checkpoint(path, model, optimizer, scheduler, best)
        except DistillmtError:
            raise
        except Exception as e:  # truncated or unreadable file: any of safetensors', torch's or json's errors
            log.warning("checkpoint %s is damaged (%s: %s): trying the one before", path, type(e).__name__, e)
            continue
        if state.get("total_steps") != total_steps:
            raise DistillmtError(f"checkpoint {path} was made for {state.get('total_steps')} steps, not {total_steps}")
        log.info("resuming %s from %s", ckpt_dir.parent.name, path.name)
        return Progress(state["step"], total_steps, state["tokens_seen"], state["train_seconds"]), path
    if list_checkpoints(ckpt_dir):
        log.warning("no usable checkpoint in %s: this training stage starts again from step 0", ckpt_dir)
    return Progress(0, total_steps, 0, 0.0), None
