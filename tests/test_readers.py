"""Tests for the readers of sources to translate and of hypotheses/references to score (distillmt.data), called
directly: no CLI, no model."""

from __future__ import annotations

import io
import json
import re

import pytest

from distillmt.data import read_hyps_and_refs, read_sources
from distillmt.errors import DistillmtError

pytestmark = pytest.mark.unit


def _text(path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def _jsonl(path, rows: list[dict]) -> str:
    return _text(path, [json.dumps(r, ensure_ascii=False) for r in rows])


# --- read_sources ---------------------------------------------------------------------------------------------------


def test_read_sources_plain_text_skips_blank_lines(tmp_path):
    path = _text(tmp_path / "in.txt", ["Hello.", "", "  ", "Good night."])
    assert read_sources(path) == [{"src": "Hello.", "ref": None}, {"src": "Good night.", "ref": None}]


def test_read_sources_jsonl_keeps_ref_and_mixes_with_text(tmp_path):
    path = _text(
        tmp_path / "in.jsonl", [json.dumps({"src": "Hi.", "ref": "你好。"}), json.dumps({"src": "Bye."}), "Yes."]
    )
    assert read_sources(path) == [
        {"src": "Hi.", "ref": "你好。"},
        {"src": "Bye.", "ref": None},
        {"src": "Yes.", "ref": None},
    ]


def test_read_sources_reads_stdin_for_none_and_dash(monkeypatch):
    for path in (None, "-"):
        monkeypatch.setattr("sys.stdin", io.StringIO("Hello.\n"))
        assert read_sources(path) == [{"src": "Hello.", "ref": None}]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"src": "Hi."}\n{"src": \n', ":2: invalid JSON ("),
        ('{"src": 1}\n', ":1: JSON line needs a string field 'src'"),
    ],
)
def test_read_sources_bad_json_names_file_and_line(tmp_path, text, message):
    path = tmp_path / "in.jsonl"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DistillmtError, match=re.escape(f"{path}{message}")):
        read_sources(str(path))


def test_read_sources_non_utf8_names_file(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9\n".encode("latin-1"))
    with pytest.raises(DistillmtError, match=re.escape(f"{path}: not valid UTF-8")):
        read_sources(str(path))


# --- read_hyps_and_refs ---------------------------------------------------------------------------------------------

HYPS = ["今天天气很好。", "我喜欢吃苹果。"]
REFS = ["今天天气不错。", "我爱吃苹果。"]


def test_plain_hyp_and_plain_ref(tmp_path):
    assert read_hyps_and_refs(_text(tmp_path / "h.txt", HYPS), _text(tmp_path / "r.txt", REFS)) == (HYPS, REFS)


def test_jsonl_hyp_alone_gives_its_hyp_and_ref_fields(tmp_path):
    hyp = _jsonl(tmp_path / "out.jsonl", [{"src": "x", "hyp": h, "ref": r} for h, r in zip(HYPS, REFS, strict=True)])
    assert read_hyps_and_refs(hyp, None) == (HYPS, REFS)


def test_jsonl_recognised_by_content_and_ref_field_from_jsonl_ref(tmp_path):
    hyp = _jsonl(tmp_path / "out.txt", [{"hyp": h} for h in HYPS])  # .txt: JSON lines recognised by content
    ref = _jsonl(tmp_path / "data.jsonl", [{"src": "x", "ref": r, "hyp": "ignored"} for r in REFS])
    assert read_hyps_and_refs(hyp, ref) == (HYPS, REFS)


def test_plain_hyp_alone_asks_for_references(tmp_path):
    hyp = _text(tmp_path / "h.txt", HYPS)
    with pytest.raises(DistillmtError, match=re.escape(f"--hyp {hyp} is plain text (one hypothesis per line)")):
        read_hyps_and_refs(hyp, None)


def test_messages_name_the_files_as_the_caller_says(tmp_path):
    hyp, ref = _text(tmp_path / "h.txt", HYPS), _text(tmp_path / "r.txt", REFS[:1])
    with pytest.raises(DistillmtError) as e:
        read_hyps_and_refs(hyp, ref, hyp_what="hypotheses", ref_what="references")
    assert str(e.value) == (
        f"2 hypotheses but 1 references: hypotheses {hyp} has 2 lines, references {ref} has 1 lines; "
        "they must pair up line by line"
    )


def test_jsonl_refs_that_disagree_with_ref_file_are_refused(tmp_path):
    hyp = _jsonl(tmp_path / "out.jsonl", [{"hyp": h, "ref": r} for h, r in zip(HYPS, REFS, strict=True)])
    ref = _text(tmp_path / "r.txt", [REFS[0], "别的句子。"])
    with pytest.raises(
        DistillmtError, match=re.escape(f"{hyp}:2: its 'ref' field '我爱吃苹果。' differs from {ref}:2")
    ):
        read_hyps_and_refs(hyp, ref)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"hyp": "a", "ref": "b"}\n[1]\n', ":2: a JSON lines file needs one JSON object per line"),
        ('{"hyp": "a", "ref": "b"}\n{"hyp": \n', ":2: invalid JSON ("),
        ('{"hyp": 1, "ref": "b"}\n', ":1: needs string fields 'hyp' and 'ref' (or pass --ref FILE)"),
    ],
)
def test_broken_jsonl_hyp_names_file_and_line(tmp_path, text, message):
    path = tmp_path / "out.jsonl"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DistillmtError, match=re.escape(f"{path}{message}")):
        read_hyps_and_refs(str(path), None)


def test_missing_file_and_folder(tmp_path):
    ref = _text(tmp_path / "r.txt", REFS)
    with pytest.raises(DistillmtError, match=re.escape(f"file not found: {tmp_path / 'nope.txt'}")):
        read_hyps_and_refs(str(tmp_path / "nope.txt"), ref)
    with pytest.raises(DistillmtError, match=re.escape(f"--hyp {tmp_path} is a folder, not a file")):
        read_hyps_and_refs(str(tmp_path), ref)
