"""Tests for distillmt.cli: in-process calls of main() and one real process per error path (exit code, one-line error,
no traceback)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import sacrebleu

from distillmt.cli import main

HYPS = ["今天天气很好。", "我喜欢吃苹果。", "他去学校了。", "我们明天见。"]
REFS = ["今天天气很好。", "我喜欢吃香蕉。", "他去学校。", "我们明天见。"]


pytestmark = pytest.mark.usefixtures("restore_process_state")


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


@pytest.mark.unit
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


@pytest.mark.unit
def test_evaluate_jsonl_with_hyp_and_ref_fields(tmp_path, capsys):
    path = tmp_path / "t.jsonl"
    rows = [{"src": "x", "ref": r, "hyp": h} for h, r in zip(HYPS, REFS, strict=True)]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows) + "\n", encoding="utf-8")
    assert main(["evaluate", "--hyp", str(path), "--no-bertscore", "--bleu-tokenize", "13a"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["n"] == 4
    assert scores["bleu"]["score"] == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS], tokenize="13a").score)


@pytest.mark.unit
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


@pytest.mark.unit
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


@pytest.mark.unit
def test_evaluate_missing_file_exit_2(tmp_path, capsys):
    missing = tmp_path / "nope.txt"
    assert main(["evaluate", "--hyp", str(missing), "--ref", str(missing), "--no-bertscore"]) == 2
    assert _error_line(capsys.readouterr().err) == f"distillmt: error: file not found: {missing}"


@pytest.mark.unit
def test_evaluate_non_utf8_file_names_it(tmp_path, capsys):
    hyp = tmp_path / "latin1.txt"
    hyp.write_bytes("caf\u00e9\n".encode("latin-1"))
    ref = _lines(tmp_path / "r.txt", ["café"])
    assert main(["evaluate", "--hyp", str(hyp), "--ref", ref, "--no-bertscore"]) == 2
    line = _error_line(capsys.readouterr().err)
    assert str(hyp) in line
    assert "UTF-8" in line


@pytest.mark.unit
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


@pytest.mark.unit
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


@pytest.mark.unit
def test_run_with_non_utf8_corpus_names_the_file(tmp_path, capsys):
    data = tmp_path / "corpus.tsv"
    data.write_bytes(b"Hello.\t\xe4\xbd\xa0\xe5\xa5\xbd\nBad.\t\xff\xfe\n")
    assert main(_run_args(tmp_path, str(data), source="tsv")) == 2
    line = _error_line(capsys.readouterr().err)
    assert line.startswith(f"distillmt: error: {data}:2: not valid UTF-8")


@pytest.mark.unit
def test_run_with_missing_corpus_exit_2(tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    assert main(_run_args(tmp_path, str(missing))) == 2
    assert str(missing) in _error_line(capsys.readouterr().err)


@pytest.mark.unit
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


@pytest.mark.unit
def test_overrides_may_follow_an_option(tmp_path, capsys):
    """`run CONFIG --no-progress key=value`: the override after the option is read as one (argparse alone would stop
    the positional list at the option and refuse the rest)."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"output_dir: {tmp_path / 'runs'}\n", encoding="utf-8")
    assert main(["run", str(cfg), "--no-progress", "soft_kd.alpha=1.5"]) == 2
    assert "'soft_kd.alpha' = 1.5 is out of range" in _error_line(capsys.readouterr().err)
    assert main(["sweep", str(cfg), "--no-progress", "seed=1"]) == 2  # a sweep's overrides too: the file is no sweep
    assert "unrecognized arguments" not in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", str(cfg), "--no-progress", "--no-such-option"])
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err


@pytest.mark.unit
def test_run_with_unknown_override_key_exit_2(tmp_path, capsys):
    assert main(["run", "sead=1", f"output_dir={tmp_path / 'runs'}"]) == 2
    assert "unknown config key 'sead'" in _error_line(capsys.readouterr().err)


