"""Tests for distillmt.data: parsing, bad input, normalisation, real corpora, leak-free splitting, offline hf."""

from __future__ import annotations

import json
import logging
import sys
import types

import pytest

from distillmt.data import LoadStats, Pair, load_pairs, normalize, read_pairs, split_pairs, tatoeba_path, write_pairs
from distillmt.errors import DistillmtError

pytestmark = pytest.mark.unit


def _write(path, text: str) -> str:
    path.write_bytes(text.encode("utf-8"))
    return str(path)


def _assert_consistent(stats: LoadStats) -> None:
    d = stats.as_dict()
    assert d["read"] == d["kept"] + d["empty"] + d["too_long"] + d["duplicates"] + d["filtered"]


# --- parsing -----------------------------------------------------------------------------------------------------


def test_jsonl_custom_fields_skips_and_counts(tmp_path, caplog):
    rows = [
        {"english": "Hello.", "chinese": "你好。", "extra": 1},
        {"english": "  ", "chinese": "空"},  # empty source after normalisation
        {"english": "Long " * 20, "chinese": "长"},  # over max_chars
        {"english": "Hello. ", "chinese": "你好。"},  # duplicate after normalisation
        {"english": "Ｉ ｓｅｅ　it.", "chinese": "我明白了。"},
    ]
    text = "\n".join(json.dumps(r, ensure_ascii=False) for r in rows[:2]) + "\n\n  \n"
    text += "\n".join(json.dumps(r, ensure_ascii=False) for r in rows[2:]) + "\n"
    path = _write(tmp_path / "d.jsonl", text)
    with caplog.at_level(logging.INFO, logger="distillmt.data"):
        pairs, stats = load_pairs("jsonl", path=path, src_field="english", tgt_field="chinese", max_chars=50)
    assert pairs == [Pair("Hello.", "你好。"), Pair("I see it.", "我明白了。")]
    assert stats.as_dict() == {
        "read": 5,
        "kept": 2,
        "empty": 1,
        "too_long": 1,
        "duplicates": 1,
        "filtered": 0,
        "converted": 0,
        "control_chars": 0,
    }
    assert [r.message for r in caplog.records if r.name == "distillmt.data" and "loaded 2 pairs" in r.message]


def test_tsv_first_two_columns_and_index_columns(tmp_path):
    path = _write(tmp_path / "d.tsv", "Good morning.\t早上好。\r\n\nThanks.\t謝謝。\n\t空\n")
    pairs, stats = load_pairs("tsv", path=path)
    assert pairs == [Pair("Good morning.", "早上好。"), Pair("Thanks.", "谢谢。")]  # t2s applied
    assert (stats.read, stats.empty, stats.converted) == (3, 1, 1)
    pairs, _ = load_pairs("tsv", path=path, simplified=False)
    assert pairs[1].tgt == "謝謝。"

    # Tatoeba-like layout: zh_id, zh, en_id, en; pick columns by index
    path = _write(tmp_path / "t.tsv", "\ufeff1\t我們走吧！\t2\tLet's go!\n3\t你好\t4\tHi\n")
    pairs, _ = load_pairs("tsv", path=path, src_field="3", tgt_field="1")
    assert pairs == [Pair("Let's go!", "我们走吧！"), Pair("Hi", "你好")]
    assert load_pairs("tatoeba", path=path)[0] == pairs


def test_write_read_roundtrip(tmp_path):
    pairs = [Pair("A  b", "甲，乙。"), Pair('quote " and \\', "换行")]
    path = tmp_path / "sub" / "p.jsonl"
    write_pairs(path, pairs)
    assert read_pairs(path) == pairs
    assert json.loads(path.read_text(encoding="utf-8").splitlines()[0]) == {"src": "A  b", "tgt": "甲，乙。"}


# --- bad input ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad_line, what",
    [
        ("{not json", "invalid JSON"),
        ('["en", "zh"]', "expected a JSON object"),
        ('{"en": "x"}', "missing field 'zh'"),
        ('{"en": 3, "zh": "三"}', "field 'en' is int"),
    ],
)
def test_jsonl_malformed_line_names_file_and_line(tmp_path, bad_line, what):
    good = '{"en": "a", "zh": "甲"}'
    path = _write(tmp_path / "bad.jsonl", f"{good}\n{good}\n{bad_line}\n{good}\n")
    with pytest.raises(DistillmtError) as exc:
        load_pairs("jsonl", path=path)
    assert str(exc.value).startswith(f"{path}:3:")
    assert what in str(exc.value)


