"""Offline teacher-logit cache: run the teacher once, keep its top-k log-probs per target token, train without it.

Layout of a cache folder::

    shard-00000.safetensors   tensors  logprobs float16 [N_tokens, k]   teacher log-probs at temperature T
                                       indices  int32   [N_tokens, k]   their token ids (< vocab_size)
                                       offsets  int64   [n_examples + 1] example e owns rows offsets[e]:offsets[e+1]
                              metadata cache_key, shard index, first example index, keys (JSON list of example keys)
    shard-00001.safetensors   ...
    manifest.json             written last; ``complete: true`` marks a finished build

Rows of an example are its target positions in order: position ``t`` (``t >= 1`` and ``labels[t] != -100``) holds the
teacher's distribution for predicting ``labels[t]``, i.e. computed from the teacher logits at ``t - 1``. A label at
position 0 has nothing to predict it and gets no row (the losses shift the same way).

Examples are addressed by content: :func:`example_key` hashes the token ids and labels, so the cache can serve any
order or subset of the examples it was built on, and an example whose tokenisation changed is never served stale
data (it has no entry, and :meth:`TeacherCache.gather` refuses it).

Resume: every shard is self-describing (its metadata names the cache key and the example keys it holds) and written
atomically, so a rerun of :func:`build_teacher_cache` with the same settings and data keeps every finished shard
whose metadata matches, recomputes the rest, and writes ``manifest.json`` last.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save as safetensors_save
from torch import Tensor

from distillmt.errors import DistillmtError
from distillmt.forward import PrefixCache, shared_prefix, target_logits
from distillmt.generate import process_shard
from distillmt.io import atomic_write_bytes, read_json, write_json

FORMAT = "distillmt-teacher-cache"
FORMAT_VERSION = 1
IGNORE_INDEX = -100
MANIFEST = "manifest.json"
LOGPROBS_DTYPE = torch.float16
INDICES_DTYPE = torch.int32
BYTES_PER_ENTRY = 2 + 4  # float16 log-prob + int32 index
_FP16_MIN = -65000.0  # log-probs below this (never in practice) are clamped so float16 stays finite
_SHARD_RE = re.compile(r"^shard-(\d{5,})\.safetensors$")


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def example_key(input_ids: Sequence[int], labels: Sequence[int]) -> str:
    """sha256 hex of an example's token ids and labels (unpadded lists): the cache's address for that example."""
    payload = json.dumps([[int(x) for x in input_ids], [int(x) for x in labels]], separators=(",", ":"))
    return _sha256(payload)


def _fingerprint_keys(keys: Sequence[str]) -> str:
    return _sha256("\n".join(keys))


def data_fingerprint(examples: Sequence[dict[str, Any]]) -> str:
    """sha256 over the :func:`example_key` of every example, in order."""
    return _fingerprint_keys([example_key(e["input_ids"], e["labels"]) for e in examples])


def cache_key(*, teacher_id: str, k: int, temperature: float, vocab_size: int, data_fingerprint: str) -> str:
    """sha256 hex identifying a cache's content: teacher, k, temperature, vocabulary and data (and format version)."""
    settings = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "teacher_id": str(teacher_id),
        "k": int(k),
        "temperature": repr(float(temperature)),
        "vocab_size": int(vocab_size),
        "data_fingerprint": str(data_fingerprint),
    }
    return _sha256(json.dumps(settings, sort_keys=True, separators=(",", ":")))


def _target_positions(labels: Sequence[int]) -> list[int]:
    """Positions t >= 1 whose label is a target (predicted by the logits at t - 1)."""
    return [t for t in range(1, len(labels)) if int(labels[t]) != IGNORE_INDEX]


def _validate_examples(examples: Sequence[dict[str, Any]]) -> None:
    for i, e in enumerate(examples):
        if "input_ids" not in e or "labels" not in e:
            raise DistillmtError(f"example {i} needs 'input_ids' and 'labels' to build a teacher cache")
        if len(e["input_ids"]) != len(e["labels"]):
            raise DistillmtError(
                f"example {i}: input_ids ({len(e['input_ids'])}) and labels ({len(e['labels'])}) differ in length"
            )


