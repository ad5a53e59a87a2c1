"""Your own data for any language pair: parallel text files, TSV/CSV with a header, JSONL keyed by language code,
Hugging Face datasets from disk, Tatoeba read either way round, and validation/test sets given as files (used whole,
with the training pairs that overlap them removed and counted)."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from distillmt.config import load_config
from distillmt.data import Pair, build_splits, load_pairs, overlap_key, read_pairs
from distillmt.errors import DistillmtError
from distillmt.pipeline import Experiment, data_settings, preflight

pytestmark = pytest.mark.unit

WORDS = ["Haus", "Baum", "Katze", "Hund", "Auto", "Buch", "Tisch", "Stuhl", "Fenster", "Garten"]
ENGLISH = ["house", "tree", "cat", "dog", "car", "book", "table", "chair", "window", "garden"]


def _write(path, text: str) -> str:
    path.write_bytes(text.encode("utf-8"))
    return str(path)


def _lines(path, lines: list[str]) -> str:
    return _write(path, "".join(line + "\n" for line in lines))


def _en_de_corpus(tmp_path) -> dict[str, str]:
    """40 distinct en→de pairs, 3 of which overlap the given test set (exactly or after normalisation)."""
    en = [f"I see the {e} number {i}." for i, e in enumerate(ENGLISH * 4)]
    de = [f"Ich sehe {w} Nummer {i}." for i, w in enumerate(WORDS * 4)]
    test_en = ["Where is the station?", "The weather is nice.", "Hello, world!"]
    test_de = ["Wo ist der Bahnhof?", "Das Wetter ist schön.", "Hallo Welt!"]
    en += ["Where is the station?", "the WEATHER is nice", "Hi there."]  # same source; same after casefold/punctuation
    de += ["Wo ist bitte der Bahnhof?", "Schönes Wetter.", "hallo, welt"]  # ...; ...; same target after normalisation
    return {
        "path": _lines(tmp_path / "corpus.en", en),
        "tgt_path": _lines(tmp_path / "corpus.de", de),
        "test_path": _lines(tmp_path / "test.en", test_en),
        "test_tgt_path": _lines(tmp_path / "test.de", test_de),
    }


def _config(tmp_path, files: dict[str, str], *extra: str):
    overrides = [f"data.{k}={v}" for k, v in files.items()]
    base = ["data.source=text", "data.src_lang=en", "data.tgt_lang=de", "data.valid_size=5", "data.train_size=0"]
    return load_config(None, [*base, *overrides, *extra, f"output_dir={tmp_path / 'runs'}", "name=mine"])


# --- parallel plain text, a given test set, overlap --------------------------------------------------------------------


def test_text_files_with_a_given_test_set_use_it_whole_and_drop_what_overlaps_it(tmp_path):
    files = _en_de_corpus(tmp_path)
    cfg = _config(tmp_path, files)
    assert (cfg.data.src_field, cfg.data.tgt_field, cfg.data.simplified) == ("en", "de", False)  # no Chinese side
    preflight(cfg)  # every named file is there

    result = Experiment(cfg, progress=False).stage_data()
    folder = tmp_path / "runs" / "mine" / "data"
    test = read_pairs(folder / "test.jsonl")
    assert test == [
        Pair("Where is the station?", "Wo ist der Bahnhof?"),
        Pair("The weather is nice.", "Das Wetter ist schön."),
        Pair("Hello, world!", "Hallo Welt!"),
    ]  # exactly the given file, in its order, never cut
    train, valid = read_pairs(folder / "train.jsonl"), read_pairs(folder / "valid.jsonl")
    assert len(valid) == 5 and len(train) == 35  # valid cut from the 40 - 3 overlapping corpus pairs
    assert result["overlap_removed"] == {"pairs": 3, "test": {"source": 2, "target": 1}}
    assert result["sizes"] == {"train": 35, "valid": 5, "test": 3}
    assert result["given"]["test"]["path"] == files["test_path"]
    test_keys = {overlap_key(t) for p in test for t in (p.src, p.tgt)}
    assert not any(overlap_key(t) in test_keys for p in train + valid for t in (p.src, p.tgt))


def test_given_files_key_the_data_stage_by_content_and_only_when_set(tmp_path):
    files = _en_de_corpus(tmp_path)
    settings = data_settings(_config(tmp_path, files).data, seed=0)
    assert settings["test_path"]["path"] == files["test_path"] and len(settings["test_path"]["sha256"]) == 64
    assert "valid_path" not in settings and "file_sha256" in settings and "tgt_path" in settings
    _lines(tmp_path / "test.de", ["Wo ist der Bahnhof?", "Das Wetter ist schön.", "Hallo, Welt!"])
    assert data_settings(_config(tmp_path, files).data, seed=0) != settings  # edited file, same name: new key

    default = data_settings(load_config(None).data, seed=0)
    assert not {"tgt_path", "valid_path", "test_path", "valid_tgt_path", "test_tgt_path", "languages"} & set(default)
    d = asdict(load_config(None).data)  # what config.json shows: the values 0.2 had
    assert (d["src_field"], d["tgt_field"], d["simplified"]) == ("en", "zh", True)


def test_both_sets_given_nothing_is_cut_for_them(tmp_path):
    files = _en_de_corpus(tmp_path)
    files["valid_path"] = _lines(tmp_path / "valid.en", ["I see the cat number 2.", "Good night."])
    files["valid_tgt_path"] = _lines(tmp_path / "valid.de", ["Ich sehe Katze Nummer 2.", "Gute Nacht."])
    splits, result = build_splits(_config(tmp_path, files).data, seed=0)
    assert [len(splits[k]) for k in ("train", "valid", "test")] == [
        39,
        2,
        3,
    ]  # 43 - 4 overlapping; nothing cut for valid or test
    assert result["overlap_removed"]["valid"] == {"source": 1, "target": 1}  # one pair, matched on both sides
    assert result["overlap_removed"]["pairs"] == 4


def test_text_files_of_different_lengths_are_an_error_naming_both(tmp_path):
    src = _lines(tmp_path / "a.en", ["One.", "Two.", "Three."])
    tgt = _lines(tmp_path / "a.de", ["Eins.", "Zwei."])
    with pytest.raises(DistillmtError) as exc:
        load_pairs("text", path=src, tgt_path=tgt, src_lang="en", tgt_lang="de")
    assert str(exc.value).startswith(f"{src} has 3 lines but {tgt} has 2 ({src}:3 has no partner)")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.source=text", "data.path={p}"], "data.source=text needs data.tgt_path"),
        (["data.source=jsonl", "data.path={p}", "data.test_path={p}.missing"], "config key 'data.test_path': file "),
        (["data.source=text", "data.path={p}", "data.tgt_path={p}.de"], "config key 'data.tgt_path': file not found"),
    ],
)
def test_preflight_names_the_key_of_a_missing_file(tmp_path, overrides, message):
    path = _write(tmp_path / "c.jsonl", '{"en": "Hi.", "zh": "嗨。"}\n')
    cfg = load_config(None, [o.format(p=path) for o in overrides])
    with pytest.raises(DistillmtError, match=message):
        preflight(cfg)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.source=jsonl", "data.tgt_path=x"], "'data.tgt_path' is for data.source=text"),
        (["data.source=text", "data.test_tgt_path=x"], "'data.test_tgt_path' is set but data.test_path"),
        (["data.source=text", "data.valid_path=x"], "'data.valid_path' needs data.valid_tgt_path"),
        (["data.src_lang=en", "data.tgt_lang=de"], "data.source=tatoeba holds English–Chinese pairs.*data.src_lang"),
        (["data.source=hsk", "data.test_path=x"], "'data.test_path': source=hsk"),
        (["data.source=jsonl", "data.tgt_field=en"], "data.src_field and data.tgt_field are both 'en'"),
    ],
)
def test_data_keys_that_disagree_are_config_errors(overrides, message):
    with pytest.raises(DistillmtError, match=message):
        load_config(None, overrides)


@pytest.mark.parametrize(
    "a, b, same",
    [
        ("Hello, world!", "hello world", True),
        ("你好，世界。", "你好世界", True),
        ("Hallo  Welt", "HALLO WELT!", True),
        ("Hello.", "Help.", False),
        ("...", "!!!", False),  # all punctuation: its own key, never the empty string
    ],
)
def test_overlap_key(a, b, same):
    assert (overlap_key(a) == overlap_key(b)) == same


# --- TSV and CSV ---------------------------------------------------------------------------------------------------


def test_tsv_header_naming_the_languages_is_a_header_not_a_pair(tmp_path):
    path = _write(tmp_path / "h.tsv", "English\tGerman\nGood morning.\tGuten Morgen.\n")
    pairs, stats = load_pairs("tsv", path=path, src_lang="en", tgt_lang="de")
    assert pairs == [Pair("Good morning.", "Guten Morgen.")] and stats.read == 1
    path = _write(tmp_path / "c.tsv", "DE\tEN\nGuten Morgen.\tGood morning.\n")  # codes in any case, any order
    assert load_pairs("tsv", path=path, src_lang="en", tgt_lang="de")[0] == [Pair("Good morning.", "Guten Morgen.")]
    path = _write(tmp_path / "n.tsv", "Good morning.\tGuten Morgen.\nThanks.\tDanke.\n")  # no header: by position
    assert len(load_pairs("tsv", path=path, src_lang="en", tgt_lang="de")[0]) == 2


def test_csv_quoting_and_named_columns(tmp_path):
    text = 'id,source,target\n1,"Yes, of course.","Ja, natürlich."\n2,"He said ""hi"".",Er sagte „hi“.\n'
    text += '3,"Two\nlines.",Zwei Zeilen.\n'
    path = _write(tmp_path / "q.csv", text)
    pairs, stats = load_pairs("csv", path=path, src_field="source", tgt_field="target", src_lang="en", tgt_lang="de")
    assert pairs == [
        Pair("Yes, of course.", "Ja, natürlich."),
        Pair('He said "hi".', "Er sagte „hi“."),
        Pair("Two lines.", "Zwei Zeilen."),
    ]
    assert stats.read == 3  # the header is no pair
    with pytest.raises(DistillmtError) as exc:
        load_pairs("csv", path=path, src_field="english", tgt_field="target")
    assert str(exc.value).startswith(f"{path}:1: no column named 'english' in the header (columns: 'id', 'source',")
    bad = _write(tmp_path / "bad.csv", "a,b\nc\n")
    with pytest.raises(DistillmtError, match=f"^{bad}:2: expected at least 2 comma-separated columns, got 1"):
        load_pairs("csv", path=bad, src_field="0", tgt_field="1")


# --- JSONL keyed by language code, Chinese on either side -------------------------------------------------------------


def test_jsonl_zh_to_en_reads_the_language_keys_and_simplifies_the_source(tmp_path):
    rows = [{"zh": "我們走吧！", "en": "Let's go!"}, {"zh": "謝謝。", "en": "Thank you, 謝謝."}]
    path = _write(tmp_path / "z.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    cfg = load_config(None, ["data.source=jsonl", f"data.path={path}", "data.src_lang=zh", "data.tgt_lang=en"])
    assert (cfg.data.src_field, cfg.data.tgt_field, cfg.data.simplified) == ("zh", "en", True)
    pairs, stats = load_pairs("jsonl", path=path, src_lang="zh", tgt_lang="en")  # fields: the language codes
    assert pairs == [Pair("我们走吧！", "Let's go!"), Pair("谢谢。", "Thank you, 謝謝.")]  # the English side untouched
    assert stats.converted == 2
    hant = load_config(None, ["data.source=jsonl", f"data.path={path}", "data.src_lang=zh-Hant", "data.tgt_lang=en"])
    assert hant.data.simplified is False  # Traditional asked for: not converted


# --- Tatoeba the other way round -------------------------------------------------------------------------------------


def test_tatoeba_zh_to_en_is_the_en_to_zh_corpus_swapped():
    en_zh, _ = load_pairs("tatoeba")
    zh_en, stats = load_pairs("tatoeba", src_lang="zh", tgt_lang="en")
    assert len(zh_en) == len(en_zh) > 50_000 and stats.converted > 10_000
    assert set(zh_en) == {Pair(p.tgt, p.src) for p in en_zh}  # the Chinese source in Simplified, as the target was
    cfg = load_config(None, ["data.src_lang=zh", "data.tgt_lang=en"])
    assert data_settings(cfg.data, 0)["languages"] == ["zh", "en"]
    with pytest.raises(DistillmtError, match="data.src_lang='en' and data.tgt_lang='de'"):
        load_pairs("tatoeba", src_lang="en", tgt_lang="de")


# --- Hugging Face datasets on disk -----------------------------------------------------------------------------------


@pytest.fixture
def datasets(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    return datasets


def test_hf_from_a_save_to_disk_folder_and_a_parquet_file(tmp_path, datasets):
    rows = {"translation": [{"en": "Hello.", "de": "Hallo."}, {"en": "Thanks.", "de": "Danke."}]}
    dd = datasets.DatasetDict(
        train=datasets.Dataset.from_dict(rows),
        test=datasets.Dataset.from_dict({"translation": rows["translation"][:1]}),
    )
    dd.save_to_disk(str(tmp_path / "saved"))
    pairs, _ = load_pairs("hf", path=str(tmp_path / "saved"), src_lang="en", tgt_lang="de")
    assert pairs == [Pair("Hello.", "Hallo."), Pair("Thanks.", "Danke.")]
    pairs, _ = load_pairs("hf", path=str(tmp_path / "saved"), hf_split="test", src_lang="en", tgt_lang="de")
    assert pairs == [Pair("Hello.", "Hallo.")]
    with pytest.raises(DistillmtError, match="no split 'dev' \\(splits: train, test\\)"):
        load_pairs("hf", path=str(tmp_path / "saved"), hf_split="dev", src_lang="en", tgt_lang="de")

    flat = datasets.Dataset.from_dict({"source": ["Good night."], "target": ["Gute Nacht."]})
    flat.to_parquet(str(tmp_path / "flat.parquet"))
    pairs, _ = load_pairs("hf", path=str(tmp_path / "flat.parquet"), src_field="source", tgt_field="target")
    assert pairs == [Pair("Good night.", "Gute Nacht.")]
    with pytest.raises(DistillmtError, match="file not found"):
        load_pairs("hf", path=str(tmp_path / "nope.parquet"))


def test_hf_hub_unreachable_suggests_saving_to_disk(datasets):
    with pytest.raises(DistillmtError, match="hub unreachable.*save_to_disk"):
        load_pairs("hf", path="nobody/no-such-dataset-distillmt-test")
