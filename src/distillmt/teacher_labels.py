"""Hard-label data for sequence-level KD: the teacher's translations of the training sources, written shard by shard.

The twin of :mod:`distillmt.logit_cache` (soft-label data). Layout of a labels folder::

    shard-00000-<hash>.jsonl       one row per source: {"src", "ref", "label", "candidates"}
    shard-00000-<hash>.meta.json   what making it cost: {"generated_tokens", "seconds", "engine"}
    shard-00001-<hash>.jsonl       ...

A shard's name carries the hash of its sources and of the teacher and decoding settings, so a rerun (after a kill)
reuses exactly the shards those settings still describe and generates the rest; each shard is written atomically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distillmt.data import Pair
from distillmt.errors import DistillmtError
from distillmt.generate import SavedModel, process_shard, reference_select, release_vllm, translate_with_engine
from distillmt.io import read_json, read_jsonl, write_json, write_jsonl
from distillmt.prompts import DEFAULT_PROMPT, Prompt
from distillmt.sections import HardKDConfig

log = logging.getLogger("distillmt.teacher_labels")


def _digest(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_teacher_labels(
    load_teacher: Callable[[], tuple[Any, Any]],
    pairs: list[Pair],
    out_dir: str | Path,
    cfg: HardKDConfig,
    *,
    identity: dict[str, Any],
    seed: int = 0,
    progress: bool = True,
    processes: Any = None,
    saved: SavedModel | None = None,
    prompt: Prompt = DEFAULT_PROMPT,
    workers: int = 1,
    only: list[int] | None = None,
) -> dict[str, Any]:
    """Translate the sources of ``pairs`` with the teacher, in ``prompt``, and write them as label shards into ``out_dir``.

    ``load_teacher()`` returns ``(model, tokenizer)``; it is called only when a shard is missing, so a rerun whose
    shards all exist loads nothing. ``identity`` names the teacher (it goes into the shard hashes with the decoding
    settings). ``cfg.decoding``: how the teacher translates (engine and decoding); with ``cfg.num_candidates > 1``
    the teacher returns that many candidates per source (beams, or samples with ``do_sample``) and one is kept by
    ``cfg.selection``: ``score`` (the teacher's), ``mbr`` (chrF against the other candidates) or ``reference``
    (chrF against the source's reference; by score where it has none). ``cfg.shard_size`` sources go to each shard;
    shard ``i`` is decoded with seed ``seed + i``. Returns ``{"shards": [file names in order], "generated_tokens",
    "generation_seconds", "engine"}``, the figures over every shard, those an earlier (interrupted) call wrote
    included.

    ``saved``: where the teacher's weights lie, for vLLM to load them itself (``load_teacher`` may then return None
    for the model). ``processes`` (accelerate's state, several processes): process ``r`` of ``P`` writes shards
    ``r, r + P, ...``; every process returns once all shards are written, with the figures summed over the
    processes. A shard's content does not depend on which process wrote it (its seed is its index), so the labels
    equal one process's.

    ``workers`` > 1 (one process only): that many fresh processes write the missing shards side by side, each its
    turn of them (``only=`` their indices) with its share of the threads; the same labels.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    decoding, num_candidates, selection, shard_size = cfg.decoding, cfg.num_candidates, cfg.selection, cfg.shard_size
    settings = {
        "teacher": identity,
        "decoding": decoding.output_settings(),
        "num_candidates": num_candidates,
        "selection": selection,
        "seed": seed,
        **({"prompt": prompt.settings()} if prompt.settings() else {}),
    }
    if not decoding.do_sample:  # n-best from beam search: at least as many beams as candidates
        decoding = dataclasses.replace(decoding, num_beams=max(decoding.num_beams, num_candidates))
    model = tokenizer = None
    loaded = False
    shards = []
    n_shards = (len(pairs) + shard_size - 1) // shard_size
    rank, world = process_shard(processes)
    for i in range(n_shards):
        chunk = pairs[i * shard_size : (i + 1) * shard_size]
        shards.append(f"shard-{i:05d}-{_digest({'src': [p.src for p in chunk], **settings})}.jsonl")
    missing = [i for i, name in enumerate(shards) if not (out_dir / name).exists()]
    if workers > 1 and processes is None and only is None and len(missing) > 1:
        job = {"load_teacher": load_teacher, "pairs": pairs, "out_dir": out_dir, "cfg": cfg, "identity": identity}
        job.update(seed=seed, saved=saved, prompt=prompt)
        _write_in_workers(job, min(workers, len(missing)), [out_dir / shards[i] for i in missing], missing, progress)
    mine = set(missing if only is None else only)
    for i, name in enumerate(shards):
        chunk, path = pairs[i * shard_size : (i + 1) * shard_size], out_dir / name
        if path.exists() or i not in mine or i % world != rank:
            continue
        if not loaded:
            (model, tokenizer), loaded = load_teacher(), True
        res, engine = translate_with_engine(
            model,
            tokenizer,
            [p.src for p in chunk],
            decoding,
            num_return_sequences=num_candidates,
            selection="score" if selection == "reference" else selection,
            seed=seed + i,
            progress=progress,
            desc=f"teacher labels {i + 1}/{n_shards}",
            work_dir=out_dir,
            saved=saved,
            prompt=prompt,
        )
        rows = []
        for p, hyp, c in zip(chunk, res.hypotheses, res.candidates, strict=True):
            if selection == "reference" and p.tgt and len(c) > 1:
                hyp = c[reference_select(c, p.tgt)]
            rows.append({"src": p.src, "ref": p.tgt or None, "label": hyp, "candidates": c})
        # the figures first: a shard that exists always has them, whichever invocation wrote it
        write_json(_meta_path(path), {"generated_tokens": res.generated_tokens, "seconds": res.seconds,
                                      "engine": engine})  # fmt: skip
        write_jsonl(path, rows)
    release_vllm()
    if only is not None:  # a worker: the caller sums the figures once every worker is done
        return {"shards": shards}
    if processes is not None:  # wait for every shard
        from accelerate.utils import gather_object

        gather_object([rank])
    return {"shards": shards, **_shard_figures(out_dir, shards, max(world, workers))}


AUTO_WORKERS_MAX = 8  # each worker imports torch and transformers (a few hundred MB): not one per core on a big host


def label_workers(workers: int, *, cpu: bool, scratch: bool, engine: str) -> int:
    """How many processes write label shards: ``workers`` as set, or for 0 (auto) one per core (at most
    :data:`AUTO_WORKERS_MAX`) on a CPU when the teacher was built from scratch (a small model's matmuls use threads
    poorly: its generation runs nearly as fast on one thread as on two, so two processes of one thread each run
    nearly twice as fast), else 1. vLLM: always 1."""
    from distillmt.engines import available_cores

    if engine == "vllm":
        return 1
    if workers:
        return workers
    return min(available_cores(), AUTO_WORKERS_MAX) if cpu and scratch else 1


def _write_in_workers(job: dict[str, Any], workers: int, paths: list[Path], indices: list[int], progress: bool) -> None:
    """Run :func:`build_teacher_labels` on ``job`` in ``workers`` fresh processes, worker ``w`` with the shards
    ``indices[w::workers]``; returns when every shard in ``paths`` (those of ``indices``) is written, and raises the
    first worker's error."""
    import multiprocessing
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    import torch
    from tqdm.auto import tqdm

    threads = max(1, torch.get_num_threads() // workers)
    log.info("teacher labels: %d shards in %d processes of %d thread(s)", len(indices), workers, threads)
    # spawn: a new interpreter, which neither copies this process's threads (fork would) nor inherits the allocator
    # state of the training that ran before in it
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    bar = tqdm(total=len(paths), desc="teacher labels", unit="shard", disable=not progress, leave=False)
    try:
        pending = {pool.submit(_label_worker, job, indices[w::workers], threads) for w in range(workers)}
        while pending:
            done, pending = wait(pending, timeout=1.0, return_when=FIRST_EXCEPTION)
            bar.update(sum(p.exists() for p in paths) - bar.n)
            for future in done:
                future.result()  # a worker's error, here
    except BrokenProcessPool as e:  # a worker died without an error of its own: most often at its start
        _stop(pool)
        raise DistillmtError(
            "a label worker process stopped without finishing. Run from a Python script, the script's own code must "
            'sit under `if __name__ == "__main__":` (each worker starts by importing the script); or set '
            "hard_kd.workers=1 to write the labels in this process"
        ) from e
    except BaseException:
        _stop(pool)
        raise
    finally:
        bar.close()
        pool.shutdown(cancel_futures=True)


def _stop(pool: Any) -> None:
    """Stop the workers still running (after another's error or an interrupt)."""
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        process.terminate()


def _label_worker(job: dict[str, Any], only: list[int], threads: int) -> None:
    from distillmt.engines import configure_cpu

    configure_cpu(threads)
    build_teacher_labels(**job, only=only, progress=False)


def _meta_path(shard: Path) -> Path:
    return shard.with_name(shard.name.removesuffix(".jsonl") + ".meta.json")


def _shard_figures(out_dir: Path, shards: list[str], world: int) -> dict[str, Any]:
    """The generation figures of every shard, whichever invocation made it, so a resumed stage reports what the
    whole labelling cost: tokens summed; seconds summed per process (shards ``r, r + P, ...``), the slowest one
    counting, since the processes generate side by side (for label workers that resumed a stage, whose shares are
    the missing shards in turn, this split is an estimate)."""
    generated, per_process, engines, unknown = 0, [0.0] * world, set(), 0
    for i, name in enumerate(shards):
        try:
            meta = read_json(_meta_path(out_dir / name))
        except (OSError, ValueError):
            meta = None
        if not isinstance(meta, dict):  # written before shards kept their figures, or damaged
            unknown += 1
            continue
        generated += int(meta.get("generated_tokens") or 0)
        per_process[i % world] += float(meta.get("seconds") or 0.0)
        if meta.get("engine"):
            engines.add(str(meta["engine"]))
    if unknown:
        log.warning("%d of %d label shards have no record of their generation: the figures leave them out",
                    unknown, len(shards))  # fmt: skip
    result = {"generated_tokens": generated, "generation_seconds": max(per_process, default=0.0)}
    return {**result, "engine": ", ".join(sorted(engines))} if engines else result


def read_label_pairs(out_dir: str | Path, shards: list[str], mix_references: float, *, seed: int) -> list[Pair]:
    """The training pairs of sequence-level KD: each source with its teacher label, or with its human reference for
    a seeded random ``mix_references`` share of the sources that have one (extra sources have none)."""
    rows = []
    for name in shards:
        rows.extend(read_jsonl(Path(out_dir) / name))
    with_ref = [i for i, r in enumerate(rows) if r.get("ref") is not None]
    keep_ref = set(random.Random(seed).sample(with_ref, int(round(mix_references * len(with_ref)))))
    pairs = [Pair(r["src"], r["ref"] if i in keep_ref else r["label"]) for i, r in enumerate(rows)]
    empty = sum(1 for p in pairs if not p.tgt.strip())
    if empty:  # kept: sequence-level KD trains on what the teacher says, even when it says nothing
        log.warning("%d of %d teacher labels are empty", empty, len(pairs))
    return pairs