# ---------------------------------------------------------------------------------------------------------------
# building


def _shard_is_reusable(path: Path, ckey: str, index: int, keys: list[str]) -> bool:
    """A finished shard from an earlier (killed) run of the same build: same cache key, index and example keys."""
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("cache_key") != ckey or meta.get("shard_index") != str(index):
                return False
            if json.loads(meta.get("keys", "null")) != keys:
                return False
            offsets = f.get_tensor("offsets")
            n_rows = f.get_slice("logprobs").get_shape()[0]
            return offsets.numel() == len(keys) + 1 and int(offsets[-1]) == n_rows
    except Exception:  # unreadable or foreign file: rebuild it
        return False


def _teacher_topk(
    teacher,
    examples: Sequence[dict[str, Any]],
    *,
    k: int,
    temperature: float,
    vocab_size: int,
    batch_size: int,
    pad_token_id: int,
    device,
    row_chunk: int = 1024,
) -> list[tuple[Tensor, Tensor]]:
    """Per example: (logprobs float16 [n_targets, k], indices int32 [n_targets, k]), in the order given."""
    results: list[tuple[Tensor, Tensor] | None] = [None] * len(examples)
    positions = [_target_positions(e["labels"]) for e in examples]
    empty = (torch.zeros(0, k, dtype=LOGPROBS_DTYPE), torch.zeros(0, k, dtype=INDICES_DTYPE))
    todo = []
    for i, pos in enumerate(positions):
        if pos:
            todo.append(i)
        else:
            results[i] = empty
    todo.sort(key=lambda i: -len(examples[i]["input_ids"]))  # similar lengths together: less padding
    prefix = PrefixCache(shared_prefix([examples[i] for i in todo]))  # the teacher skips the shared prompt prefix
    for b0 in range(0, len(todo), batch_size):
        batch = todo[b0 : b0 + batch_size]
        width = max(len(examples[i]["input_ids"]) for i in batch)
        ids = torch.full((len(batch), width), int(pad_token_id), dtype=torch.long)
        attn = torch.zeros((len(batch), width), dtype=torch.long)
        for j, i in enumerate(batch):
            seq = torch.as_tensor([int(x) for x in examples[i]["input_ids"]], dtype=torch.long)
            ids[j, : len(seq)] = seq
            attn[j, : len(seq)] = 1
        target = torch.zeros_like(ids, dtype=torch.bool)  # the positions whose logits predict a target
        for j, i in enumerate(batch):
            target[j, torch.as_tensor(positions[i], dtype=torch.long) - 1] = True
        # [n, V'] in the model dtype, row-major (example by example, positions ascending): the output layer runs at
        # these rows alone
        ids = ids.to(device)
        rows = target_logits(
            teacher, {"input_ids": ids, "attention_mask": attn.to(device)}, target.to(device), prefix.past(teacher, ids)
        )
        if rows.shape[-1] < vocab_size:
            raise DistillmtError(
                f"the teacher produces {rows.shape[-1]} logits per token but vocab_size={vocab_size} was asked for"
            )
        vals_parts, idx_parts = [], []
        for r0 in range(0, rows.shape[0], row_chunk):
            lp = F.log_softmax(rows[r0 : r0 + row_chunk, :vocab_size].float() / temperature, dim=-1)
            vals, idx = lp.topk(k, dim=-1)  # sorted, largest first
            vals_parts.append(vals.clamp(min=_FP16_MIN).to(LOGPROBS_DTYPE).cpu())
            idx_parts.append(idx.to(INDICES_DTYPE).cpu())
        vals_all = torch.cat(vals_parts)
        idx_all = torch.cat(idx_parts)
        start = 0
        for i in batch:
            n = len(positions[i])
            results[i] = (vals_all[start : start + n].clone(), idx_all[start : start + n].clone())
            start += n
    return results  # type: ignore[return-value]


