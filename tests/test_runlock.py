"""One run at a time per run folder: a second `distillmt run` (or `train`) on a folder in use is refused at once,
naming the process that holds it; the lock dies with its holder; sweeps, which share run folders by design, wait."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from conftest import MICRO

from distillmt.cli import main
from distillmt.errors import DistillmtError
from distillmt.stages import run_folder_lock

# Takes the lock on argv[1] and prints its PID once it holds it; releases when stdin closes (or dies when killed).
HOLDER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from distillmt.stages import run_folder_lock

    with run_folder_lock(Path(sys.argv[1])):
        print("held", flush=True)
        sys.stdin.read()
    """
)
# Tries the lock on argv[1] the way a run does and exits as the CLI would: 2 with the message, or 0.
TRY = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from distillmt.errors import DistillmtError
    from distillmt.stages import run_folder_lock

    try:
        with run_folder_lock(Path(sys.argv[1])):
            pass
    except DistillmtError as e:
        print(e, file=sys.stderr)
        sys.exit(2)
    """
)


def start_holder(folder) -> subprocess.Popen:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def try_lock(folder) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", TRY, str(folder)], capture_output=True, text=True, timeout=120)


def test_a_second_process_is_refused_naming_the_holder_and_proceeds_once_it_is_gone(tmp_path):
    folder = tmp_path / "runs" / "micro"
    holder = start_holder(folder)
    try:
        second = try_lock(folder)
        assert second.returncode == 2
        message = second.stderr.strip()
        assert f"run folder {folder} is in use" in message and f"PID {holder.pid}" in message
        assert "name=" in message and "-c" in message  # how to proceed, and the holder's command line
        assert len(message.splitlines()) == 1
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert try_lock(folder).returncode == 0  # released: the next run proceeds

    killed = start_holder(folder)
    os.kill(killed.pid, signal.SIGKILL)  # a kill -9 leaves the lock file, not the lock
    killed.wait(timeout=60)
    assert (folder / ".run.lock").exists()
    with run_folder_lock(folder):
        pass


@pytest.mark.unit
def test_distillmt_run_and_train_refuse_a_folder_in_use_before_any_stage(tmp_path, capsys):
    folder = tmp_path / "micro"
    args = ["--no-progress", *MICRO, f"output_dir={tmp_path}", "name=micro"]
    with run_folder_lock(folder):
        assert main(["run", *args]) == 2
        err = capsys.readouterr().err
        assert f"PID {os.getpid()}" in err and "in use by another distillmt process" in err
        assert main(["train", "--role", "student", *args]) == 2
        assert "in use by another distillmt process" in capsys.readouterr().err
    assert not (folder / "data").exists() and not (folder / "config.attempt.json").exists()


@pytest.mark.unit
def test_a_sweep_waits_for_the_folder_instead_of_refusing(tmp_path, caplog):
    """Two sweeps on one output folder run the same points' run folders: the second takes its turn."""
    folder, order = tmp_path / "point-seed0", []

    def second():
        with run_folder_lock(folder, wait=True):
            order.append("second")

    with caplog.at_level(logging.INFO, logger="distillmt.stages"):
        with run_folder_lock(folder):
            thread = threading.Thread(target=second)
            thread.start()
            deadline = time.monotonic() + 30
            while "waiting for it" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.02)
            order.append("first")
        thread.join(timeout=30)
    assert order == ["first", "second"]
    assert f"PID {os.getpid()}" in caplog.text
    with pytest.raises(DistillmtError, match="in use"), run_folder_lock(folder):
        with run_folder_lock(folder):  # a plain run is refused, even by its own process
            pass