def test_tsv_malformed_line(tmp_path):
    path = _write(tmp_path / "bad.tsv", "a\t甲\nb\t乙\nonly one column\n")
    with pytest.raises(DistillmtError, match="columns") as exc:
        load_pairs("tsv", path=path)
    assert str(exc.value).startswith(f"{path}:3:")
    with pytest.raises(DistillmtError) as exc:
        load_pairs("tsv", path=path, src_field="3", tgt_field="1")
    assert str(exc.value).startswith(f"{path}:1:")


def test_non_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"en": "a", "zh": "\xe7\x94\xb2"}\n{"en": "caf\xe9", "zh": "x"}\n')
    with pytest.raises(DistillmtError) as exc:
        load_pairs("jsonl", path=str(path))
    assert str(exc.value).startswith(f"{path}:2: not valid UTF-8")


def test_missing_file_unknown_source_and_missing_path(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(DistillmtError, match="nope.jsonl"):
        load_pairs("jsonl", path=missing)
    with pytest.raises(DistillmtError, match="tatoeba, hsk, text, tsv, csv, jsonl, hf"):
        load_pairs("xml", path=missing)
    with pytest.raises(DistillmtError, match="needs a path"):
        load_pairs("tsv")


# --- normalisation -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("ＡＢＣ ｘｙｚ ０１２９", "ABC xyz 0129"),  # full-width letters/digits
        ("我　爱你", "我 爱你"),  # ideographic space
        ("  a \t\n b   c  ", "a b c"),  # runs of whitespace, strip
        ("你好，世界。真的！？", "你好，世界。真的！？"),  # Chinese punctuation kept
        ("（注：１０％）", "（注：10％）"),  # only letters/digits fold, punctuation/symbols stay
        ("zero\u200bwidth\u00ad", "zerowidth"),  # invisible characters dropped
        ("", ""),
    ],
)
def test_normalize(raw, expected):
    assert normalize(raw) == expected


# --- real corpora ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tatoeba():
    return load_pairs("tatoeba")


def test_tatoeba_loads_simplified(tatoeba):
    pairs, stats = tatoeba
    assert tatoeba_path().name == "tatoeba.tsv"
    assert len(pairs) > 40_000
    assert stats.converted > 10_000  # a large Traditional share was converted
    _assert_consistent(stats)
    assert not any("們" in p.tgt or "說" in p.tgt for p in pairs)
    assert len(set(pairs)) == len(pairs)


def test_hsk_loads():
    pairs, stats = load_pairs("hsk")
    assert 4_200 <= len(pairs) <= 4_354
    assert not any(p.src.lower() == "placeholder" for p in pairs)
    assert stats.filtered > 0
    _assert_consistent(stats)


# --- splitting ---------------------------------------------------------------------------------------------------


def _assert_no_leak(splits: dict[str, list[Pair]]) -> None:
    names = list(splits)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not {p.src for p in splits[a]} & {p.src for p in splits[b]}, (a, b)
            assert not {p.tgt for p in splits[a]} & {p.tgt for p in splits[b]}, (a, b)


def _many_to_many_corpus() -> list[Pair]:
    pairs = []
    for g in range(60):  # groups of 1..5 pairs, linked by shared sources and shared targets
        n = g % 5 + 1
        for k in range(n):
            src = f"s{g}-{k // 2}"  # consecutive pairs share a source
            tgt = f"t{g}-{(k + 1) // 2}"  # and overlap-shifted pairs share a target
            pairs.append(Pair(src, tgt))
    return pairs