@pytest.mark.unit
def test_run_with_missing_config_file_exit_2(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in _error_line(capsys.readouterr().err)


# --- help, config, models --------------------------------------------------------------------------------------------


@pytest.mark.unit
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


@pytest.mark.unit
def test_top_level_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("run", "train", "translate", "evaluate", "models", "config"):
        assert command in out


@pytest.mark.unit
def test_no_subcommand_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2


@pytest.mark.unit
def test_config_lists_keys_with_defaults_and_ranges(capsys):
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert any(line.startswith("soft_kd.temperature = 2.0 [0.05, 100.0]") for line in lines)
    assert any(line.startswith("train_student.lr = 0.001 [0.0, 10.0]") for line in lines)
    assert any(line.startswith("soft_kd.divergence = 'forward_kl' [forward_kl|") for line in lines)
    assert any(line.startswith("teacher.lora.r = 16") for line in lines)


@pytest.mark.unit
def test_models_list_shows_known_models_and_store(tmp_path, capsys, monkeypatch):
    from distillmt import store

    monkeypatch.setenv("DISTILLMT_HOME", str(tmp_path / "home"))
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    for name in store.known_models():
        assert any(line.startswith(name) and "not imported" in line for line in out.splitlines()), name
    assert out.strip().splitlines()[-1] == f"store: {tmp_path / 'home'}"


@pytest.mark.unit
def test_models_import_without_name_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DISTILLMT_HOME", str(tmp_path / "home"))
    assert main(["models", "import"]) == 2
    assert "needs a NAME" in _error_line(capsys.readouterr().err)


# --- evaluate: files read by their format -----------------------------------------------------------------------------


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _scores(capsys) -> tuple[float, float]:
    scores = json.loads(capsys.readouterr().out)
    return scores["bleu"]["score"], scores["chrf"]["score"]


PLAIN_SCORES = (
    sacrebleu.corpus_bleu(HYPS, [REFS], tokenize="zh").score,
    sacrebleu.corpus_chrf(HYPS, [REFS]).score,
)


@pytest.mark.unit
@pytest.mark.parametrize(
    "hyp_rows",
    [
        [{"src": "x", "ref": r, "hyp": h} for h, r in zip(HYPS, REFS, strict=True)],  # same refs as --ref
        [{"src": "x", "ref": None, "hyp": h} for h in HYPS],  # what translate writes for plain-text sources
        [{"src": "x", "hyp": h} for h in HYPS],
    ],
    ids=["matching-ref-fields", "null-ref-fields", "no-ref-fields"],
)
@pytest.mark.parametrize("hyp_name", ["out.jsonl", "out.txt"])  # .txt: JSON lines recognised by content
@pytest.mark.parametrize("ref_format", ["text", "jsonl"])
def test_evaluate_jsonl_hyp_with_ref_file_scores_the_hyp_field(tmp_path, capsys, hyp_rows, hyp_name, ref_format):
    """The JSON line itself (which holds the reference) must never be scored as the hypothesis."""
    hyp = _jsonl(tmp_path / hyp_name, hyp_rows)
    if ref_format == "text":
        ref = _lines(tmp_path / "ref.txt", REFS)
    else:
        ref = _jsonl(tmp_path / "ref.jsonl", [{"src": "x", "ref": r} for r in REFS])
    assert main(["evaluate", "--hyp", hyp, "--ref", ref, "--no-bertscore"]) == 0
    assert _scores(capsys) == pytest.approx(PLAIN_SCORES, abs=1e-9)
    # ... which are exactly the plain-text pair's scores
    plain_hyp, plain_ref = _lines(tmp_path / "h.txt", HYPS), _lines(tmp_path / "r.txt", REFS)
    assert main(["evaluate", "--hyp", plain_hyp, "--ref", plain_ref, "--no-bertscore"]) == 0
    assert _scores(capsys) == pytest.approx(PLAIN_SCORES, abs=1e-9)


@pytest.mark.unit
def test_evaluate_plain_hyp_with_jsonl_ref(tmp_path, capsys):
    hyp = _lines(tmp_path / "h.txt", HYPS)
    ref = _jsonl(tmp_path / "data.jsonl", [{"src": "x", "ref": r, "hyp": "ignored"} for r in REFS])
    assert main(["evaluate", "--hyp", hyp, "--ref", ref, "--no-bertscore"]) == 0
    assert _scores(capsys) == pytest.approx(PLAIN_SCORES, abs=1e-9)


@pytest.mark.unit
def test_evaluate_refuses_jsonl_refs_that_disagree_with_ref_file(tmp_path, capsys):
    hyp = _jsonl(tmp_path / "out.jsonl", [{"ref": r, "hyp": h} for h, r in zip(HYPS, REFS, strict=True)])
    other = [*REFS[:2], "完全不同的句子。", REFS[3]]
    ref = _lines(tmp_path / "other.txt", other)
    assert main(["evaluate", "--hyp", hyp, "--ref", ref, "--no-bertscore"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    line = _error_line(captured.err)
    assert line.startswith(f"distillmt: error: {hyp}:3: its 'ref' field")
    assert f"{ref}:3" in line
    assert "1 of 4 rows differ" in line


@pytest.mark.unit
@pytest.mark.parametrize("hyp_format", ["text", "jsonl"])
def test_evaluate_count_mismatch_names_both_files_and_counts(tmp_path, capsys, hyp_format):
    if hyp_format == "text":
        hyp = _lines(tmp_path / "h.txt", HYPS)
    else:
        hyp = _jsonl(tmp_path / "h.jsonl", [{"hyp": h} for h in HYPS])
    ref = _lines(tmp_path / "r.txt", REFS[:3])
    assert main(["evaluate", "--hyp", hyp, "--ref", ref, "--no-bertscore"]) == 2
    line = _error_line(capsys.readouterr().err)
    assert "4 hypotheses but 3 references" in line
    assert f"--hyp {hyp} has 4" in line
    assert f"--ref {ref} has 3" in line


@pytest.mark.unit
@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        ("今天天气很好。\n", r"is plain text .*--ref FILE"),  # plain text hyp needs --ref
        ('{"hyp": "a", "ref": "b"}\nnot json\n', r":2: invalid JSON"),  # JSON lines by content: no fallback
        ('{"hyp": "a", "ref": "b"}\n[1, 2]\n', r":2: a JSON lines file needs one JSON object per line"),
    ],
)
def test_evaluate_hyp_alone_must_be_jsonl_with_refs(tmp_path, capsys, content, pattern):
    hyp = tmp_path / "h.txt"
    hyp.write_text(content, encoding="utf-8")
    assert main(["evaluate", "--hyp", str(hyp), "--no-bertscore"]) == 2
    assert re.search(pattern, _error_line(capsys.readouterr().err))


# --- checks before any work: one line, exit 2, no traceback -----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    """A 1-layer Qwen2 model with a BPE tokenizer, saved as a local folder (no download)."""
    from distillmt.models import build_scratch_model, train_bpe_tokenizer

    folder = tmp_path_factory.mktemp("tiny") / "model"
    tok = train_bpe_tokenizer(["hello world", "good morning", "你好世界", "早上好"] * 10, 300, folder)
    model = build_scratch_model(
        tok, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32, max_positions=128
    )
    model.save_pretrained(folder)
    return str(folder)


def _exit_code(argv: list[str]) -> int:
    """main()'s status; argparse's usage errors leave through SystemExit."""
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code)


