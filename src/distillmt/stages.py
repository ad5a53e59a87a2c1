"""The run folder as a store of keyed stages: ``<output_dir>/<name>/<stage>/``.

A stage is identified by a key: the hash of the settings that determine its output, upstream stage keys included.
``stage.json`` is written last and records the key and what the stage produced (every output file with its size
and a checksum). A stage is complete, and skipped on rerun, only when its key is the current one, its outputs
still match, and the outputs of the stages it read (``inputs``) are still the ones it read. Otherwise:

* an interrupted stage (no ``stage.json``) resumes in place from what it left (training checkpoints, label and
  cache shards) as long as ``pending.json`` carries the same key, and starts afresh when it does not;
* a finished stage whose settings changed, or whose outputs were damaged, is rebuilt beside the old one in
  ``.<stage>.next/`` and swapped in only when the rebuild succeeded: a failing or interrupted rerun leaves the
  previous complete result (and the report that shows it) intact. A rerun with the same settings resumes the
  rebuild; one that finds the finished stage current again (settings changed back) removes it.

Checksums: sha256 of the whole file up to 64 MiB; above that, sha256 of the size, the first and the last 4 MiB (a
truncated or partly written file changes the size or its tail, and a multi-GB checkpoint is not read whole on every
rerun). Logs (``metrics.jsonl``, ``tensorboard/``) are not outputs: losing them does not rerun a stage.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path
from typing import Any

from distillmt.errors import DistillmtError
from distillmt.io import LockHeld, file_lock, owned_lock, read_json, write_json

log = logging.getLogger("distillmt.stages")

# What a stage's key hashes: the settings the stage declares it reads. Version 2 (distillmt 0.2) replaced whole config
# sections by the keys each stage reads; a stage made under another version is recomputed once.
KEY_FORMAT = 2
STAGE_FILE = "stage.json"
PENDING_FILE = "pending.json"
# The run folder's own files. config.json is the config of the last run that finished (written with its report), so
# it never names settings no finished stage used; the config of a run under way, or of one that failed, is beside it.
RUN_CONFIG = "config.json"
ATTEMPT_CONFIG = "config.attempt.json"
RUN_LOCK = ".run.lock"  # held by the one process running in the folder (see run_folder_lock)
NOT_OUTPUTS = {STAGE_FILE, PENDING_FILE, "metrics.jsonl", "tensorboard", "checkpoints"}
_FULL_HASH_LIMIT = 64 << 20
_SAMPLE = 4 << 20


def stage_key(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_checksum(path: Path) -> str:
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= _FULL_HASH_LIMIT:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
            return "sha256:" + h.hexdigest()
        h.update(str(size).encode())
        h.update(f.read(_SAMPLE))
        f.seek(size - _SAMPLE)
        h.update(f.read(_SAMPLE))
    return "sha256-ends:" + h.hexdigest()


def list_outputs(folder: Path) -> dict[str, dict[str, Any]]:
    """Every output file of a stage folder (relative path → size and checksum), logs and bookkeeping excluded."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if rel.parts[0] in NOT_OUTPUTS or not path.is_file():
            continue
        out[rel.as_posix()] = {"size": path.stat().st_size, "checksum": file_checksum(path)}
    return out


def damaged_output(folder: Path, outputs: dict[str, dict[str, Any]]) -> str | None:
    """A description of the first output that is missing or differs from what ``stage.json`` recorded, or None."""
    for rel, want in outputs.items():
        path = folder / rel
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != want["size"]:
            return f"{path} has {size} bytes, {want['size']} were written"
        if file_checksum(path) != want["checksum"]:
            return f"{path} has changed since it was written (checksum differs)"
    return None


def _digest(outputs: dict[str, Any]) -> str:
    return stage_key(outputs)


def _read_json_or_none(path: Path) -> Any:
    """A bookkeeping file's content, or None when it is missing or damaged (a damaged one is reported)."""
    if not path.exists():
        return None
    try:
        data = read_json(path)
    except (OSError, ValueError) as e:
        log.warning("%s is damaged (%s): treating the stage as not finished", path, e)
        return None
    return data if isinstance(data, dict) else None


