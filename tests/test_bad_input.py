"""Input a user can get wrong, refused in one line that names the file (and line), or cleaned and counted: corpora
(lone surrogates, NUL characters, TSV headers), data.path, YAML words and duplicate keys, an unwritable output_dir."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from distillmt.config import check_run_folder, load_config, read_yaml
from distillmt.data import Pair, load_pairs, normalize, read_sources
from distillmt.errors import DistillmtError

pytestmark = pytest.mark.unit


def _write(path: Path, text: str) -> str:
    path.write_bytes(text.encode("utf-8"))
    return str(path)


def _error(capsys) -> str:
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("distillmt: error: ")]
    assert len(lines) == 1
    return lines[0]


# --- corpora -----------------------------------------------------------------------------------------------------


def test_lone_surrogate_in_jsonl_corpus_names_file_and_line(tmp_path):
    # the escape is written as JSON writes it: backslash-u, six ASCII characters
    good = '{"en": "a", "zh": "甲"}\n'
    path = _write(tmp_path / "c.jsonl", good + '{"en": "a\\ud800b", "zh": "乙"}\n')
    with pytest.raises(DistillmtError) as exc:
        load_pairs("jsonl", path=path)
    assert str(exc.value).startswith(f"{path}:2: field 'en' holds a lone surrogate escape (\\ud800 at character 2)")
    # a surrogate pair escapes one character outside the BMP: text, kept
    path = _write(tmp_path / "ok.jsonl", '{"en": "smile \\ud83d\\ude00", "zh": "笑"}\n')
    assert load_pairs("jsonl", path=path)[0] == [Pair("smile \U0001f600", "笑")]


def test_lone_surrogate_in_sources_to_translate(tmp_path):
    path = _write(tmp_path / "src.jsonl", '{"src": "ok"}\n{"src": "x", "ref": "\\udc00"}\n')
    with pytest.raises(DistillmtError, match=re.escape(f"{path}:2: field 'ref' holds a lone surrogate escape")):
        read_sources(path)


def test_run_on_a_corpus_with_a_lone_surrogate_exits_2(tmp_path, capsys):
    from distillmt.cli import main

    rows = [json.dumps({"en": f"Sentence {i}.", "zh": f"第{i}句。"}, ensure_ascii=False) for i in range(3)]
    path = _write(tmp_path / "c.jsonl", "\n".join([*rows, '{"en": "bad \\udfff", "zh": "坏"}']) + "\n")
    argv = ["run", "data.source=jsonl", f"data.path={path}", f"output_dir={tmp_path / 'runs'}", "eval.bertscore=false"]
    assert main([*argv, "--no-progress"]) == 2
    assert _error(capsys).startswith(f"distillmt: error: {path}:4: field 'en' holds a lone surrogate escape")


def test_nul_and_other_control_characters_are_removed_and_counted(tmp_path):
    assert normalize("a\x00b\x07c\x7f d") == "abc d"
    # UTF-16 text read as UTF-8 puts a NUL after every ASCII letter
    rows = [{"en": "H\u0000i\u0000", "zh": "嗨"}, {"en": "Hello.", "zh": "你好。"}, {"en": "\u0000", "zh": "空"}]
    path = _write(tmp_path / "c.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    pairs, stats = load_pairs("jsonl", path=path)
    assert pairs == [Pair("Hi", "嗨"), Pair("Hello.", "你好。")]
    assert (stats.read, stats.kept, stats.empty, stats.control_chars) == (3, 2, 1, 2)
    path = _write(tmp_path / "c.tsv", "Go\x00.\t走\x00。\n")
    pairs, stats = load_pairs("tsv", path=path)
    assert pairs == [Pair("Go.", "走。")] and stats.control_chars == 1


@pytest.mark.parametrize(
    "header, fields, expected",
    [
        ("source\ttarget", ("source", "target"), [Pair("Hello.", "你好。")]),
        ("zh\ten", ("en", "zh"), [Pair("你好。", "Hello.")]),  # by name, whatever the order
        ("en\tzh", ("en", "zh"), [Pair("Hello.", "你好。")]),  # the defaults name a header too
        ("id\ten", ("en", "0"), [Pair("你好。", "Hello.")]),  # a number is a column even beside a name
    ],
)
def test_tsv_fields_name_header_columns(tmp_path, header, fields, expected):
    path = _write(tmp_path / "h.tsv", f"{header}\nHello.\t你好。\n")
    pairs, stats = load_pairs("tsv", path=path, src_field=fields[0], tgt_field=fields[1])
    assert pairs == expected
    assert stats.read == 1  # the header is not a pair


def test_tsv_named_column_that_is_not_in_the_header(tmp_path):
    path = _write(tmp_path / "h.tsv", "\nsource\ttarget\nHello.\t你好。\n")
    with pytest.raises(DistillmtError) as exc:
        load_pairs("tsv", path=path, src_field="english", tgt_field="target")
    assert str(exc.value).startswith(f"{path}:2: no column named 'english' in the header (columns: 'source', 'target')")


def test_tsv_column_numbers_and_default_fields_without_a_header_read_as_before(tmp_path):
    path = _write(tmp_path / "n.tsv", "source\ttarget\nHello.\t你好。\n")
    pairs, _ = load_pairs("tsv", path=path, src_field="0", tgt_field="1")
    assert pairs == [Pair("source", "target"), Pair("Hello.", "你好。")]  # numbers: no header
    path = _write(tmp_path / "d.tsv", "Hi.\t嗨。\nHello.\t你好。\n")
    assert load_pairs("tsv", path=path)[0] == [Pair("Hi.", "嗨。"), Pair("Hello.", "你好。")]


# --- data.path -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source, path, message",
    [
        ("jsonl", "{folder}", "config key 'data.path' = '{folder}' is a folder, not a file (data.source=jsonl)"),
        ("tsv", "{folder}/nope.tsv", "config key 'data.path': file not found: {folder}/nope.tsv (data.source=tsv)"),
        ("tatoeba", "{folder}", "config key 'data.path' = '{folder}' is a folder, not a file (data.source=tatoeba)"),
        ("jsonl", "", "data.source=jsonl needs data.path (a file)"),
        ("hf", "", "data.source=hf needs data.path (a dataset name)"),
    ],
)
def test_data_path_messages_say_what_is_wrong(tmp_path, source, path, message):
    from distillmt.pipeline import preflight

    folder = str(tmp_path)
    cfg = load_config(None, [f"data.source={source}", f"data.path={path.format(folder=folder)}"])
    with pytest.raises(DistillmtError) as exc:
        preflight(cfg)
    assert str(exc.value) == message.format(folder=folder)


def test_data_path_folder_given_to_the_loader(tmp_path):
    with pytest.raises(DistillmtError, match=re.escape(f"{tmp_path} is a folder, not a file")):
        load_pairs("jsonl", path=str(tmp_path))


# --- YAML words given to string keys --------------------------------------------------------------------------------


def test_yaml_booleans_and_numbers_given_to_string_keys_keep_their_words(tmp_path):
    out = f"output_dir={tmp_path}"
    assert load_config(None, ["name=no", out]).name == "no"
    assert load_config(None, ["name=007", out]).name == "007"
    assert load_config(None, ["name=On", out]).name == "On"
    assert load_config(None, ["device=off", out]).device == "off"
    assert load_config(None, ["data.src_field=3", out]).data.src_field == "3"
    path = _write(tmp_path / "c.yaml", "name: no\ndata:\n  hf_split: 1.10\ntrain_student:\n  mixed_precision: false\n")
    cfg = load_config(path, [out])
    assert (cfg.name, cfg.data.hf_split, cfg.train_student.mixed_precision) == ("no", "1.10", "no")
    assert load_config(path, [out, "name=yes"]).name == "yes"  # an override's word replaces the file's
    assert load_config(path, [out, "name=x1"]).name == "x1"


@pytest.mark.parametrize("where", ["override", "file"])
def test_yaml_boolean_given_to_a_choice_key_names_the_word(tmp_path, where):
    choices = "choose one of: forward_kl"
    if where == "override":
        with pytest.raises(DistillmtError, match=f"'soft_kd.divergence' = 'no' is not allowed; {choices}"):
            load_config(None, ["soft_kd.divergence=no"])
    else:
        path = _write(tmp_path / "c.yaml", "soft_kd:\n  divergence: off\n")
        with pytest.raises(DistillmtError, match=f"'soft_kd.divergence' = 'off' is not allowed; {choices}"):
            load_config(path)


def test_run_with_device_off_names_the_word(tmp_path, capsys):
    from distillmt.cli import main

    assert main(["run", "device=off", f"output_dir={tmp_path}", "--no-progress"]) == 2
    assert "device 'off' is not a device name" in _error(capsys)
    assert not (tmp_path / "default").exists()


# --- duplicate YAML keys -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, line, key, first",
    [
        ("name: a\nseed: 1\nname: b\n", 3, "name", 1),
        ("soft_kd:\n  alpha: 0.1\n  temperature: 2.0\n  alpha: 0.2\n", 4, "alpha", 2),
        ("soft_kd: {alpha: 0.1, alpha: 0.2}\n", 1, "alpha", 1),
    ],
)
def test_duplicate_yaml_key_is_refused_with_file_and_line(tmp_path, text, line, key, first):
    path = _write(tmp_path / "dup.yaml", text)
    with pytest.raises(DistillmtError) as exc:
        load_config(path)
    assert str(exc.value) == f"{path}:{line}: duplicate key '{key}' (first given at line {first})"


def test_yaml_merge_key_then_own_key_is_not_a_duplicate(tmp_path):
    path = _write(tmp_path / "m.yaml", "a: &base {k: 1, j: 2}\nb:\n  <<: *base\n  k: 3\n")
    assert read_yaml(path, "sweep") == {"a": {"k": 1, "j": 2}, "b": {"k": 3, "j": 2}}


# --- output_dir ------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_output_dir_under_proc_is_refused_naming_it(tmp_path, capsys):
    from distillmt.cli import main

    cfg = load_config(None, ["output_dir=/proc/distillmt-test"])
    expected = "config key 'output_dir' = '/proc/distillmt-test': the run folder /proc/distillmt-test/default cannot "
    with pytest.raises(DistillmtError, match=re.escape(expected + "be created: /proc is not a writable folder")):
        check_run_folder(cfg)
    assert main(["run", "output_dir=/proc/distillmt-test", "--no-progress"]) == 2
    assert _error(capsys).startswith(f"distillmt: error: {expected}")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_output_dir_in_a_read_only_folder_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    try:
        with pytest.raises(DistillmtError, match=r"cannot be created: .*/ro is not a writable folder \(permission"):
            check_run_folder(load_config(None, [f"output_dir={ro / 'runs'}"]))
    finally:
        ro.chmod(0o700)


def test_writable_output_dir_passes_and_leaves_nothing_behind(tmp_path):
    check_run_folder(load_config(None, [f"output_dir={tmp_path / 'runs'}"]))
    (tmp_path / "runs" / "default").mkdir(parents=True)
    check_run_folder(load_config(None, [f"output_dir={tmp_path / 'runs'}"]))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["default", "runs"]


# --- translate ---------------------------------------------------------------------------------------------------


def test_translate_model_or_tokenizer_folder_that_is_not_one(tmp_path, capsys, monkeypatch):
    """Refused before loading: transformers' own error for a folder without a tokenizer is several lines, and the
    first of them, all that fits in one, ends mid-sentence ("... from one of:")."""
    from distillmt import models
    from distillmt.cli import main

    def never(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load_model", never)
    monkeypatch.setattr(models, "load_tokenizer", never)
    src = _write(tmp_path / "src.txt", "Hello.\n")
    empty, weights = tmp_path / "empty", tmp_path / "weights"
    empty.mkdir()
    weights.mkdir()
    (weights / "config.json").write_text("{}", encoding="utf-8")
    cases = [
        (["--model", str(empty)], f"--model {empty}: not a model folder (no config.json)"),
        (["--model", src], f"--model {src} is a file, not a model folder"),
        (["--model", str(weights)], f"--model {weights}: no tokenizer in it (none of tokenizer.json, "),
        (["--model", str(weights), "--tokenizer", str(empty)], f"--tokenizer {empty}: no tokenizer in it (none of "),
    ]
    for args, message in cases:
        assert main(["translate", *args, "-i", src, "--no-progress"]) == 2
        line = _error(capsys)
        assert line.startswith(f"distillmt: error: {message}"), line
        assert not line.endswith(":"), line