def _mistake(case: str, tmp: Path, model: str) -> tuple[list[str], str]:
    """Arguments with exactly one mistake, and a pattern the error line must match."""
    src = _lines(tmp / "src.txt", ["Hello.", "Good morning."])
    folder = tmp / "folder"
    folder.mkdir(exist_ok=True)
    tr = ["translate", "--model", model, "--no-progress", "--max-new-tokens", "2"]
    runs = [f"output_dir={tmp / 'runs'}", "--no-progress"]
    if case == "non-utf8-config":
        (tmp / "c.yaml").write_bytes("name: caf\u00e9\n".encode("latin-1"))
    return {
        "device-cuda": ([*tr, "-i", src, "--device", "cuda"], r"--device: device 'cuda' is not available"),
        "device-cuda-99": ([*tr, "-i", src, "--device", "cuda:99"], r"device 'cuda:99' is not available"),
        "device-garbage": ([*tr, "-i", src, "--device", "gpu0"], r"device 'gpu0' is not a device name"),
        "run-device-tpu": (["run", "device=tpu", *runs], r"config key 'device': device 'tpu' is not a device"),
        "missing-input": (
            [*tr, "-i", str(tmp / "nope.txt")],
            rf"--input {re.escape(str(tmp))}/nope.txt: file not found",
        ),
        "input-is-folder": ([*tr, "-i", str(folder)], r"--input .*/folder is a folder, not a file"),
        "num-beams-0": ([*tr, "-i", src, "--num-beams", "0"], r"argument --num-beams: 0 is out of range"),
        "batch-size-0": ([*tr, "-i", src, "--batch-size", "0"], r"argument --batch-size: 0 is out of range"),
        "max-new-tokens-0": ([*tr, "-i", src, "--max-new-tokens", "0"], r"argument --max-new-tokens: 0 is out"),
        "top-k-negative": ([*tr, "-i", src, "--top-k", "-1"], r"argument --top-k: -1 is out of range"),
        "top-p-0": ([*tr, "-i", src, "--top-p", "0"], r"argument --top-p: 0 is out of range; allowed: \(0.0, 1.0\]"),
        "top-p-1.5": ([*tr, "-i", src, "--top-p", "1.5"], r"argument --top-p: 1.5 is out of range"),
        "temperature-0": ([*tr, "-i", src, "--temperature", "0"], r"argument --temperature: 0 is out of range"),
        "temperature-nan": ([*tr, "-i", src, "--temperature", "nan"], r"argument --temperature: nan is out of"),
        "batch-size-text": ([*tr, "-i", src, "--batch-size", "many"], r"'many' is not an integer"),
        "adapter-not-lora": ([*tr, "-i", src, "--adapter", str(folder)], r"--adapter .* not a LoRA adapter folder"),
        "adapter-missing": ([*tr, "-i", src, "--adapter", str(tmp / "nope")], r"--adapter .*nope: folder not found"),
        "output-folder-missing": ([*tr, "-i", src, "-o", str(tmp / "no" / "o.jsonl")], r"folder .*/no does not exist"),
        "output-is-folder": ([*tr, "-i", src, "-o", str(folder)], r"--output .*/folder is a folder; give a file name"),
        "output-under-file": ([*tr, "-i", src, "-o", f"{src}/o.jsonl"], r"src.txt is not a folder"),
        "hyp-is-folder": (["evaluate", "--hyp", str(folder), "--ref", src], r"--hyp .*/folder is a folder"),
        "ref-is-folder": (["evaluate", "--hyp", src, "--ref", str(folder)], r"--ref .*/folder is a folder"),
        "config-is-folder": (["run", str(folder), *runs], r"config file .*/folder is a folder"),
        "non-utf8-config": (["run", str(tmp / "c.yaml"), *runs], r"config file .*c.yaml: not valid UTF-8"),
        "name-dotdot": (["run", "name=..", *runs], r"config key 'name' = '..' is not allowed"),
        "name-slash": (["run", "name=a/b", *runs], r"config key 'name' = 'a/b' is not allowed"),
        "output-dir-is-file": (["run", f"output_dir={src}", "--no-progress"], r"src.txt exists and is a file"),
    }[case]