def _shard_bytes(
    results: list[tuple[Tensor, Tensor]], *, ckey: str, index: int, first_example: int, keys: list[str], k: int
) -> bytes:
    counts = [r[0].shape[0] for r in results]
    offsets = torch.zeros(len(results) + 1, dtype=torch.int64)
    if counts:
        offsets[1:] = torch.cumsum(torch.as_tensor(counts, dtype=torch.int64), dim=0)
    logprobs = torch.cat([r[0] for r in results]) if results else torch.zeros(0, k, dtype=LOGPROBS_DTYPE)
    indices = torch.cat([r[1] for r in results]) if results else torch.zeros(0, k, dtype=INDICES_DTYPE)
    meta = {
        "format": FORMAT,
        "version": str(FORMAT_VERSION),
        "cache_key": ckey,
        "shard_index": str(index),
        "first_example": str(first_example),
        "keys": json.dumps(keys),
    }
    data = safetensors_save(
        {"logprobs": logprobs.contiguous(), "indices": indices.contiguous(), "offsets": offsets}, metadata=meta
    )
    return data


def _remove_stale_files(out_dir: Path, n_shards: int) -> None:
    """Shards left from an earlier, larger build, and temp files a killed atomic write left behind."""
    for p in out_dir.iterdir():
        m = _SHARD_RE.match(p.name)
        if (m and int(m.group(1)) >= n_shards) or (
            p.name.startswith((".shard-", f".{MANIFEST}.")) and p.name.endswith(".tmp")
        ):
            p.unlink(missing_ok=True)


def _finished_cache(out_dir: Path, ckey: str, overwrite: bool) -> TeacherCache | None:
    """A complete cache already in ``out_dir`` with the same key, or None after clearing the way for a build; a
    complete cache with other settings is refused unless ``overwrite``."""
    manifest_path = out_dir / MANIFEST
    if not manifest_path.exists():
        return None
    try:
        old = read_json(manifest_path)
    except (OSError, ValueError):
        old = None
    if isinstance(old, dict) and old.get("complete") is True:
        if old.get("cache_key") == ckey:  # same teacher, k, temperature, vocabulary and data
            try:
                return TeacherCache(out_dir)
            except DistillmtError:
                pass  # damaged: rebuild what is missing
        elif not overwrite:
            raise DistillmtError(
                f"{out_dir} already holds a teacher cache built with other settings or data "
                f"(teacher {old.get('teacher_id')!r}, k={old.get('k')}, temperature={old.get('temperature')}, "
                f"vocab_size={old.get('vocab_size')}); choose another folder or rebuild it with overwrite"
            )
    manifest_path.unlink()  # from here on the folder is an unfinished build
    return None


def _manifest(
    ckey: str, settings: dict, fingerprint: str, n_examples: int, shard_size: int, shards_info: list, reused: int
) -> dict[str, Any]:
    k = settings["k"]
    n_tokens_total = sum(si["n_tokens"] for si in shards_info)
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "cache_key": ckey,
        **settings,
        "data_fingerprint": fingerprint,
        "n_examples": n_examples,
        "n_tokens": n_tokens_total,
        "shard_size": shard_size,
        "logprobs_dtype": "float16",
        "indices_dtype": "int32",
        "bytes_per_token": k * BYTES_PER_ENTRY,
        "total_bytes": n_tokens_total * k * BYTES_PER_ENTRY,
        "alignment": "row i of an example = teacher distribution for labels[t_i], t_i >= 1 its i-th target position",
        "ignore_index": IGNORE_INDEX,
        "shards": shards_info,
        "reused_shards": reused,
        "complete": True,
    }