class RunFolder:
    """Bookkeeping for one run folder: which stages are done, with which keys and outputs, and how long each took.

    With a ``store`` (sweeps), stage folders live in the store as ``<stage>-<key>/`` and the run folder links to
    them (``<root>/<stage>`` → ``<store>/<stage>-<key>``): two runs whose stage has the same key share one folder,
    computed once.
    """

    def __init__(self, root: Path, store: Path | None = None, processes: Any = None):
        """``processes``: accelerate's ``PartialState`` when several processes run the experiment together (torchrun,
        accelerate launch): the main process keeps the books and runs the stages, the others wait for it, and a
        stage marked ``collective`` (training) runs on all of them."""
        self.root = root
        self.store = store
        self.processes = processes if processes is not None and processes.num_processes > 1 else None
        self.root.mkdir(parents=True, exist_ok=True)
        if store is not None:
            store.mkdir(parents=True, exist_ok=True)
        self.timings: dict[str, dict[str, Any]] = {}
        self.digests: dict[str, str] = {}  # stage name → digest of its outputs, for the stages that read it

    def stage(
        self,
        name: str,
        settings: dict[str, Any],
        fn: Callable[[Path], dict[str, Any] | None],
        inputs: tuple[str, ...] = (),
        collective: bool = False,
    ) -> dict[str, Any]:
        """Run ``fn(folder)`` as stage ``name`` unless it is complete; return its result (from ``stage.json`` when
        skipped). ``inputs``: the stages (already run in this invocation) whose outputs ``fn`` reads. Another process
        working on the same stage folder (a second sweep on the same store) is waited for, not raced. ``collective``:
        with several processes, every one of them runs ``fn`` (training); otherwise only the main process does."""
        key = stage_key(settings)
        folder = self.root / name if self.store is None else self.store / f"{name}-{key}"
        if self.processes is None:
            with _exclusive(folder, name):
                plan = self._prepare(name, key, folder, settings, inputs)
                done = plan["skip"] or self._finish(name, key, folder, settings, fn(Path(plan["work"])) or {}, plan)
        else:
            done = self._stage_with_processes(name, key, folder, settings, fn, inputs, collective)
        result, self.timings[name], self.digests[name] = done
        return result

    def _stage_with_processes(
        self,
        name: str,
        key: str,
        folder: Path,
        settings: dict[str, Any],
        fn: Callable[[Path], dict[str, Any] | None],
        inputs: tuple[str, ...],
        collective: bool,
    ) -> tuple:
        """The main process keeps the books (and holds the stage lock); the others wait for its plan and, for a
        collective stage, run ``fn`` in the folder it prepared; everyone ends with its result, timing and digest."""
        from accelerate.utils import broadcast_object_list

        main = self.processes.is_main_process
        plan: list[Any] = [None]
        with _exclusive(folder, name) if main else contextlib.nullcontext():
            if main:
                plan = [self._prepare(name, key, folder, settings, inputs)]
            broadcast_object_list(plan)
            done = [plan[0]["skip"]]
            if done[0] is None:
                result = (fn(Path(plan[0]["work"])) or {}) if (main or collective) else None
                done = [self._finish(name, key, folder, settings, result, plan[0]) if main else None]
                broadcast_object_list(done)
        return done[0]

    def _prepare(
        self, name: str, key: str, folder: Path, settings: dict[str, Any], inputs: tuple[str, ...]
    ) -> dict[str, Any]:
        """Skip (``{"skip": (result, timing, digest)}``) a complete stage, or prepare the folder to run it in."""
        _finish_interrupted_swap(folder)
        upstream = {n: self.digests[n] for n in inputs}
        info = _read_json_or_none(folder / STAGE_FILE)
        if info is not None and info.get("key") == key:
            problem = damaged_output(folder, info.get("outputs", {}))
            if problem is None and info.get("inputs", upstream) == upstream:
                log.info("stage %-22s skipped: complete (key %s)", name, key)
                _drop_unused_rebuild(folder, name)
                self._link(name, folder)
                timing = {"seconds": info.get("seconds"), "skipped": True, "key": key}
                return {"skip": (info["result"], timing, _digest(info.get("outputs", {})))}
            reason = problem or "a stage it reads from was rebuilt with other output"
            log.warning("stage %-22s %s: running it again (the old output stays until then)", name, reason)
        elif info is not None and info.get("key_format") != KEY_FORMAT:
            log.warning(
                "stage %-22s was made by an older distillmt, whose stage keys differ: it is recomputed once (its old "
                "output stays until the new one is complete; nothing to do)",
                name,
            )
        elif info is not None:
            log.info("stage %-22s settings changed (key %s -> %s): running it again", name, info.get("key"), key)
        finished = (folder / STAGE_FILE).exists()  # complete but stale, damaged, or unreadable: replace, not delete
        work = _twin(folder, "next") if finished else folder
        if work == folder:
            _drop_unused_rebuild(folder, name)
        pending = _read_json_or_none(work / PENDING_FILE)
        if (work / PENDING_FILE).exists() and (pending is None or pending.get("key") != key):
            log.info("stage %-22s partial output from other settings: starting afresh", name)
            shutil.rmtree(work)
        resumed = work.exists()
        work.mkdir(parents=True, exist_ok=True)
        write_json(work / PENDING_FILE, {"key": key, "settings": settings})
        log.info("stage %-22s %s (key %s)", name, "resuming" if resumed else "running", key)
        return {"skip": None, "work": str(work), "resumed": resumed, "upstream": upstream, "start": time.time()}

    def _finish(
        self, name: str, key: str, folder: Path, settings: dict[str, Any], result: dict, plan: dict[str, Any]
    ) -> tuple:
        """Record a stage that ran: its outputs in ``stage.json`` (written last), then swap it in and link it."""
        work, seconds = Path(plan["work"]), time.time() - plan["start"]
        outputs = list_outputs(work)
        record = {"stage": name, "key": key, "key_format": KEY_FORMAT, "settings": settings, "result": result}
        record["outputs"] = outputs
        record.update(inputs=plan["upstream"], seconds=seconds, finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        write_json(work / STAGE_FILE, record)
        (work / PENDING_FILE).unlink(missing_ok=True)
        if work != folder:
            _swap(folder)
        self._link(name, folder)
        log.info("stage %-22s done in %.1f s", name, seconds)
        return result, {"seconds": seconds, "skipped": False, "resumed": plan["resumed"], "key": key}, _digest(outputs)

    def result(self, name: str) -> dict[str, Any]:
        """The result a finished stage recorded in its ``stage.json``."""
        return read_json(self.root / name / STAGE_FILE)["result"]

    def _link(self, name: str, folder: Path) -> None:
        """In store mode, point ``<root>/<name>`` at the stage's folder in the store (relative, replaced atomically)."""
        if self.store is None:
            return
        link = self.root / name
        target = os.path.relpath(folder, self.root)
        if link.is_symlink() and os.readlink(link) == target:
            return
        if link.exists() and not link.is_symlink():
            raise DistillmtError(f"{link} is a folder, not a link into the stage store {self.store}: move it away")
        tmp = self.root / f".{name}.link"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target, target_is_directory=True)
        os.replace(tmp, link)


