"""The run folder as a store with integrity: a stage is skipped only when its key, its outputs and its inputs still
match; a damaged output reruns it; a changed stage is rebuilt beside the old one and swapped in only on success."""

from __future__ import annotations

import json
import logging

import pytest

from distillmt.stages import RunFolder, file_checksum, list_outputs

pytestmark = pytest.mark.unit


class Counting:
    """A stage function that writes one output file and counts its calls; `fail` makes it raise after writing."""

    def __init__(self, text: str = "out", fail: bool = False):
        self.text, self.fail, self.calls = text, fail, 0

    def __call__(self, folder):
        self.calls += 1
        (folder / "out.txt").write_text(self.text)
        (folder / "metrics.jsonl").write_text("{}\n")  # a log: not an output
        if self.fail:
            raise RuntimeError("stage failed")
        return {"text": self.text}


def test_complete_stage_is_skipped_and_records_its_outputs(tmp_path):
    run, fn = RunFolder(tmp_path), Counting()
    assert run.stage("s", {"a": 1}, fn) == {"text": "out"}
    assert run.stage("s", {"a": 1}, fn) == {"text": "out"} and fn.calls == 1
    info = json.loads((tmp_path / "s" / "stage.json").read_text())
    assert set(info["outputs"]) == {"out.txt"}
    assert info["outputs"]["out.txt"] == {"size": 3, "checksum": file_checksum(tmp_path / "s" / "out.txt")}
    assert not (tmp_path / "s" / "pending.json").exists()


@pytest.mark.parametrize("damage", ["truncate", "edit", "delete"])
def test_damaged_output_reruns_the_stage(tmp_path, caplog, damage):
    run, fn = RunFolder(tmp_path), Counting("complete output")
    run.stage("s", {"a": 1}, fn)
    out = tmp_path / "s" / "out.txt"
    if damage == "truncate":
        out.write_text("compl")
    elif damage == "edit":
        out.write_text("COMPLETE OUTPUT")  # same size, other content
    else:
        out.unlink()
    with caplog.at_level(logging.WARNING):
        run.stage("s", {"a": 1}, fn)
    assert fn.calls == 2 and out.read_text() == "complete output"
    assert str(out) in caplog.text
    (tmp_path / "s" / "metrics.jsonl").unlink()  # losing a log does not rerun anything
    run.stage("s", {"a": 1}, fn)
    assert fn.calls == 2


def test_failing_rerun_with_changed_settings_keeps_the_finished_result(tmp_path):
    run = RunFolder(tmp_path)
    run.stage("s", {"a": 1}, Counting("old"))
    before = (tmp_path / "s" / "stage.json").read_text()
    with pytest.raises(RuntimeError):
        run.stage("s", {"a": 2}, Counting("new", fail=True))
    assert (tmp_path / "s" / "out.txt").read_text() == "old"
    assert (tmp_path / "s" / "stage.json").read_text() == before
    assert (tmp_path / ".s.next" / "pending.json").exists()  # the partial rebuild waits beside it
    again = Counting("new")
    assert run.stage("s", {"a": 2}, again) == {"text": "new"} and again.calls == 1
    assert (tmp_path / "s" / "out.txt").read_text() == "new"
    assert not (tmp_path / ".s.next").exists() and not (tmp_path / ".s.old").exists()


def test_kill_between_the_two_renames_of_a_swap_is_finished_next_time(tmp_path):
    run = RunFolder(tmp_path)
    run.stage("s", {"a": 1}, Counting("old"))
    run.stage("s", {"a": 2}, Counting("new"))
    # replay a kill right after the first rename: the new folder complete beside, the old one moved aside
    (tmp_path / "s").rename(tmp_path / ".s.next")
    (tmp_path / ".s.old").mkdir()
    fn = Counting("never")
    assert RunFolder(tmp_path).stage("s", {"a": 2}, fn) == {"text": "new"} and fn.calls == 0
    assert not (tmp_path / ".s.old").exists()