def _write_shards(
    teacher, examples: list[dict], keys: list[str], out_dir: Path, ckey: str, shard_ids: range, shard_size: int,
    topk: dict[str, Any], progress: bool,
) -> int:  # fmt: skip
    """Write the shards ``shard_ids`` (those not already finished by an interrupted build) with the teacher in eval
    mode, its mode restored afterwards; returns how many were reused."""
    from tqdm.auto import tqdm

    reused = 0
    was_training = bool(getattr(teacher, "training", False))
    teacher.eval()
    try:
        bar = tqdm(total=len(examples), desc="teacher cache", unit="ex", disable=not progress)
        for s in shard_ids:
            lo, hi = s * shard_size, min((s + 1) * shard_size, len(examples))
            path = out_dir / _shard_name(s)
            if _shard_is_reusable(path, ckey, s, keys[lo:hi]):
                reused += 1
            else:
                results = _teacher_topk(teacher, examples[lo:hi], **topk)
                data = _shard_bytes(results, ckey=ckey, index=s, first_example=lo, keys=keys[lo:hi], k=topk["k"])
                atomic_write_bytes(path, data)
            bar.update(hi - lo)
        bar.close()
    finally:
        teacher.train(was_training)
    return reused


def _shard_info(out_dir: Path, s: int, shard_size: int, n: int) -> dict[str, Any]:
    """A finished shard's line in the manifest."""
    lo, hi = s * shard_size, min((s + 1) * shard_size, n)
    with safe_open(str(out_dir / _shard_name(s)), framework="pt") as f:
        n_tokens = int(f.get_tensor("offsets")[-1])
    return {"file": _shard_name(s), "first_example": lo, "n_examples": hi - lo, "n_tokens": n_tokens}


def build_teacher_cache(
    teacher,
    examples: list[dict],
    out_dir: str | Path,
    *,
    teacher_id: str,
    k: int,
    temperature: float,
    vocab_size: int,
    batch_size: int = 8,
    shard_size: int = 256,
    pad_token_id: int,
    device: str | torch.device = "cpu",
    progress: bool = True,
    overwrite: bool = False,
    processes: Any = None,
) -> TeacherCache:
    """Run ``teacher`` once over ``examples`` and store its top-``k`` log-probs (at ``temperature``) per target token.

    ``examples``: dicts with unpadded ``input_ids`` and ``labels`` lists (labels ``-100`` on the prompt).
    ``teacher``: an HF causal LM (a peft model works), already on ``device``; it runs in eval mode under no_grad on
    right-padded batches, and its training/eval mode is restored afterwards. Only the first ``vocab_size`` logits
    are used (padded embedding rows are not tokens). ``shard_size`` examples go to each shard file.

    Resumable: finished shards of an interrupted build with the same settings are kept (not rewritten). A folder
    that already holds a complete cache with the same settings is returned as is; one holding a complete cache with
    other settings is refused unless ``overwrite=True``.

    ``processes`` (accelerate's state, several processes): process ``r`` of ``P`` writes shards ``r, r + P, ...``;
    the main process checks the folder first and writes the manifest last, and every process returns the whole
    cache. A shard's content does not depend on which process wrote it.
    """
    k, vocab_size, batch_size, shard_size = int(k), int(vocab_size), int(batch_size), int(shard_size)
    temperature = float(temperature)
    if vocab_size < 1 or not 1 <= k <= vocab_size:
        raise DistillmtError(f"k must be in [1, vocab_size={vocab_size}], got {k}")
    if batch_size < 1 or shard_size < 1:
        raise DistillmtError(f"batch_size and shard_size must be >= 1, got {batch_size} and {shard_size}")
    _validate_examples(examples)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = [example_key(e["input_ids"], e["labels"]) for e in examples]
    fingerprint = _fingerprint_keys(keys)
    ckey = cache_key(
        teacher_id=teacher_id, k=k, temperature=temperature, vocab_size=vocab_size, data_fingerprint=fingerprint
    )

    manifest_path = out_dir / MANIFEST
    main = processes is None or processes.is_main_process
    finished = _finished_cache(out_dir, ckey, overwrite) if main else None
    if processes is not None:  # the main process has checked (and cleared) the folder
        processes.wait_for_everyone()
        finished = finished or (TeacherCache(out_dir) if manifest_path.exists() else None)
    if finished is not None:
        return finished

    n = len(examples)
    n_shards = max(1, math.ceil(n / shard_size))
    rank, world = process_shard(processes)
    topk = {"k": k, "temperature": temperature, "vocab_size": vocab_size, "batch_size": batch_size}
    topk.update(pad_token_id=pad_token_id, device=device)
    reused = _write_shards(teacher, examples, keys, out_dir, ckey, range(rank, n_shards, world), shard_size, topk,
                           progress)  # fmt: skip

    if processes is not None:  # every shard written
        from accelerate.utils import gather_object

        reused = sum(gather_object([reused]))
    if main:
        shards_info = [_shard_info(out_dir, s, shard_size, n) for s in range(n_shards)]
        _remove_stale_files(out_dir, n_shards)
        settings = {"teacher_id": str(teacher_id), "k": k, "temperature": temperature, "vocab_size": vocab_size}
        write_json(manifest_path, _manifest(ckey, settings, fingerprint, n, shard_size, shards_info, reused))
    if processes is not None:  # the manifest written
        processes.wait_for_everyone()
    return TeacherCache(out_dir)