def _exclusive(folder: Path, name: str) -> contextlib.AbstractContextManager:
    """Hold an exclusive lock on a stage folder (``.<folder>.lock`` beside it) while the stage is checked and run;
    a process that finds it held waits, then sees the finished stage."""
    on_wait = partial(log.info, "stage %-22s is being run by another process: waiting for it", name)
    return file_lock(_twin(folder, "lock"), on_wait)


def _twin(folder: Path, kind: str) -> Path:
    return folder.parent / f".{folder.name}.{kind}"


def _drop_unused_rebuild(folder: Path, name: str) -> None:
    """Remove an unfinished rebuild ``.<stage>.next/`` that this run does not resume: the finished stage is current
    (the rebuild was for other settings, which a later change back would rebuild), or there is no finished folder
    for it to replace. Left alone, it would hold a partial copy of the stage's output (checkpoints, shards) for good.
    A rebuild this run continues is the work folder, and is not touched."""
    twin = _twin(folder, "next")
    if twin.exists():
        log.info("stage %-22s removing %s: an unfinished rebuild this run does not continue", name, twin)
        shutil.rmtree(twin, ignore_errors=True)


def _swap(folder: Path) -> None:
    """Replace a finished folder by its rebuilt twin; each step is a rename, and a kill between the two renames is
    finished by :func:`_finish_interrupted_swap` on the next run."""
    new, old = _twin(folder, "next"), _twin(folder, "old")
    shutil.rmtree(old, ignore_errors=True)
    folder.rename(old)
    new.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def _finish_interrupted_swap(folder: Path) -> None:
    """A rebuilt twin that was complete but not yet swapped in (a kill during :func:`_swap`) replaces the old folder
    now; an old folder moved aside whose twin never arrived is moved back."""
    new, old = _twin(folder, "next"), _twin(folder, "old")
    if (new / STAGE_FILE).exists():
        if folder.exists():
            _swap(folder)
        else:
            new.rename(folder)
    elif not folder.exists() and old.exists():
        old.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def run_folder_lock(root: Path, *, wait: bool = False, processes: Any = None) -> Iterator[None]:
    """Hold run folder ``root`` for this run: a second process on it (another `distillmt run` or `train` with the
    same ``name``) is refused at once, naming the holder, instead of mixing its stages into this run's table; with
    ``wait`` it waits its turn. The lock is the OS's, released when its holder exits or is killed. With several
    processes of one run, the main one takes it and tells the others whether it got it."""
    main = processes is None or processes.is_main_process
    refused: list[str | None] = [None]
    with ExitStack() as held:
        if main:
            on_wait = partial(_log_wait, root)
            try:
                held.enter_context(owned_lock(root / RUN_LOCK, wait=wait, on_wait=on_wait))
            except LockHeld as e:
                refused = [_in_use(root, e.holder)]
        if processes is not None:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(refused)
        if refused[0] is not None:
            raise DistillmtError(refused[0])
        yield


def _holder_text(holder: dict[str, Any]) -> str:
    if not holder.get("pid"):
        return "another process (it has not recorded its PID)"
    command = str(holder.get("command") or "")
    command = command if len(command) <= 160 else command[:157] + "..."
    text = f"PID {holder['pid']} on {holder.get('host', '?')}, since {holder.get('since', '?')}"
    return f"{text}: {command}" if command else text


def _in_use(root: Path, holder: dict[str, Any]) -> str:
    return (
        f"run folder {root} is in use by another distillmt process ({_holder_text(holder)}); a run folder holds one "
        "run at a time: wait for that run to end, or give this one another name (name=...)"
    )


def _log_wait(root: Path, holder: dict[str, Any]) -> None:
    log.info("run folder %s is in use by %s: waiting for it", root, _holder_text(holder))