IN_PROCESS_MISTAKES = [
    "device-cuda-99",
    "device-garbage",
    "run-device-tpu",
    "missing-input",
    "input-is-folder",
    "num-beams-0",
    "batch-size-0",
    "max-new-tokens-0",
    "top-k-negative",
    "top-p-0",
    "top-p-1.5",
    "temperature-0",
    "temperature-nan",
    "batch-size-text",
    "adapter-not-lora",
    "adapter-missing",
    "output-folder-missing",
    "output-is-folder",
    "output-under-file",
    "hyp-is-folder",
    "ref-is-folder",
    "config-is-folder",
    "non-utf8-config",
    "name-dotdot",
    "name-slash",
    "output-dir-is-file",
]


@pytest.mark.unit
@pytest.mark.parametrize("case", IN_PROCESS_MISTAKES)
def test_mistakes_are_refused_in_one_line_before_any_work(tmp_path, capsys, monkeypatch, tiny_model, case):
    from distillmt import models

    def never(*args, **kwargs):
        raise AssertionError("a model was loaded despite the mistake")

    monkeypatch.setattr(models, "load_model", never)
    monkeypatch.setattr(models, "load_tokenizer", never)
    argv, pattern = _mistake(case, tmp_path, tiny_model)
    assert _exit_code(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    line = _error_line(captured.err)
    assert re.search(pattern, line), line
    assert not (tmp_path / "runs").exists()  # no run folder started


# Fewer cases in real processes (each start costs seconds): the main kinds of mistake, end to end.
PROCESS_MISTAKES = [
    "device-cuda",
    "run-device-tpu",
    "missing-input",
    "num-beams-0",
    "batch-size-0",
    "adapter-not-lora",
    "output-folder-missing",
    "hyp-is-folder",
    "non-utf8-config",
    "name-dotdot",
]


@pytest.mark.parametrize("case", PROCESS_MISTAKES)
def test_mistakes_in_a_real_process_exit_2_with_one_line(tmp_path, tiny_model, case):
    import torch

    if case == "device-cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    argv, pattern = _mistake(case, tmp_path, tiny_model)
    proc = _run_process(argv, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    line = _error_line(proc.stderr)
    assert re.search(pattern, line), line
    assert proc.stderr.strip().splitlines()[-1] == line


@pytest.mark.unit
@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_translate_refuses_read_only_output_folder(tmp_path, capsys, tiny_model):
    src = _lines(tmp_path / "src.txt", ["Hello."])
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert _exit_code(["translate", "--model", tiny_model, "-i", src, "-o", str(ro / "o.jsonl")]) == 2
    finally:
        ro.chmod(0o700)
    assert re.search(r"folder .*/ro is not writable", _error_line(capsys.readouterr().err))


@pytest.mark.unit
def test_translate_then_evaluate_with_a_tiny_model(tmp_path, capsys, tiny_model):
    """The checks let a correct command through: translate writes JSONL, evaluate scores its hyp field."""
    src = _lines(tmp_path / "src.txt", ["Hello world.", "Good morning."])
    out = tmp_path / "out.jsonl"
    argv = ["translate", "--model", tiny_model, "-i", src, "-o", str(out), "--max-new-tokens", "3"]
    assert main([*argv, "--batch-size", "2", "--device", "cpu", "--no-progress"]) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["src"] for r in rows] == ["Hello world.", "Good morning."]
    assert all(isinstance(r["hyp"], str) and r["ref"] is None for r in rows)
    capsys.readouterr()
    ref = _lines(tmp_path / "ref.txt", ["你好世界。", "早上好。"])
    assert main(["evaluate", "--hyp", str(out), "--ref", ref, "--no-bertscore"]) == 0
    hyps = [r["hyp"] for r in rows]
    expected = sacrebleu.corpus_chrf(hyps, [["你好世界。", "早上好。"]]).score
    assert json.loads(capsys.readouterr().out)["chrf"]["score"] == pytest.approx(expected)


# --- one place for every failure: exit codes, OS errors, unexpected errors, --debug ------------------------------------


def _fail_with(monkeypatch, exc: BaseException) -> None:
    from distillmt import cli

    def boom(args):
        raise exc

    monkeypatch.setattr(cli, "cmd_config", boom)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (PermissionError(13, "Permission denied", "/x/y.jsonl"), "/x/y.jsonl: Permission denied"),
        (IsADirectoryError(21, "Is a directory", "/x/out"), "/x/out: Is a directory"),
        (OSError(28, "No space left on device"), "No space left on device"),
    ],
)
def test_os_errors_are_one_line_naming_the_file(monkeypatch, capsys, exc, expected):
    _fail_with(monkeypatch, exc)
    assert main(["config"]) == 2
    assert _error_line(capsys.readouterr().err) == f"distillmt: error: {expected}"


