"""Damage a user can fix, said in one line naming the file with exit 2: a damaged model or export manifest, a full
disk (and nothing half-written left behind); and the bookkeeping that survives damage and reruns: label figures over
every shard after a resume, no unfinished rebuild left beside a stage that is current again."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_qwen

from distillmt import cli
from distillmt.cli import main
from distillmt.errors import DistillmtError

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("restore_process_state")]

DISK_FULL = os.strerror(errno.ENOSPC)


def _error_line(err: str) -> str:
    errors = [line for line in err.splitlines() if line.startswith("distillmt: error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def _sources(tmp_path: Path) -> str:
    path = tmp_path / "src.txt"
    path.write_text("the cat sat\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """A model folder as save_pretrained writes it (weights, config, tokenizer)."""
    from distillmt.models import train_bpe_tokenizer

    folder = tmp_path_factory.mktemp("model")
    tok = train_bpe_tokenizer(["the cat sat on the mat", "猫在桌子上"] * 5, 300, folder)
    build_tiny_qwen(len(tok), pad_token_id=tok.pad_token_id).save_pretrained(str(folder))
    return folder


@pytest.mark.parametrize("damage", ["truncated", "not safetensors", "empty"])
def test_damaged_weights_given_to_translate_are_one_line_naming_the_file(tiny_folder, tmp_path, capsys, damage):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(tiny_folder, folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) // 2], "not safetensors": b"<html>404</html>" * 8,
                         "empty": b""}[damage])  # fmt: skip
    assert main(["translate", "--model", str(folder), "-i", _sources(tmp_path), "--device", "cpu"]) == 2
    line = _error_line(capsys.readouterr().err)
    assert line.startswith(f"distillmt: error: {weights} is damaged or not a safetensors file (")
    assert line.endswith("): re-export or re-download it")


def test_damaged_weights_are_named_wherever_their_size_is_read(tiny_folder, tmp_path):
    import shutil

    from distillmt.models import saved_parameter_count

    folder = tmp_path / "m"
    shutil.copytree(tiny_folder, folder)
    assert saved_parameter_count(folder) > 0
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(DistillmtError, match=f"^{weights} is damaged or not a safetensors file"):
        saved_parameter_count(folder)


@pytest.mark.parametrize(
    ("content", "why"),
    [('{"format": "hf", ', "not valid JSON"), ("[1, 2]", "a JSON list, not an object"),
     ('{"format": "onnx"}', "format 'onnx'"), (b"\xff\xfe{}", "not valid JSON")],
)  # fmt: skip
def test_damaged_export_manifest_is_one_line_naming_the_file(tiny_folder, tmp_path, capsys, content, why):
    import shutil

    folder = tmp_path / "exported"
    shutil.copytree(tiny_folder, folder)  # an exported hf folder: weights, config and tokenizer beside the manifest
    manifest = folder / "distillmt-export.json"
    manifest.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert main(["translate", "--model", str(folder), "-i", _sources(tmp_path)]) == 2
    line = _error_line(capsys.readouterr().err)
    assert line.startswith(f"distillmt: error: {manifest} is damaged ({why}") and "re-export" in line


def _train_in_cli(monkeypatch, tmp_path: Path) -> Path:
    """`distillmt config` made to run a tiny training stage with a checkpoint at every step (the CLI's error mapping
    is the one every command goes through); returns its checkpoint folder."""
    from distillmt.sections import TrainConfig
    from distillmt.train import train

    out = tmp_path / "stage"
    ex = [{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9]}] * 4
    cfg = TrainConfig(lr=1e-2, warmup_ratio=0.0, schedule="constant", save_every=1, max_steps=3, batch_size=2)

    def run(args):
        train(build_tiny_qwen(pad_token_id=0), ex, [], out, cfg, None, pad_token_id=0, progress=False, device="cpu")
        return 0

    monkeypatch.setattr(cli, "cmd_config", run)
    return out


def _fail_on_second_call(monkeypatch, module, name: str, fail) -> None:
    real, calls = getattr(module, name), {"n": 0}

    def patched(*args, **kwargs):
        calls["n"] += 1
        return fail(*args, **kwargs) if calls["n"] == 2 else real(*args, **kwargs)

    monkeypatch.setattr(module, name, patched)


def _safetensors_disk_full(*args, **kwargs):
    """What safetensors raises writing to a full filesystem (its own type; the message names no file)."""
    from safetensors import SafetensorError

    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def test_full_disk_while_writing_the_weights_of_a_checkpoint(tmp_path, monkeypatch, capsys):
    """safetensors writes itself and reports a full disk in its own error type: it is exit 2, naming the
    checkpoint, and its half-written folder is gone (it would hold the space the user must free)."""
    import safetensors.torch

    out = _train_in_cli(monkeypatch, tmp_path)
    _fail_on_second_call(monkeypatch, safetensors.torch, "save_file", _safetensors_disk_full)
    assert main(["config"]) == 2
    line = _error_line(capsys.readouterr().err)
    assert line == f"distillmt: error: cannot write {out / 'checkpoints' / 'step-0000002'}: {DISK_FULL}"
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000001"]  # no step-0000002.tmp


def test_full_disk_while_writing_the_optimizer_state_of_a_checkpoint(tmp_path, monkeypatch, capsys):
    from distillmt import io

    def disk_full(fd):
        raise OSError(errno.ENOSPC, DISK_FULL)

    out = _train_in_cli(monkeypatch, tmp_path)
    _fail_on_second_call(monkeypatch, io.os, "fsync", disk_full)  # the 2nd fsync: step 1's scheduler.pt
    assert main(["config"]) == 2
    assert (
        _error_line(capsys.readouterr().err)
        == f"distillmt: error: cannot write {out / 'checkpoints' / 'step-0000001'}: {DISK_FULL}"
    )
    assert [p for p in out.rglob("*") if p.name.endswith(".tmp")] == []


def test_full_disk_saving_a_trained_model_names_its_folder(tmp_path, monkeypatch):
    import transformers.modeling_utils

    from distillmt.models import save_trained

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", _safetensors_disk_full)
    with pytest.raises(OSError) as e:
        save_trained(build_tiny_qwen(), None, tmp_path / "model")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "model")


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_disk_full_in_a_library_error_is_exit_2_naming_where_the_command_writes(monkeypatch, capsys, tmp_path, code):
    def boom(args):
        args.run_folder = tmp_path / "run"
        raise RuntimeError(f"Error while serializing: I/O error: {os.strerror(code)} (os error {code})")

    monkeypatch.setattr(cli, "cmd_config", boom)
    assert main(["config"]) == 2
    assert _error_line(capsys.readouterr().err) == (
        f"distillmt: error: cannot write under {tmp_path / 'run'}: {os.strerror(code)}"
    )


def test_a_failed_write_with_no_file_named_names_the_run_folder():
    from argparse import Namespace

    where = cli._written_folder(Namespace(run_folder=Path("runs/x")))
    assert cli._os_error_message(OSError(errno.ENOSPC, DISK_FULL), where) == f"cannot write under runs/x: {DISK_FULL}"
    assert cli._written_folder(Namespace(output="out.jsonl")) == "out.jsonl"
    assert cli._os_error_message(OSError(errno.EACCES, "Permission denied"), where) == "Permission denied"


def test_bench_generate_without_input_uses_tatoeba_sources(tmp_path):
    from distillmt.bench import bench_generate, generate_sources

    sources = generate_sources(None, 5)
    assert len(sources) == 5 and all(isinstance(s, str) and s for s in sources)
    assert generate_sources(None, 5) == sources  # the same draw every time: runs compare
    (tmp_path / "empty.txt").write_text("\n", encoding="utf-8")
    with pytest.raises(DistillmtError, match="empty.txt holds no sources"):
        generate_sources(str(tmp_path / "empty.txt"), 5)
    with pytest.raises(DistillmtError, match="at least one source"):
        bench_generate("unused", [])


def test_bench_generate_on_an_empty_input_is_exit_2(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    assert main(["bench", "generate", "--model", "nowhere", "-i", str(tmp_path / "empty.txt")]) == 2
    assert "holds no sources" in _error_line(capsys.readouterr().err)


def test_label_figures_cover_the_shards_of_an_earlier_invocation(tmp_path):
    """A kill after some shards: the rerun writes the rest, and reports what the whole labelling generated."""
    from distillmt.data import Pair
    from distillmt.models import train_bpe_tokenizer
    from distillmt.sections import GenerateConfig, HardKDConfig
    from distillmt.teacher_labels import build_teacher_labels

    words = "the cat sat on a mat and we saw it there every day".split()
    pairs = [Pair(" ".join(words[i % 5 : i % 5 + 2 + i % 7]), "") for i in range(10)]
    tok = train_bpe_tokenizer([p.src for p in pairs] * 5, 300, tmp_path / "tok")
    model = build_tiny_qwen(len(tok), hidden_size=32, seed=2, pad_token_id=tok.pad_token_id).eval()
    cfg = HardKDConfig(decoding=GenerateConfig(batch_size=4, max_new_tokens=4), shard_size=4)

    def build(out: Path) -> dict:
        return build_teacher_labels(lambda: (model, tok), pairs, out, cfg, identity={"t": 1}, progress=False)

    whole = build(tmp_path / "whole")
    assert whole["generated_tokens"] > 0 and whole["engine"]
    shards = sorted((tmp_path / "whole").glob("shard-*.jsonl"))
    assert len(shards) == 3
    metas = sorted((tmp_path / "whole").glob("shard-*.meta.json"))
    assert [m.name.removesuffix(".meta.json") for m in metas] == [s.stem for s in shards]
    for path in (shards[-1], metas[-1]):  # killed before the last shard was written
        path.unlink()
    resumed = build(tmp_path / "whole")
    assert resumed["generated_tokens"] == whole["generated_tokens"]
    assert resumed["generation_seconds"] > json.loads(metas[0].read_text())["seconds"]
    again = build(tmp_path / "whole")  # nothing left to generate: the same figures
    assert again["generated_tokens"] == whole["generated_tokens"] and again["engine"] == whole["engine"]


class Counting:
    """A stage function that writes one output file; ``fail`` makes it raise after writing."""

    def __init__(self, text: str = "out", fail: bool = False):
        self.text, self.fail, self.calls = text, fail, 0

    def __call__(self, folder: Path) -> dict:
        self.calls += 1
        (folder / "out.txt").write_text(self.text)
        if self.fail:
            raise RuntimeError("stage failed")
        return {"text": self.text}


def test_failed_rebuild_is_removed_when_the_settings_change_back(tmp_path):
    from distillmt.stages import RunFolder

    run = RunFolder(tmp_path)
    run.stage("s", {"a": 1}, Counting("old"))
    with pytest.raises(RuntimeError):
        run.stage("s", {"a": 2}, Counting("new", fail=True))
    assert (tmp_path / ".s.next" / "out.txt").exists()
    same = Counting("never")
    assert run.stage("s", {"a": 1}, same) == {"text": "old"} and same.calls == 0
    assert not (tmp_path / ".s.next").exists()
    assert (tmp_path / "s" / "out.txt").read_text() == "old"


def test_failed_rebuild_stays_for_a_rerun_with_its_settings(tmp_path):
    from distillmt.stages import RunFolder

    run = RunFolder(tmp_path)
    run.stage("s", {"a": 1}, Counting("old"))
    with pytest.raises(RuntimeError):
        run.stage("s", {"a": 2}, Counting("new", fail=True))
    seen = []

    def resume(folder: Path) -> dict:
        seen.append((folder / "out.txt").read_text())  # the partial rebuild is there to resume from
        return Counting("new")(folder)

    assert run.stage("s", {"a": 2}, resume) == {"text": "new"} and seen == ["new"]
    assert not (tmp_path / ".s.next").exists()


def test_unfinished_rebuild_without_a_finished_stage_is_removed(tmp_path):
    from distillmt.stages import RunFolder

    (tmp_path / ".s.next").mkdir()
    (tmp_path / ".s.next" / "pending.json").write_text('{"key": "x"}')
    RunFolder(tmp_path).stage("s", {"a": 1}, Counting())
    assert not (tmp_path / ".s.next").exists() and (tmp_path / "s" / "out.txt").exists()


def test_damaged_weights_never_load_as_a_model(tiny_folder, tmp_path):
    import shutil

    from distillmt.models import load_model

    folder = tmp_path / "m"
    shutil.copytree(tiny_folder, folder)
    (folder / "model.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(DistillmtError, match="model.safetensors is damaged"):
        load_model(str(folder), dtype=torch.float32, device=torch.device("cpu"))


@pytest.mark.parametrize("content", ["point,seed,system,chrF\n", ""])
def test_report_on_a_sweep_with_no_rows_yet_is_a_clear_error(tmp_path, capsys, content):
    spec = {"name": "sw", "points": [{"name": "lr=0.001", "settings": {"train_student.lr": 0.001}}], "seeds": [0]}
    (tmp_path / "sweep.json").write_text(json.dumps({**spec, "varied": ["train_student.lr"]}), encoding="utf-8")
    (tmp_path / "results.csv").write_text(content, encoding="utf-8")
    assert main(["report", str(tmp_path)]) == 2
    line = _error_line(capsys.readouterr().err)
    assert line.startswith(f"distillmt: error: {tmp_path / 'results.csv'} has no rows yet: ")
    assert not (tmp_path / "report.md").exists()


def test_bertscore_a_rounding_error_above_1_is_1(monkeypatch):
    """A sentence equal to its reference scores 1.0000001 in float32: reported as 1, while a value further above
    1 (not rounding) is left visible."""
    import bert_score

    from distillmt import metrics, models

    over = torch.tensor([1.0000001, 0.5, 1.0], dtype=torch.float32)
    assert float(over[0]) > 1
    monkeypatch.setattr(metrics, "resolve_bertscore_model", lambda ref, **kw: ref)
    monkeypatch.setattr(models, "check_loadable", lambda ref: None)
    monkeypatch.setattr(metrics, "check_bertscore", lambda model, layer: None)
    monkeypatch.setattr(bert_score, "score", lambda *a, **kw: (over.clone(), over.clone(), over.clone()))
    entry = metrics.bertscore(["a", "b", "c"], ["a", "x", "c"], model="enc", sentences=True)
    assert entry["sentences"]["BERTScore F1"] == [1.0, 0.5, 1.0]
    assert entry["columns"]["BERTScore F1"] <= 1.0 and entry["score"] == entry["columns"]["BERTScore F1"]
    assert metrics._clamp_rounding(torch.tensor([1.01])).tolist() == [pytest.approx(1.01)]
