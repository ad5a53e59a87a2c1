"""Experiment tracking (``report_to``): the training losses and the final scores reach TensorBoard through accelerate's
tracker, at the steps of metrics.jsonl; nothing is written for a tracker not asked for; a tracker that is not
installed stops the run before any work; and no tracker changes a stage key."""

import importlib.util
import json

import pytest
import torch
from conftest import build_tiny_qwen, micro_cfg, planned_keys

from distillmt import tracking
from distillmt.config import load_config
from distillmt.errors import DistillmtError
from distillmt.io import read_jsonl
from distillmt.pipeline import run_experiment
from distillmt.sections import TrainConfig
from distillmt.train import train

needs_tensorboard = pytest.mark.skipif(
    importlib.util.find_spec("tensorboard") is None, reason="pip install 'distillmt[tensorboard]' (in the dev extra)"
)


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of a TensorBoard run folder, read back by TensorBoard itself: ``tag -> [(step, value), ...]``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def from_metrics(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as the same ``tag -> [(step, value), ...]`` (booleans as 0/1)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        for k, v in r.items():
            if k != "step" and isinstance(v, (int, float)):
                out.setdefault(k, []).append((r["step"], float(v)))
    return out


def assert_same(logged: dict, expected: dict) -> None:
    assert set(logged) == set(expected)
    for tag, points in expected.items():
        assert [s for s, _ in logged[tag]] == [s for s, _ in points], tag
        assert [v for _, v in logged[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag


@pytest.fixture
def missing(monkeypatch):
    """Make the named modules look uninstalled (as importlib.util.find_spec sees them)."""
    real = importlib.util.find_spec

    def hide(*names: str) -> None:
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in names else real(name, *a))

    return hide


@pytest.mark.unit
@pytest.mark.parametrize("name", ["wandb", "mlflow", "tensorboard"])
def test_a_tracker_that_is_not_installed_is_refused_naming_its_extra(missing, name):
    missing("wandb", "mlflow", "tensorboard", "tensorboardX")
    with pytest.raises(DistillmtError, match=rf"'report_to' names {name}.*pip install 'distillmt\[{name}\]'"):
        tracking.check_trackers([name])


@pytest.mark.unit
def test_report_to_is_checked_when_the_config_is_read():
    assert load_config(None, ["report_to=[tensorboard]"]).report_to == ["tensorboard"]
    assert load_config(None, ["report_to=tensorboard,wandb"]).report_to == ["tensorboard", "wandb"]
    assert load_config(None).report_to == []
    with pytest.raises(DistillmtError, match="'report_to' has unknown tracker 'neptune'; choose from: tensorboard"):
        load_config(None, ["report_to=[neptune]"])


@pytest.mark.unit
def test_report_to_enters_no_stage_key(tmp_path):
    # (against the default config's keys as computed now; tests/test_stage_keys.py pins those)
    cfg = load_config(None, [f"output_dir={tmp_path}", "report_to=[tensorboard,wandb,mlflow]"])
    assert planned_keys(cfg) == planned_keys(load_config(None, [f"output_dir={tmp_path}"]))


@pytest.mark.unit
def test_a_missing_tracker_stops_the_run_before_any_stage(tmp_path, missing):
    missing("wandb")
    with pytest.raises(DistillmtError, match=r"pip install 'distillmt\[wandb\]'"):
        run_experiment(micro_cfg(tmp_path, "report_to=[wandb]"), progress=False)
    assert not (tmp_path / "micro" / "data").exists()


@pytest.mark.unit
def test_score_values_name_metric_and_row():
    scores = {
        "n": 3,
        "bleu": {"name": "BLEU", "score": 6.5},
        "bertscore": {"name": "BERTScore", "score": None, "unavailable": "no encoder"},
    }
    assert tracking.score_values({"SLKD": {"scores": scores}}) == {"BLEU/SLKD": 6.5}


def examples(n: int = 8) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        p, t = (
            torch.randint(3, 40, (3 + i % 3,), generator=g).tolist(),
            torch.randint(3, 40, (3,), generator=g).tolist(),
        )
        out.append({"input_ids": p + t + [1], "labels": [-100] * len(p) + t + [1]})
    return out


@needs_tensorboard
@pytest.mark.unit
def test_train_logs_every_record_of_metrics_jsonl_to_the_trackers_and_nothing_unasked(tmp_path):
    cfg = TrainConfig(max_steps=4, batch_size=4, log_every=2, eval_every=2, save_every=0, lr=1e-2)
    run = {"pad_token_id": 0, "progress": False, "device": "cpu"}
    with tracking.tracker_run(["tensorboard"], "exp", "train_student", tmp_path / "tb") as trackers:
        train(
            build_tiny_qwen(40, pad_token_id=0), examples(), examples(4), tmp_path / "a", cfg, trackers=trackers, **run
        )
    logged = scalars(tmp_path / "tb" / "train_student")
    records = read_jsonl(tmp_path / "a" / "metrics.jsonl")
    assert {"loss", "ce", "lr", "valid_ce", "tokens_per_s"} <= set(logged)
    assert_same(logged, from_metrics(records))
    assert [s for s, _ in logged["loss"]] == [2, 4]
    assert [s for s, _ in logged["valid_ce"]] == [2, 4, 4]  # every eval_every steps, and the final one

    train(build_tiny_qwen(40, pad_token_id=0), examples(), examples(4), tmp_path / "b", cfg, **run)
    assert (tmp_path / "b" / "metrics.jsonl").is_file()
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["checkpoints", "metrics.jsonl"]  # no TensorBoard


@needs_tensorboard
def test_a_run_reports_each_training_stage_and_the_scores_to_tensorboard(tmp_path):
    cfg = micro_cfg(tmp_path, "systems=[STUDENT,SLKD]", "report_to=[tensorboard]")
    report = run_experiment(cfg, progress=False)
    root = tmp_path / "micro"
    runs = root / "tensorboard"
    assert sorted(p.name for p in runs.iterdir()) == ["results", "train_slkd", "train_student", "train_teacher"]
    for stage in ("train_teacher", "train_student", "train_slkd"):
        logged = scalars(runs / stage)
        assert_same(logged, from_metrics(read_jsonl(root / stage / "metrics.jsonl")))
    assert {"kd", "forward_kl"} <= set(scalars(runs / "train_slkd"))  # the KD parts of the loss
    assert not list(root.glob("*/tensorboard"))  # all of it under the run's tensorboard/, none in stage folders

    results = json.loads((root / "results.json").read_text())
    expected = {
        f"{m['name']}/{row}": [(0, m["score"])]
        for row, entry in results["systems"].items()
        for m in entry["scores"].values()
        if isinstance(m, dict) and m.get("score") is not None
    }
    assert {"BLEU/STUDENT", "chrF/STUDENT", "BLEU/SLKD", "chrF/SLKD"} <= set(expected)
    assert_same(scalars(runs / "results"), expected)
    assert report["config"]["report_to"] == ["tensorboard"]
