"""A language pair other than English→Chinese, end to end: a synthetic English→German corpus given as two plain-text
files and a separate test set, through the micro pipeline."""

from __future__ import annotations

import json
import random

import pytest
from conftest import MICRO

from distillmt.config import load_config
from distillmt.io import read_jsonl
from distillmt.pipeline import run_experiment

SUBJECTS = [
    ("the cat", "die Katze"),
    ("the dog", "der Hund"),
    ("the child", "das Kind"),
    ("my friend", "mein Freund"),
    ("the teacher", "der Lehrer"),
    ("the woman", "die Frau"),
    ("the man", "der Mann"),
    ("the bird", "der Vogel"),
]
VERBS = [
    ("sleeps", "schläft"),
    ("eats", "isst"),
    ("sings", "singt"),
    ("reads", "liest"),
    ("waits", "wartet"),
    ("laughs", "lacht"),
    ("runs", "läuft"),
    ("works", "arbeitet"),
]
WHEN = [("", ""), (" today", " heute"), (" at home", " zu Hause"), (" now", " jetzt")]  # fmt: skip


def _pairs() -> list[tuple[str, str]]:
    pairs = [
        (f"{se[0].upper()}{se[1:]} {ve}{we}.", f"{sd[0].upper()}{sd[1:]} {vd}{wd}.")
        for se, sd in SUBJECTS
        for ve, vd in VERBS
        for we, wd in WHEN
    ]
    random.Random(0).shuffle(pairs)
    return pairs


def _write(folder, name: str, pairs: list[tuple[str, str]]) -> tuple[str, str]:
    src, tgt = folder / f"{name}.en", folder / f"{name}.de"
    src.write_text("".join(f"{s}\n" for s, _ in pairs), encoding="utf-8")
    tgt.write_text("".join(f"{t}\n" for _, t in pairs), encoding="utf-8")
    return str(src), str(tgt)


@pytest.mark.parametrize("systems", ["[TEACHER,STUDENT,HLKD]"])
def test_english_to_german_from_plain_text_files(tmp_path, systems):
    pairs = _pairs()
    test, corpus = pairs[:8], pairs[8:]
    corpus = corpus + [test[0], (test[1][0], "Eine andere Übersetzung.")]  # overlap the test set: must be removed
    train_src, train_tgt = _write(tmp_path, "train", corpus)
    test_src, test_tgt = _write(tmp_path, "test", test)
    cfg = load_config(
        None,
        [
            *MICRO,
            f"output_dir={tmp_path}",
            "name=ende",
            f"systems={systems}",
            "data.src_lang=en",
            "data.tgt_lang=de",
            "data.source=text",
            f"data.path={train_src}",
            f"data.tgt_path={train_tgt}",
            f"data.test_path={test_src}",
            f"data.test_tgt_path={test_tgt}",
        ],
    )
    assert cfg.eval.bleu_tokenize == "13a" and cfg.data.simplified is False
    report = run_experiment(cfg, progress=False)
    run = tmp_path / "ende"

    assert [(r["src"], r["tgt"]) for r in read_jsonl(run / "data" / "test.jsonl")] == test  # the given set, whole
    train = read_jsonl(run / "data" / "train.jsonl")
    assert not {r["src"] for r in train} & {s for s, _ in test}  # the overlapping pairs are gone
    for name in ("TEACHER", "STUDENT", "HLKD"):
        record = json.loads((run / f"translate_{name}" / "stage.json").read_text(encoding="utf-8"))
        assert record["settings"]["prompt"]["plain"] == "English: {text}\nGerman:\n"
        bleu = report["systems"][name]["scores"]["bleu"]
        assert "tok:13a" in bleu["signature"]
    labels = json.loads((run / "teacher_labels" / "stage.json").read_text(encoding="utf-8"))
    assert labels["settings"]["prompt"]["chat"].startswith("Translate the following English text into German.")
