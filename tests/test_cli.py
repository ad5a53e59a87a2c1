"""Tests for distillmt.cli: in-process calls of main() and one real process per error path (exit code, one-line error,
no traceback)."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import sacrebleu

from distillmt.cli import main

HYPS = ["今天天气很好。", "我喜欢吃苹果。", "他去学校了。", "我们明天见。"]
REFS = ["今天天气很好。", "我喜欢吃香蕉。", "他去学校。", "我们明天见。"]


@pytest.fixture(autouse=True)
def _restore_process_state():
    """main() installs a SIGTERM handler and may configure logging: undo both after each test."""
    handler = signal.getsignal(signal.SIGTERM)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    signal.signal(signal.SIGTERM, handler)
    root.handlers[:] = handlers
    root.setLevel(level)


def _lines(path: Path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def _bad_jsonl(path: Path) -> str:
    """A JSONL corpus whose line 3 is broken."""
    path.write_text(
        '{"en": "Hello.", "zh": "你好。"}\n'
        '{"en": "Goodbye.", "zh": "再见。"}\n'
        '{"en": "Oops", "zh": \n'
        '{"en": "Thanks.", "zh": "谢谢。"}\n',
        encoding="utf-8",
    )
    return str(path)


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("distillmt: error: ")]
    assert len(errors) == 1, err
    assert "Traceback" not in err
    return errors[0]


def _run_process(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **env}
    return subprocess.run(
        [sys.executable, "-m", "distillmt.cli", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )


# --- evaluate --------------------------------------------------------------------------------------------------------


def test_evaluate_plain_files_prints_json_scores(tmp_path, capsys):
    hyp = _lines(tmp_path / "h.txt", HYPS)
    ref = _lines(tmp_path / "r.txt", REFS)
    assert main(["evaluate", "--hyp", hyp, "--ref", ref, "--no-bertscore"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["n"] == 4
    assert scores["bleu"]["score"] == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS], tokenize="zh").score)
    assert scores["chrf"]["score"] == pytest.approx(sacrebleu.corpus_chrf(HYPS, [REFS]).score)
    assert "tok:zh" in scores["bleu"]["signature"]
    assert "bertscore" not in scores


def test_evaluate_jsonl_with_hyp_and_ref_fields(tmp_path, capsys):
    path = tmp_path / "t.jsonl"
    rows = [{"src": "x", "ref": r, "hyp": h} for h, r in zip(HYPS, REFS, strict=True)]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows) + "\n", encoding="utf-8")
    assert main(["evaluate", "--hyp", str(path), "--no-bertscore", "--bleu-tokenize", "13a"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["n"] == 4
    assert scores["bleu"]["score"] == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS], tokenize="13a").score)


def test_evaluate_malformed_jsonl_names_file_and_line(tmp_path, capsys):
    path = tmp_path / "h.jsonl"
    path.write_text('{"hyp": "你好", "ref": "你好"}\n{"hyp": "再见", "ref": \n', encoding="utf-8")
    assert main(["evaluate", "--hyp", str(path), "--no-bertscore"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert _error_line(captured.err).startswith(f"distillmt: error: {path}:2: invalid JSON")


def test_evaluate_malformed_jsonl_in_a_real_process(tmp_path):
    path = tmp_path / "h.jsonl"
    path.write_text('{"hyp": "你好", "ref": "你好"}\n\n{"hyp": 1, "ref": "x"}\n', encoding="utf-8")
    proc = _run_process(["evaluate", "--hyp", str(path), "--no-bertscore"], cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"distillmt: error: {path}:3: needs string fields 'hyp' and 'ref'")


@pytest.mark.parametrize(
    ("hyps", "refs", "pattern"),
    [
        (HYPS, REFS[:3], r"4 hypotheses but 3 references"),
        ([], [], r"nothing to score"),
    ],
)
def test_evaluate_unusable_inputs_exit_2(tmp_path, capsys, hyps, refs, pattern):
    hyp = _lines(tmp_path / "h.txt", hyps)
    ref = _lines(tmp_path / "r.txt", refs)
    assert main(["evaluate", "--hyp", hyp, "--ref", ref, "--no-bertscore"]) == 2
    assert re.search(pattern, _error_line(capsys.readouterr().err))


def test_evaluate_missing_file_exit_2(tmp_path, capsys):
    missing = tmp_path / "nope.txt"
    assert main(["evaluate", "--hyp", str(missing), "--ref", str(missing), "--no-bertscore"]) == 2
    assert _error_line(capsys.readouterr().err) == f"distillmt: error: file not found: {missing}"


def test_evaluate_non_utf8_file_names_it(tmp_path, capsys):
    hyp = tmp_path / "latin1.txt"
    hyp.write_bytes("caf\u00e9\n".encode("latin-1"))
    ref = _lines(tmp_path / "r.txt", ["café"])
    assert main(["evaluate", "--hyp", str(hyp), "--ref", ref, "--no-bertscore"]) == 2
    line = _error_line(capsys.readouterr().err)
    assert str(hyp) in line
    assert "UTF-8" in line


def test_evaluate_unknown_bleu_tokenizer_is_a_usage_error(tmp_path, capsys):
    hyp = _lines(tmp_path / "h.txt", HYPS)
    with pytest.raises(SystemExit) as info:
        main(["evaluate", "--hyp", hyp, "--ref", hyp, "--no-bertscore", "--bleu-tokenize", "chinese"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--bleu-tokenize" in err
    assert "Traceback" not in err


# --- run -------------------------------------------------------------------------------------------------------------


def _run_args(tmp_path: Path, data: str, source: str = "jsonl") -> list[str]:
    return [
        "run",
        f"data.source={source}",
        f"data.path={data}",
        f"output_dir={tmp_path / 'runs'}",
        "name=t",
        "--no-progress",
    ]


def test_run_with_malformed_jsonl_corpus_exit_2(tmp_path, capsys):
    data = _bad_jsonl(tmp_path / "corpus.jsonl")
    assert main(_run_args(tmp_path, data)) == 2
    captured = capsys.readouterr()
    line = _error_line(captured.err)
    assert line.startswith(f"distillmt: error: {data}:3: invalid JSON")
    assert not (tmp_path / "runs" / "t" / "data" / "stage.json").exists()  # the failed stage is not marked done


def test_run_with_malformed_jsonl_corpus_in_a_real_process(tmp_path):
    data = _bad_jsonl(tmp_path / "corpus.jsonl")
    proc = _run_process(_run_args(tmp_path, data), cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    line = _error_line(proc.stderr)
    assert line.startswith(f"distillmt: error: {data}:3: invalid JSON")
    assert proc.stderr.strip().splitlines()[-1] == line  # the error is the last thing printed
    # Everything else on stderr is a log line ("HH:MM:SS L logger: ..."), nothing multi-line.
    others = [x for x in proc.stderr.strip().splitlines() if x != line]
    assert all(" distillmt." in x for x in others), proc.stderr


def test_run_with_non_utf8_corpus_names_the_file(tmp_path, capsys):
    data = tmp_path / "corpus.tsv"
    data.write_bytes(b"Hello.\t\xe4\xbd\xa0\xe5\xa5\xbd\nBad.\t\xff\xfe\n")
    assert main(_run_args(tmp_path, str(data), source="tsv")) == 2
    line = _error_line(capsys.readouterr().err)
    assert line.startswith(f"distillmt: error: {data}:2: not valid UTF-8")


def test_run_with_missing_corpus_exit_2(tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    assert main(_run_args(tmp_path, str(missing))) == 2
    assert str(missing) in _error_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    ("extra", "pattern"),
    [
        (["soft_kd.temprature=2"], "unknown config key 'soft_kd.temprature'"),
        (["soft_kd.alpha=1.5"], "'soft_kd.alpha' = 1.5 is out of range"),
        (["train_student.lr"], "unexpected argument"),  # a second bare word after the config
    ],
)
def test_run_with_bad_config_arguments_exit_2(tmp_path, capsys, extra, pattern):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"output_dir: {tmp_path / 'runs'}\n", encoding="utf-8")
    assert main(["run", str(cfg), *extra]) == 2
    assert pattern in _error_line(capsys.readouterr().err)
    assert not (tmp_path / "runs").exists()  # nothing started


def test_run_with_unknown_override_key_exit_2(tmp_path, capsys):
    assert main(["run", "sead=1", f"output_dir={tmp_path / 'runs'}"]) == 2
    assert "unknown config key 'sead'" in _error_line(capsys.readouterr().err)


def test_run_with_missing_config_file_exit_2(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in _error_line(capsys.readouterr().err)


# --- help, config, models --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "purpose"),
    [
        ("run", "Run every stage of an experiment"),
        ("train", "one training stage"),
        ("translate", "JSONL with src, ref, hyp"),
        ("evaluate", "--hyp alone"),
        ("models", "Import models shipped as PyPI packages"),
        ("config", "every config key"),
    ],
)
def test_subcommand_help_exits_0_and_states_its_purpose(capsys, command, purpose):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert f"usage: distillmt {command}" in out
    assert purpose in out


def test_top_level_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("run", "train", "translate", "evaluate", "models", "config"):
        assert command in out


def test_no_subcommand_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2


def test_config_lists_keys_with_defaults_and_ranges(capsys):
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert any(line.startswith("soft_kd.temperature = 2.0 [0.05, 100.0]") for line in lines)
    assert any(line.startswith("train_student.lr = 0.001 [0.0, 10.0]") for line in lines)
    assert any(line.startswith("soft_kd.divergence = 'forward_kl' [forward_kl|") for line in lines)
    assert any(line.startswith("teacher.lora.r = 16") for line in lines)


def test_models_list_shows_known_models_and_store(tmp_path, capsys, monkeypatch):
    from distillmt import store

    monkeypatch.setenv("DISTILLMT_HOME", str(tmp_path / "home"))
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    for name in store.known_models():
        assert any(line.startswith(name) and "not imported" in line for line in out.splitlines()), name
    assert out.strip().splitlines()[-1] == f"store: {tmp_path / 'home'}"


def test_models_import_without_name_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DISTILLMT_HOME", str(tmp_path / "home"))
    assert main(["models", "import"]) == 2
    assert "needs a NAME" in _error_line(capsys.readouterr().err)