def test_split_many_to_many_exact_deterministic_no_leak():
    pairs = _many_to_many_corpus()
    a = split_pairs(pairs, train_size=0, valid_size=17, test_size=23, seed=1)
    assert list(a) == ["train", "valid", "test"]
    assert (len(a["valid"]), len(a["test"])) == (17, 23)
    _assert_no_leak(a)
    assert a == split_pairs(pairs, train_size=0, valid_size=17, test_size=23, seed=1)
    assert a != split_pairs(pairs, train_size=0, valid_size=17, test_size=23, seed=2)
    # train_size 0 takes all remaining groups; only the pairs cut from the test/valid boundary groups are lost
    used = sum(map(len, a.values()))
    assert len(pairs) - 8 <= used <= len(pairs)
    assert len(set(p for s in a.values() for p in s)) == used

    b = split_pairs(pairs, train_size=50, valid_size=5, test_size=5, seed=3)
    assert [len(b[k]) for k in ("train", "valid", "test")] == [50, 5, 5]
    _assert_no_leak(b)


def test_split_not_enough_pairs():
    pairs = _many_to_many_corpus()
    with pytest.raises(DistillmtError, match="not enough pairs"):
        split_pairs(pairs, train_size=0, valid_size=len(pairs), test_size=1, seed=0)
    # one giant group: a leak-free valid split is impossible
    chain = [Pair(f"s{i // 2}", f"t{(i + 1) // 2}") for i in range(20)]
    with pytest.raises(DistillmtError, match="leak-free"):
        split_pairs(chain, train_size=0, valid_size=5, test_size=5, seed=0)


def test_split_tatoeba_no_leak(tatoeba):
    pairs, _ = tatoeba
    s = split_pairs(pairs, train_size=20_000, valid_size=200, test_size=300, seed=0)
    assert [len(s[k]) for k in ("train", "valid", "test")] == [20_000, 200, 300]
    _assert_no_leak(s)
    assert s["test"] != split_pairs(pairs, train_size=20_000, valid_size=200, test_size=300, seed=1)["test"]


# --- hugging face, offline -----------------------------------------------------------------------------------------


def test_hf_without_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(DistillmtError, match="'datasets' package is not installed"):
        load_pairs("hf", path="nobody/no-such-dataset-xyz")


def test_hf_load_failure_is_user_error(monkeypatch):
    def load_dataset(name, config=None, split=None):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(DistillmtError) as exc:
        load_pairs("hf", path="nobody/no-such-dataset-xyz")
    msg = str(exc.value)
    assert "could not load Hugging Face dataset 'nobody/no-such-dataset-xyz'" in msg
    assert "ConnectionError" in msg and "offline" in msg and "\n" not in msg


def test_hf_real_package_offline_if_installed():
    pytest.importorskip("datasets")
    with pytest.raises(DistillmtError, match="could not load Hugging Face dataset"):
        load_pairs("hf", path="nobody/no-such-dataset-distillmt-test")


def test_hf_rows_top_level_and_translation_dict(monkeypatch):
    rows = [{"translation": {"en": "Hi.", "zh": "嗨。"}}, {"translation": {"en": "Yes.", "zh": "是。"}}]
    flat = [{"en": "No.", "zh": "不。"}]
    fake = types.SimpleNamespace(load_dataset=lambda name, config=None, split=None: flat if config else rows)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert load_pairs("hf", path="x/y")[0] == [Pair("Hi.", "嗨。"), Pair("Yes.", "是。")]
    assert load_pairs("hf", path="x/y:cfg")[0] == [Pair("No.", "不。")]


def test_unused_sources_share_nothing_with_any_split():
    from distillmt.data import unused_sources

    pairs = [Pair(f"s{i}", f"t{i}") for i in range(60)]
    pairs += [Pair("s1", "t-other"), Pair("s-other", "t2"), Pair("s50", "t50b")]  # groups that span two pairs
    sizes = {"train_size": 20, "valid_size": 5, "test_size": 5}
    splits = split_pairs(pairs, **sizes, seed=3)
    extra = unused_sources(pairs, **sizes, seed=3)
    used_src = {p.src for split in splits.values() for p in split}
    used_tgt = {p.tgt for split in splits.values() for p in split}
    by_src = {p.src: p for p in pairs}
    assert extra and len(extra) == len(set(extra))
    assert not set(extra) & used_src
    assert not {by_src[s].tgt for s in extra} & used_tgt  # no target shared either (the whole group is unused)
    assert extra == unused_sources(pairs, **sizes, seed=3)  # deterministic, like the split
    assert unused_sources(pairs, **{**sizes, "train_size": 0}, seed=3) == []  # train takes everything left