# ---------------------------------------------------------------------------------------------------------------
# reading


class TeacherCache:
    """A finished teacher cache folder, opened read-only (the index of example keys is loaded, tensors on demand)."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        manifest_path = self.out_dir / MANIFEST
        if not manifest_path.is_file():
            raise DistillmtError(f"no teacher cache in {self.out_dir} (manifest.json missing): build it first")
        try:
            manifest = read_json(manifest_path)
        except (OSError, ValueError) as e:
            raise DistillmtError(f"unreadable teacher cache manifest {manifest_path}: {e}; rebuild the cache") from e
        required = ("cache_key", "teacher_id", "k", "temperature", "vocab_size", "data_fingerprint", "shards")
        if (
            not isinstance(manifest, dict)
            or manifest.get("format") != FORMAT
            or any(f not in manifest for f in required)
        ):
            raise DistillmtError(f"{manifest_path} is not a distillmt teacher cache manifest; rebuild the cache")
        if manifest.get("version") != FORMAT_VERSION:
            raise DistillmtError(
                f"teacher cache {self.out_dir} has format version {manifest.get('version')}, "
                f"this distillmt reads version {FORMAT_VERSION}: rebuild it"
            )
        if manifest.get("complete") is not True:
            raise DistillmtError(f"teacher cache {self.out_dir} is incomplete (its build did not finish): rebuild it")
        self.manifest: dict[str, Any] = manifest
        self.teacher_id: str = manifest["teacher_id"]
        self.k: int = int(manifest["k"])
        self.temperature: float = float(manifest["temperature"])
        self.vocab_size: int = int(manifest["vocab_size"])
        self.data_fingerprint: str = manifest["data_fingerprint"]
        self.cache_key: str = manifest["cache_key"]

        self._shard_files: list[Path] = []
        self._index: dict[str, tuple[int, int, int]] = {}  # key -> (shard, first row, end row)
        for s, info in enumerate(manifest["shards"]):
            path = self.out_dir / info["file"]
            if not path.is_file():
                raise DistillmtError(f"teacher cache {self.out_dir} is missing {info['file']}: rebuild it")
            try:
                with safe_open(str(path), framework="pt") as f:
                    meta = f.metadata() or {}
                    keys = json.loads(meta.get("keys", "[]"))
                    offsets = f.get_tensor("offsets").tolist()
            except Exception as e:
                raise DistillmtError(f"unreadable teacher cache shard {path}: {e}; rebuild the cache") from e
            if meta.get("cache_key") != self.cache_key or len(offsets) != len(keys) + 1:
                raise DistillmtError(f"teacher cache shard {path} does not belong to this cache: rebuild it")
            self._shard_files.append(path)
            for e, key in enumerate(keys):
                self._index[key] = (s, int(offsets[e]), int(offsets[e + 1]))

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def check(self, *, teacher_id: str, k: int, temperature: float, vocab_size: int, examples: list[dict]) -> None:
        """Refuse (DistillmtError naming every difference) a cache built for another teacher, k, temperature,
        vocabulary, or data: an example whose token ids or labels changed (e.g. new tokenisation or prompt) has no
        entry. Any order or subset of the cached examples is accepted (entries are addressed by content)."""
        problems = []
        if str(teacher_id) != self.teacher_id:
            problems.append(f"teacher: cache {self.teacher_id!r}, run {teacher_id!r}")
        if int(k) != self.k:
            problems.append(f"k: cache {self.k}, run {int(k)}")
        if not math.isclose(float(temperature), self.temperature, rel_tol=1e-9, abs_tol=0.0):
            problems.append(f"temperature: cache {self.temperature}, run {float(temperature)}")
        if int(vocab_size) != self.vocab_size:
            problems.append(f"vocab_size: cache {self.vocab_size}, run {int(vocab_size)}")
        keys = [example_key(e["input_ids"], e["labels"]) for e in examples]
        if _fingerprint_keys(keys) != self.data_fingerprint:
            missing = sum(key not in self._index for key in keys)
            if missing:
                problems.append(
                    f"data: {missing} of {len(keys)} training examples have no entry (the data, its tokenisation "
                    f"or the prompt format changed since the cache was built; data fingerprint "
                    f"{self.data_fingerprint[:12]} differs)"
                )
        if problems:
            raise DistillmtError(
                f"teacher cache {self.out_dir} is stale for this run: " + "; ".join(problems) + ". Rebuild it."
            )

    def gather(
        self, batch_input_ids: list[list[int]], batch_labels: list[list[int]], seq_len: int
    ) -> tuple[Tensor, Tensor]:
        """Teacher top-k for a batch, aligned with the labels as :func:`distillmt.losses.topk_kd_loss` wants.

        ``batch_input_ids``/``batch_labels``: the *unpadded* per-example lists (as given to the build); ``seq_len``:
        the padded batch length (≥ every example's length). Returns ``(logprobs float32 [B, seq_len, k],
        indices long [B, seq_len, k])``: position ``t`` holds the teacher's distribution for ``labels[t]``; every
        other position (prompt, padding, position 0) holds log-prob 0 and index 0, which the loss ignores.
        """
        if len(batch_input_ids) != len(batch_labels):
            raise DistillmtError(f"{len(batch_input_ids)} input_ids lists but {len(batch_labels)} labels lists")
        bsz = len(batch_labels)
        logprobs = torch.zeros(bsz, seq_len, self.k, dtype=torch.float32)
        indices = torch.zeros(bsz, seq_len, self.k, dtype=torch.long)
        by_shard: dict[int, list[tuple[int, int, int, list[int]]]] = {}
        for b, (ids, labels) in enumerate(zip(batch_input_ids, batch_labels, strict=True)):
            if len(labels) > seq_len:
                raise DistillmtError(f"example {b} has {len(labels)} tokens, more than seq_len={seq_len}")
            key = example_key(ids, labels)
            entry = self._index.get(key)
            if entry is None:
                raise DistillmtError(
                    f"teacher cache has no entry for a training example: example {b} of the batch "
                    f"({len(ids)} tokens, key {key[:12]}) is not in {self.out_dir}; the data or its tokenisation "
                    "changed since the cache was built: rebuild it"
                )
            shard, start, end = entry
            by_shard.setdefault(shard, []).append((b, start, end, _target_positions(labels)))
        for shard, items in by_shard.items():
            with safe_open(str(self._shard_files[shard]), framework="pt") as f:
                lp_slice = f.get_slice("logprobs")
                ix_slice = f.get_slice("indices")
                for b, start, end, positions in items:
                    if end - start != len(positions):
                        raise DistillmtError(
                            f"teacher cache {self.out_dir} is corrupt: {end - start} rows for an example with "
                            f"{len(positions)} target tokens; rebuild it"
                        )
                    if not positions:
                        continue
                    pos = torch.as_tensor(positions, dtype=torch.long)
                    logprobs[b, pos] = lp_slice[start:end].float()
                    indices[b, pos] = ix_slice[start:end].long()
        return logprobs, indices