@pytest.mark.unit
def test_failed_write_names_the_target_file_not_the_temp_file(tmp_path, monkeypatch, capsys):
    import errno

    from distillmt import cli, io

    target = tmp_path / "out.jsonl"

    def write(args):
        io.write_jsonl(target, [{"hyp": "x"}])
        return 0

    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(cli, "cmd_config", write)
    monkeypatch.setattr(io.os, "fsync", disk_full)
    assert main(["config"]) == 2
    assert _error_line(capsys.readouterr().err) == f"distillmt: error: cannot write {target}: No space left on device"
    assert list(tmp_path.iterdir()) == []  # no temp file left behind


@pytest.mark.unit
def test_unexpected_error_is_one_line_with_the_traceback_saved(tmp_path, monkeypatch, capsys):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    _fail_with(monkeypatch, RuntimeError("boom in the model\nsecond line of detail"))
    assert main(["config"]) == 1
    err = capsys.readouterr().err
    line = _error_line(err)
    assert err.strip() == line
    m = re.fullmatch(
        r"distillmt: error: unexpected RuntimeError: boom in the model; full traceback saved to (\S+) "
        r"\(rerun with --debug to see it\)",
        line,
    )
    assert m, line
    saved = Path(m.group(1))
    assert saved.parent == tmp_path / "distillmt-errors"
    text = saved.read_text(encoding="utf-8")
    assert "Traceback (most recent call last)" in text
    assert "RuntimeError: boom in the model" in text
    assert "second line of detail" in text


