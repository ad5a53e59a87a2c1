"""kill -9 in the middle of a stage: the rerun resumes from the last checkpoint or shard, finished stages do not run
again, and the results equal those of an uninterrupted run with the same seed. The killed runs are slowed at one
call per step or shard, so the kill lands part-way on a fast machine too."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import MICRO

from distillmt.io import read_json

SYSTEMS = "systems=[TEACHER,STUDENT,HLKD]"


def run(
    out: Path, *extra: str, kill_when: Path | str | None = None, python: tuple = ("-m", "distillmt.cli")
) -> subprocess.CompletedProcess | None:
    """`distillmt run` on the micro experiment in a child process; with ``kill_when`` (a path or a glob under the
    run folder), SIGKILL it as soon as that appears."""
    args = [sys.executable, *python, "run", "--no-progress", *MICRO, SYSTEMS, *extra]
    args += [f"output_dir={out}", "name=micro", "threads=1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if kill_when is None:
        return subprocess.run(args, env=env, capture_output=True, text=True, timeout=300, check=True)
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list((out / "micro").glob(str(kill_when))):
        assert proc.poll() is None, "the run ended before the point where it was to be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return None


def scores(out: Path) -> dict:
    report = read_json(out / "micro" / "results.json")
    return {name: {k: v["score"] for k, v in row["scores"].items() if isinstance(v, dict)} for name, row in
            report["systems"].items()}  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    run(out)
    return scores(out)


def slowed(module: str, name: str) -> tuple[str, str]:
    """Python arguments that run the CLI with ``module.name`` delayed 0.3 s a call, so a kill lands part-way through
    a stage whatever the machine's speed."""
    return "-c", (
        f"import sys, time, {module} as m; f = m.{name}; "
        f"m.{name} = lambda *a, **k: (time.sleep(0.3), f(*a, **k))[1]; "
        "from distillmt.cli import main; sys.exit(main(sys.argv[1:]))"
    )


@pytest.mark.parametrize(
    "stage,kill_when,extra,slow",
    [
        ("train_teacher", "train_teacher/checkpoints/step-0000002", ["train_teacher.save_every=1"],
         ("distillmt.train", "loss_step")),
        ("teacher_labels", "teacher_labels/shard-00000-*.jsonl", [], ("distillmt.teacher_labels", "translate_with_engine")),
    ],
)  # fmt: skip
def test_kill_9_mid_stage_then_rerun_equals_uninterrupted(tmp_path, uninterrupted, stage, kill_when, extra, slow):
    run(tmp_path, *extra, kill_when=kill_when, python=slowed(*slow))
    root = tmp_path / "micro"
    assert not (root / stage / "stage.json").exists()
    finished = {p.parent.name: p.stat().st_mtime_ns for p in root.glob("*/stage.json")}
    done = run(tmp_path, *extra)
    assert f"stage {stage}" in done.stderr and "resuming" in done.stderr.split(f"stage {stage}")[1].splitlines()[0]
    assert {name: (root / name / "stage.json").stat().st_mtime_ns for name in finished} == finished
    assert scores(tmp_path) == uninterrupted


def test_kill_9_in_the_teacher_cache_stage_then_rerun_equals_uninterrupted(tmp_path):
    """SIGKILL once the cache's second shard (of 5) is written: the rerun resumes the stage, keeps the finished
    shards, and the SLKD row trained on the cache scores as an uninterrupted run's. The killed run's teacher pass is
    slowed (0.3 s a shard) so the kill lands part-way whatever the machine's speed."""
    extra = ["systems=[TEACHER,SLKD]", "soft_kd.cache=true", "soft_kd.cache_shard_size=8"]
    run(tmp_path / "straight", *extra)
    slow = slowed("distillmt.logit_cache", "_teacher_topk")
    run(tmp_path / "killed", *extra, kill_when="teacher_cache/shard-00001.safetensors", python=slow)
    root = tmp_path / "killed" / "micro"
    assert not (root / "teacher_cache" / "manifest.json").exists()
    done = run(tmp_path / "killed", *extra)
    assert "resuming" in done.stderr.split("stage teacher_cache")[1].splitlines()[0]
    assert read_json(root / "teacher_cache" / "manifest.json")["reused_shards"] >= 2
    assert scores(tmp_path / "killed") == scores(tmp_path / "straight")