def test_damaged_bookkeeping_files_never_stop_a_run(tmp_path, caplog):
    run, fn = RunFolder(tmp_path), Counting()
    run.stage("s", {"a": 1}, fn)
    (tmp_path / "s" / "stage.json").write_text('{"stage": "s", "key": ')  # cut short
    with caplog.at_level(logging.WARNING):
        assert run.stage("s", {"a": 1}, fn) == {"text": "out"}
    assert fn.calls == 2 and "stage.json is damaged" in caplog.text
    # an interrupted stage whose pending.json is damaged starts afresh
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "leftover.bin").write_text("partial")
    (tmp_path / "p" / "pending.json").write_bytes(b"\x00\xff")
    run.stage("p", {"a": 1}, Counting())
    assert not (tmp_path / "p" / "leftover.bin").exists()


def test_a_stage_reruns_when_a_stage_it_reads_was_rebuilt_with_other_output(tmp_path):
    run = RunFolder(tmp_path)
    run.stage("up", {"a": 1}, Counting("v1"))
    down = Counting()
    run.stage("down", {"b": 1}, down, inputs=("up",))
    (tmp_path / "up" / "out.txt").write_text("v1")  # rewritten with the same bytes: still complete, nothing to redo
    run2 = RunFolder(tmp_path)
    run2.stage("up", {"a": 1}, Counting("v1"))
    run2.stage("down", {"b": 1}, down, inputs=("up",))
    assert down.calls == 1
    (tmp_path / "up" / "out.txt").write_text("xx")  # damaged: rebuilt, this time with other bytes
    run3 = RunFolder(tmp_path)
    run3.stage("up", {"a": 1}, Counting("v2"))
    run3.stage("down", {"b": 1}, down, inputs=("up",))
    assert down.calls == 2


def test_stage_json_of_an_older_distillmt_without_outputs_is_still_complete(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "out.txt").write_text("old")
    run, fn = RunFolder(tmp_path), Counting()
    from distillmt.stages import stage_key

    legacy = {"stage": "s", "key": stage_key({"a": 1}), "settings": {"a": 1}, "result": {"text": "old"}}
    (tmp_path / "s" / "stage.json").write_text(json.dumps(legacy))
    assert run.stage("s", {"a": 1}, fn) == {"text": "old"} and fn.calls == 0


def test_outputs_leave_out_logs_and_checkpoints(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "w.safetensors").write_bytes(b"x" * 10)
    (tmp_path / "checkpoints" / "step-1").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-1" / "state.json").write_text("{}")
    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "tensorboard" / "events").write_text("e")
    (tmp_path / "metrics.jsonl").write_text("{}")
    assert list(list_outputs(tmp_path)) == ["model/w.safetensors"]


def test_big_files_get_a_sampled_checksum_that_still_sees_truncation(tmp_path, monkeypatch):
    import distillmt.stages as stages

    monkeypatch.setattr(stages, "_FULL_HASH_LIMIT", 100)
    monkeypatch.setattr(stages, "_SAMPLE", 10)
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(range(200)))
    full = stages.file_checksum(big)
    assert full.startswith("sha256-ends:")
    big.write_bytes(bytes(range(199)))
    assert stages.file_checksum(big) != full


def test_a_second_process_waits_for_a_stage_in_progress_and_then_skips_it(tmp_path):
    """Two sweeps on one stage store: the one that finds a stage being run waits for it instead of racing it."""
    import subprocess
    import sys
    import textwrap
    import time

    script = textwrap.dedent(
        f"""
        import logging, sys, time
        from pathlib import Path
        from distillmt.stages import RunFolder

        logging.basicConfig(level=logging.INFO)

        def slow(folder):
            (folder / "out.txt").write_text(sys.argv[1])
            Path({str(tmp_path)!r}, "started").touch()
            time.sleep(1.5)
            return {{"by": sys.argv[1]}}

        store = Path({str(tmp_path)!r}) / "store"
        print(RunFolder(store.parent / sys.argv[1], store=store).stage("s", {{"a": 1}}, slow)["by"])
        """
    )
    first = subprocess.Popen([sys.executable, "-c", script, "one"], stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / "started").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    second = subprocess.run([sys.executable, "-c", script, "two"], capture_output=True, text=True, timeout=60)
    assert first.communicate(timeout=60)[0].strip() == "one"
    assert second.stdout.strip() == "one"  # it waited and found the stage finished by the first
    assert "being run by another process" in second.stderr
    assert [p.name.split("-")[0] for p in (tmp_path / "store").iterdir() if not p.name.startswith(".")] == ["s"]