@pytest.mark.unit
def test_unexpected_error_in_a_run_saves_the_traceback_in_the_run_folder(tmp_path, monkeypatch, capsys):
    from distillmt import pipeline

    def broken(cfg, **kwargs):
        raise KeyError("stage")

    monkeypatch.setattr(pipeline, "run_experiment", broken)
    assert main(["run", f"output_dir={tmp_path / 'runs'}", "name=t", "--no-progress"]) == 1
    line = _error_line(capsys.readouterr().err)
    assert line.startswith("distillmt: error: unexpected KeyError: 'stage'; full traceback saved to ")
    (saved,) = (tmp_path / "runs" / "t" / "errors").glob("*.log")
    assert str(saved) in line
    assert "KeyError: 'stage'" in saved.read_text(encoding="utf-8")


@pytest.mark.unit
@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_lets_the_unexpected_exception_through(monkeypatch, where):
    _fail_with(monkeypatch, RuntimeError("boom"))
    argv = ["--debug", "config"] if where == "before" else ["config", "--debug"]
    with pytest.raises(RuntimeError, match="boom"):
        main(argv)


@pytest.mark.unit
def test_debug_prints_the_traceback_of_an_expected_error(monkeypatch, capsys):
    from distillmt.errors import DistillmtError

    _fail_with(monkeypatch, DistillmtError("bad value"))
    assert main(["--debug", "config"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1] == "distillmt: error: bad value"


@pytest.mark.unit
def test_keyboard_interrupt_exits_130(monkeypatch, capsys):
    _fail_with(monkeypatch, KeyboardInterrupt())
    assert main(["config"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_bench_loss_prints_a_table_of_ratios(tmp_path, capsys):
    out = tmp_path / "bench.md"
    args = ["bench", "loss", "--vocab", "300", "--batch", "2", "--seq", "8", "--chunk-sizes", "4", "--repeats", "1"]
    assert main([*args, "--threads", "1", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert text == out.read_text() + "\n"
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| implementation")]
    assert len(rows) == 5 and rows[0].split(" | ")[3] == "1.00×"  # naive is the unit
    ours = {r.split(" | ")[-1] for r in rows if "distillmt" in r}
    assert len(ours) == 1  # kd_loss, fused and fused_linear: the same objective from the same hidden states
    assert all("not measured" not in r for r in rows if "TRL" not in r)
