"""Teacher labels written by several worker processes (``hard_kd.workers``): the same shards as one process writes,
and a worker's error reaches the caller."""

from pathlib import Path

import pytest
from conftest import micro_cfg

from distillmt.errors import DistillmtError
from distillmt.pipeline import run_experiment
from distillmt.teacher_labels import label_workers


def _shards(root):
    return {p.name: p.read_bytes() for p in sorted((root / "teacher_labels").glob("shard-*.jsonl"))}


def test_two_workers_write_the_labels_one_process_writes(tmp_path):
    one = run_experiment(micro_cfg(tmp_path, "systems=[TEACHER,HLKD]", "name=one"), progress=False)
    two = run_experiment(micro_cfg(tmp_path, "systems=[TEACHER,HLKD]", "name=two", "hard_kd.workers=2"), progress=False)
    labels = _shards(tmp_path / "one")
    assert len(labels) >= 2 and _shards(tmp_path / "two") == labels  # byte for byte, shard names (keys) included
    assert two["stages"]["teacher_labels"]["key"] == one["stages"]["teacher_labels"]["key"]  # workers key nothing
    assert two["systems"]["HLKD"]["scores"] == one["systems"]["HLKD"]["scores"]
    meta = list((tmp_path / "two" / "teacher_labels").glob("*.meta.json"))
    assert len(meta) == len(labels)  # every worker's shard has its figures


def test_a_workers_error_reaches_the_caller(tmp_path):
    from functools import partial

    import torch

    from distillmt.data import Pair
    from distillmt.models import load_model
    from distillmt.sections import HardKDConfig
    from distillmt.teacher_labels import build_teacher_labels

    missing = tmp_path / "no-such-model"
    load = partial(load_model, str(missing), dtype=torch.float32, device=torch.device("cpu"))  # picklable, fails
    pairs = [Pair("a b", ""), Pair("c d", ""), Pair("e f", "")]
    with pytest.raises(DistillmtError, match="no-such-model"):
        build_teacher_labels(load, pairs, tmp_path / "labels", HardKDConfig(shard_size=1), identity={}, workers=2)
    assert not list((tmp_path / "labels").glob("shard-*"))


def test_auto_uses_one_worker_per_core_only_for_a_scratch_teacher_on_a_cpu(monkeypatch):
    monkeypatch.setattr("distillmt.engines.available_cores", lambda: 4)
    assert label_workers(0, cpu=True, scratch=True, engine="hf") == 4
    assert label_workers(0, cpu=True, scratch=False, engine="hf") == 1
    assert label_workers(0, cpu=False, scratch=True, engine="hf") == 1
    assert label_workers(3, cpu=False, scratch=False, engine="hf") == 3
    assert label_workers(3, cpu=True, scratch=True, engine="vllm") == 1
    monkeypatch.setattr("distillmt.engines.available_cores", lambda: 96)
    assert label_workers(0, cpu=True, scratch=True, engine="hf") == 8  # not 96 copies of torch


def test_a_script_without_a_main_guard_gets_a_clear_error(tmp_path):
    """Workers start by importing the caller's script: one whose code runs at import (no ``__main__`` guard) would
    start the experiment again in each worker. The user is told what to change."""
    import subprocess
    import sys

    script = tmp_path / "unguarded.py"
    overrides = ", ".join(repr(o) for o in ["systems=[TEACHER,HLKD]", "hard_kd.workers=2"])
    here = str(Path(__file__).parent)
    script.write_text(
        f"import sys\nsys.path.insert(0, {here!r})\nfrom conftest import micro_cfg\nimport distillmt\n"
        f"distillmt.run(micro_cfg({str(tmp_path)!r}, {overrides}), progress=False)\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert 'if __name__ == "__main__":' in done.stderr and "hard_kd.workers=1" in done.stderr


def test_a_resumed_stage_splits_the_missing_shards_evenly(tmp_path, monkeypatch):
    """An interrupted label stage whose missing shards are every other one: each of two workers gets half of them
    (not all of them to one worker, as a split by shard index would), and the labels are still byte-identical. The
    workers run in this process here (the split is what is tested; the spawned processes are tested above)."""
    from distillmt import teacher_labels

    run_experiment(micro_cfg(tmp_path, "systems=[TEACHER,HLKD]", "name=r"), progress=False)
    folder = tmp_path / "r" / "teacher_labels"
    labels = _shards(tmp_path / "r")
    names = sorted(labels)
    assert len(names) >= 3  # missing: 0 and 2, which a split by index would both give to worker 0
    (folder / "stage.json").unlink()  # interrupted: no record of a finished stage
    for name in names[::2]:
        (folder / name).unlink()
    shares = []

    def in_process(job, workers, paths, indices, progress):
        for w in range(workers):
            shares.append(indices[w::workers])
            teacher_labels.build_teacher_labels(**job, only=indices[w::workers], progress=False)

    monkeypatch.setattr(teacher_labels, "_write_in_workers", in_process)
    run_experiment(micro_cfg(tmp_path, "systems=[TEACHER,HLKD]", "name=r", "hard_kd.workers=2"), progress=False)
    missing = list(range(0, len(names), 2))
    assert shares == [missing[0::2], missing[1::2]]
    assert _shards(tmp_path / "r") == labels
