"""Experiment tracking: a run's training losses and final scores also sent to TensorBoard, Weights & Biases or MLflow,
through accelerate's tracker classes. ``metrics.jsonl`` and ``results.json`` always hold the same numbers; a tracker
is only ever asked for by name and never changes what a run computes.

One tracker run per training stage that runs, named after the stage, its step the optimizer step of
``metrics.jsonl``, its keys those of ``metrics.jsonl`` (``loss``, ``ce``, ``kd``, ``lr``, ``valid_ce``, ...), so the
stages' curves of one key overlay; one more run, ``results``, holds every row's corpus scores as ``<metric>/<ROW>``.
Why not one run with stage-prefixed keys: every stage counts its steps from 1, and W&B drops a step lower than one it
has already seen in a run, so all but the first stage's curve would be lost there. The experiment's name is the
project of all its runs (W&B project, MLflow experiment); TensorBoard writes ``<logging_dir>/<run name>/``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from distillmt.errors import DistillmtError

# report_to name -> the modules any one of which makes it work (accelerate's TensorBoard tracker falls back to
# tensorboardX); the distillmt extra that installs it has the same name.
TRACKERS = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",)}


def check_trackers(names: Sequence[str], key: str = "report_to") -> None:
    """Refuse an unknown tracker, or one whose package is missing, before any work: found when the first training
    stage logs its first step, it would cost every stage before that one."""
    for name in names:
        if name not in TRACKERS:
            raise DistillmtError(
                f"config key '{key}' names unknown tracker {name!r}; choose from: {', '.join(TRACKERS)}"
            )
        if not any(importlib.util.find_spec(module) is not None for module in TRACKERS[name]):
            raise DistillmtError(
                f"config key '{key}' names {name}, which is not installed: pip install 'distillmt[{name}]'"
            )


def make_tracker(name: str, project: str, run_name: str, logging_dir: Path) -> Any:
    """accelerate's tracker ``name`` for the run ``run_name`` of ``project``, not yet started."""
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

    if name == "tensorboard":
        return TensorBoardTracker(run_name, logging_dir)
    if name == "wandb":
        return WandBTracker(project, name=run_name)  # WandBTracker's run_name is the W&B project
    return MLflowTracker(experiment_name=project, run_name=run_name)


@contextmanager
def tracker_run(
    names: Sequence[str],
    project: str,
    run_name: str,
    logging_dir: str | Path,
    config: dict[str, Any] | None = None,
    device: str = "auto",
) -> Iterator[list[Any]]:
    """One run of every tracker in ``names``, started for as long as the block lasts and finished after it, even on
    an error. ``config`` (a nested dict) is stored as the run's hyperparameters in W&B and MLflow (not TensorBoard:
    its hparams plugin adds a run folder of its own per call). For the main process; ``device``: the run's, see
    :func:`_process_state`."""
    check_trackers(names)
    _process_state(device)
    started: list[Any] = []
    try:
        for name in dict.fromkeys(names):
            tracker = make_tracker(name, project, run_name, Path(logging_dir))
            tracker.start()
            started.append(tracker)
            if config and name != "tensorboard":
                tracker.store_init_configuration(flatten(config))
        yield started
    finally:
        for tracker in reversed(started):
            tracker.finish()


def _process_state(device: str) -> None:
    """accelerate's trackers need its process state (they ask it whether this is the main process); where no
    Accelerator made it yet, make it as training on ``device`` would (:func:`distillmt.engines.process_group`): the
    first state of a process is the one every later Accelerator there must agree with."""
    from accelerate import PartialState

    from distillmt.engines import process_group

    if not PartialState._shared_state:
        cpu, backend = process_group(device)
        PartialState(cpu=cpu, **({"backend": backend} if backend else {}))


def log_values(trackers: Sequence[Any], values: dict[str, Any], step: int) -> None:
    """The numbers of ``values`` (booleans as 0/1; text and None left out, as is ``step``) to every tracker at ``step``."""
    numbers = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and k != "step"}
    if numbers:
        for tracker in trackers:
            tracker.log(numbers, step=step)


def score_values(systems: dict[str, Any]) -> dict[str, float]:
    """The rows of a run report (``results.json``'s ``systems``) as tracker values: ``<metric>/<ROW>`` → that metric's
    corpus score (``BLEU/SLKD``: in TensorBoard and W&B a metric's rows share one section); unmeasured ones left out."""
    out = {}
    for row, entry in systems.items():
        for metric in entry["scores"].values():
            if isinstance(metric, dict) and isinstance(metric.get("score"), (int, float)):
                out[f"{metric['name']}/{row}"] = float(metric["score"])
    return out


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested dict as one level of dotted keys (``train.lr``), the form MLflow params need."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
