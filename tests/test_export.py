"""distillmt export: a row of a finished run as a standalone translator folder (Hugging Face or CTranslate2) that
`distillmt translate --model DIR` loads, with a README that says what it is and how it scored."""

from __future__ import annotations

import json

import pytest
from conftest import micro_cfg

from distillmt.cli import main
from distillmt.errors import DistillmtError
from distillmt.export import export_system, exported_format
from distillmt.io import read_jsonl
from distillmt.pipeline import run_experiment
from distillmt.prompts import DEFAULT_PROMPT
from distillmt.sections import GenerateConfig


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    run_experiment(micro_cfg(tmp, "systems=[STUDENT,HLKD]"), progress=False)
    return tmp / "micro"


def translate(model_dir, sources, out, capsys, *extra: str) -> list[str]:
    args = ["translate", "--model", str(model_dir), "-i", str(sources), "-o", str(out), "--no-progress", *extra]
    assert main([*args, "--max-new-tokens", "6", "--batch-size", "4"]) == 0
    capsys.readouterr()
    return [r["hyp"] for r in read_jsonl(out)]


def test_hf_and_ct2_exports_translate_like_the_run(run_dir, tmp_path, capsys):
    rows = read_jsonl(run_dir / "translate_HLKD" / "translations.jsonl")
    sources = tmp_path / "src.txt"
    sources.write_text("".join(r["src"] + "\n" for r in rows), encoding="utf-8")

    assert main(["export", str(run_dir), "--system", "HLKD", "-o", str(tmp_path / "hf")]) == 0
    assert exported_format(tmp_path / "hf") == "hf"
    assert (tmp_path / "hf" / "model.safetensors").exists() and (tmp_path / "hf" / "tokenizer.json").exists()
    readme = (tmp_path / "hf" / "README.md").read_text()
    assert "labels from the finetuned teacher" in readme and "chrF" in readme
    assert translate(tmp_path / "hf", sources, tmp_path / "hf.jsonl", capsys) == [r["hyp"] for r in rows]
    budget = translate(tmp_path / "hf", sources, tmp_path / "budget.jsonl", capsys, "--max-batch-tokens", "120")
    assert sum(a == r["hyp"] for a, r in zip(budget, rows, strict=True)) >= len(rows) - 1  # other batches, same model

    pytest.importorskip("ctranslate2")
    export_system(run_dir, "HLKD", tmp_path / "ct2", fmt="ct2", quantization="float32")
    assert exported_format(tmp_path / "ct2") == "ct2" and (tmp_path / "ct2" / "model.bin").exists()
    assert json.loads((tmp_path / "ct2" / "distillmt-export.json").read_text())["quantization"] == "float32"
    assert "was not scored" in (tmp_path / "ct2" / "README.md").read_text()
    ct2 = translate(tmp_path / "ct2", sources, tmp_path / "ct2.jsonl", capsys)
    same = sum(a == b for a, b in zip(ct2, [r["hyp"] for r in rows], strict=True))
    assert same >= len(rows) - 1  # float32 CTranslate2 decodes the same model: at most a rounding-level tie differs
    export_system(run_dir, "HLKD", tmp_path / "int8", fmt="ct2")
    assert json.loads((tmp_path / "int8" / "distillmt-export.json").read_text())["quantization"] == "int8"
    assert len(translate(tmp_path / "int8", sources, tmp_path / "int8.jsonl", capsys)) == len(rows)


def test_export_refuses_what_it_cannot_do(run_dir, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(DistillmtError, match="not an empty folder"):
        export_system(run_dir, "HLKD", tmp_path / "taken")
    with pytest.raises(DistillmtError, match="--system SLKD is not a row"):
        export_system(run_dir, "SLKD", tmp_path / "x")
    with pytest.raises(DistillmtError, match="not a run folder"):
        export_system(tmp_path, "HLKD", tmp_path / "y")
    with pytest.raises(DistillmtError, match="--quantization applies to --format ct2 only"):
        export_system(run_dir, "HLKD", tmp_path / "z", quantization="int8")
    assert not (tmp_path / "x").exists() and not (tmp_path / "z").exists()


def test_ct2_engine_in_the_pipeline_translates_and_labels(tmp_path):
    """generate.engine=ct2 converts each model once into its stage folder and decodes with CTranslate2; at float32 the
    outputs match transformers' (the reference) but for rounding-level ties. The engine is recorded per row."""
    pytest.importorskip("ctranslate2")
    ref = run_experiment(micro_cfg(tmp_path, "systems=[STUDENT,HLKD]", "name=hf"), progress=False)
    ct2 = run_experiment(
        micro_cfg(
            tmp_path,
            "systems=[STUDENT,HLKD]",
            "name=ct2",
            "generate.engine=ct2",
            "generate.quantization=float32",
            "hard_kd.decoding.engine=ct2",
            "hard_kd.decoding.quantization=float32",
        ),
        progress=False,
    )
    assert ct2["systems"]["STUDENT"]["translation"]["engine"] == "ct2 float32"
    assert ref["systems"]["STUDENT"]["translation"]["engine"] == "hf float32"
    root = tmp_path / "ct2"
    assert (root / "translate_STUDENT" / "ct2-model" / "model.bin").exists()
    assert (root / "teacher_labels" / "ct2-model" / "model.bin").exists()
    for name in ("translate_STUDENT", "teacher_labels"):
        files = sorted((tmp_path / "hf" / name).glob("*.jsonl")), sorted(root.glob(f"{name}/*.jsonl"))
        a = [r.get("hyp", r.get("label")) for f in files[0] for r in read_jsonl(f)]
        b = [r.get("hyp", r.get("label")) for f in files[1] for r in read_jsonl(f)]
        assert len(a) == len(b) and sum(x == y for x, y in zip(a, b, strict=True)) >= len(a) - 2, name


@pytest.mark.unit
def test_the_quantization_keys_a_decoding_stage_only_under_ct2():
    from distillmt.sections import GenerateConfig

    hf = GenerateConfig().output_settings()
    assert hf["engine"] == "hf" and "quantization" not in hf  # hf does not read it
    ct2 = GenerateConfig(engine="ct2", quantization="float32").output_settings()
    assert ct2["engine"] == "ct2" and ct2["quantization"] == "float32"
    with pytest.raises(DistillmtError, match="engine=ct2 gives one label per source"):
        micro_cfg(__import__("pathlib").Path("/tmp"), "hard_kd.decoding.engine=ct2", "hard_kd.num_candidates=2")


class _FakeVllm:
    """A stand-in for the vllm package (no GPU here): records what distillmt asks of it and echoes the prompt back
    as a 'translation', so the prompt, stop tokens, sampling settings and output cleaning can be checked."""

    calls: list = []

    class SamplingParams:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    class LLM:
        def __init__(self, **kwargs):
            _FakeVllm.calls.append(("LLM", kwargs))

        def generate(self, prompts, params, use_tqdm=True, lora_request=None):
            import types

            _FakeVllm.calls.append(("generate", prompts, params.kwargs, lora_request))
            out = types.SimpleNamespace
            return [out(outputs=[out(text=f" T:{len(p)}<|im_end|>", token_ids=[1, 2, 3])]) for p in prompts]


@pytest.mark.unit
def test_vllm_engine_with_a_stand_in(tmp_path, monkeypatch):
    import sys

    import torch

    from distillmt.generate import translate_with_engine
    from distillmt.models import train_bpe_tokenizer

    monkeypatch.setitem(sys.modules, "vllm", _FakeVllm)
    _FakeVllm.calls = []
    tok = train_bpe_tokenizer(["hello world", "你好世界"] * 20, 300, tmp_path / "tok")
    from conftest import build_tiny_qwen

    model = build_tiny_qwen(len(tok), pad_token_id=tok.pad_token_id).to(torch.bfloat16)
    res, engine = translate_with_engine(
        model, tok, ["Hello.", "World!"], GenerateConfig(engine="vllm", max_new_tokens=7), work_dir=tmp_path / "stage",
        num_return_sequences=1, selection="score", seed=3,
    )  # fmt: skip
    assert engine == "vllm bfloat16"
    assert (tmp_path / "stage" / "vllm-model" / "config.json").exists()  # the model vLLM loads, saved once
    (_, init), (_, prompts, params, lora) = _FakeVllm.calls
    assert lora is None
    assert init["model"] == str(tmp_path / "stage" / "vllm-model") and init["trust_remote_code"] is False
    assert prompts[0].startswith("English: Hello.")
    assert params["max_tokens"] == 7 and params["temperature"] == 0.0 and params["seed"] == 3
    assert params["stop_token_ids"] == [tok.eos_token_id]
    assert res.hypotheses == [f"T:{len(prompts[0])}", f"T:{len(prompts[1])}"] and res.generated_tokens == 6


@pytest.fixture
def fake_vllm(monkeypatch):
    """The vllm stand-in in place (its LoRA module too), and no engine left over for the next test."""
    import sys
    import types

    from distillmt.generate import release_vllm

    class LoRARequest:
        def __init__(self, name, lora_id, path):
            self.name, self.lora_int_id, self.lora_path = name, lora_id, path

    request = types.SimpleNamespace(LoRARequest=LoRARequest)
    monkeypatch.setitem(sys.modules, "vllm", _FakeVllm)
    monkeypatch.setitem(sys.modules, "vllm.lora", types.SimpleNamespace(request=request))
    monkeypatch.setitem(sys.modules, "vllm.lora.request", request)
    _FakeVllm.calls = []
    release_vllm()
    yield _FakeVllm
    release_vllm()


def test_vllm_loads_the_lora_adapter_itself_and_keeps_one_engine(tmp_path, fake_vllm):
    """With the weights' folders given, vLLM gets the base model and the peft adapter (LoRA through vLLM, nothing
    merged or written); label shards on the same weights share one engine until it is released."""

    from conftest import build_tiny_qwen

    from distillmt.generate import SavedModel, release_vllm, translate_with_engine
    from distillmt.models import apply_lora, count_parameters, saved_parameter_count, train_bpe_tokenizer

    tok = train_bpe_tokenizer(["hello world", "你好世界"] * 20, 300, tmp_path / "tok")
    base = build_tiny_qwen(len(tok), pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    base.save_pretrained(tmp_path / "base")
    assert saved_parameter_count(tmp_path / "base") == count_parameters(base)["total"]  # the tied layer once
    assert saved_parameter_count(tmp_path / "nowhere") is None
    apply_lora(base, r=12, alpha=24, dropout=0.0, target_modules=["q_proj", "v_proj"]).save_pretrained(tmp_path / "ad")
    saved = SavedModel(str(tmp_path / "base"), str(tmp_path / "ad"), "bfloat16")
    vllm = GenerateConfig(engine="vllm", max_new_tokens=5)
    args = {"work_dir": tmp_path / "stage", "saved": saved, "num_return_sequences": 1, "selection": "score"}
    res, engine = translate_with_engine(None, tok, ["Hello.", "World!"], vllm, **args)
    translate_with_engine(None, tok, ["Again."], vllm, **args)  # the next shard: the same engine
    assert engine == "vllm bfloat16 + LoRA" and res.hypotheses[0].startswith("T:")
    inits = [c[1] for c in fake_vllm.calls if c[0] == "LLM"]
    assert len(inits) == 1 and inits[0]["model"] == str(tmp_path / "base")
    assert inits[0]["enable_lora"] is True and inits[0]["max_lora_rank"] == 16  # r=12, rounded up to vLLM's ranks
    requests = [c[3] for c in fake_vllm.calls if c[0] == "generate"]
    assert [r.lora_path for r in requests] == [str(tmp_path / "ad")] * 2 and requests[0].lora_int_id == 1
    assert not (tmp_path / "stage" / "vllm-model").exists()  # nothing merged, nothing saved
    release_vllm()
    plain = SavedModel(str(tmp_path / "base"), None, "float32")
    assert translate_with_engine(None, tok, ["x"], vllm, **{**args, "saved": plain})[1] == "vllm float32"
    assert len([c for c in fake_vllm.calls if c[0] == "LLM"]) == 2 and "enable_lora" not in fake_vllm.calls[-2][1]
    with pytest.raises(ValueError, match="model is None"):
        translate_with_engine(None, tok, ["x"], GenerateConfig(), **args)


@pytest.mark.unit
def test_vllm_lora_rank_is_one_vllm_accepts(tmp_path):
    from distillmt.generate import vllm_lora_rank

    def rank(config) -> int:
        (tmp_path / "adapter_config.json").write_text(json.dumps(config))
        return vllm_lora_rank(tmp_path)

    assert [rank({"r": r}) for r in (1, 8, 9, 300)] == [8, 8, 16, 320]
    assert rank({"r": 8, "rank_pattern": {"q_proj": 40}}) == 64  # the largest rank of any module
    with pytest.raises(DistillmtError, match="LoRA rank 600 is above vLLM's largest, 512"):
        rank({"r": 600})
    with pytest.raises(DistillmtError, match=r"adapter_config.json: not a readable LoRA adapter config"):
        rank({"rank": 8})


def test_vllm_stages_of_the_pipeline_load_saved_weights(tmp_path, fake_vllm, monkeypatch):
    """Label and translation stages on vLLM hand it the trained folders (no HF model loaded, no copy written), count
    the parameters from the files, and release the engine at the end of each stage."""
    monkeypatch.setattr("distillmt.pipeline.check_engine", lambda engine, key: None)  # (no GPU here)
    extra = ["systems=[TEACHER,HLKD]", "generate.engine=vllm", "hard_kd.decoding.engine=vllm", "device=cpu"]
    report = run_experiment(micro_cfg(tmp_path, *extra), progress=False)
    root = tmp_path / "micro"
    inits = [c[1]["model"] for c in fake_vllm.calls if c[0] == "LLM"]
    teacher = str(root / "train_teacher" / "model")
    assert inits == [teacher, teacher, str(root / "train_hlkd" / "model")]  # labels, TEACHER, HLKD: one engine each
    assert not list(root.glob("*/vllm-model"))
    row = report["systems"]["HLKD"]["translation"]
    assert row["engine"] == "vllm float32" and row["parameters"] > 0


@pytest.mark.unit
def test_engines_that_cannot_run_here_are_refused_before_any_stage(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine could run vLLM")
    with pytest.raises(DistillmtError, match="engine' = vllm needs vLLM and a CUDA GPU"):
        run_experiment(micro_cfg(tmp_path, "generate.engine=vllm"), progress=False)
    assert not (tmp_path / "micro" / "data").exists()
    with pytest.raises(DistillmtError, match="does not do beam search"):
        micro_cfg(tmp_path, "hard_kd.decoding.engine=vllm", "hard_kd.decoding.num_beams=4")


def test_bench_generate_compares_batching_and_engines(run_dir, tmp_path, capsys):
    sources = tmp_path / "src.jsonl"
    sources.write_text((run_dir / "translate_STUDENT" / "translations.jsonl").read_text(), encoding="utf-8")
    model = run_dir / "train_student" / "model"
    args = ["bench", "generate", "--model", str(model), "-i", str(sources), "--sentences", "5"]
    assert main([*args, "--max-new-tokens", "6", "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert "| hf, one sentence at a time |" in text and "| 1.00× | 5/5 |" in text
    assert "| hf, batches of 32 |" in text
    if __import__("importlib").util.find_spec("ctranslate2"):
        assert "| ct2 int8, batches of 32 |" in text


@pytest.mark.parametrize("engine", ["hf", "ct2", "vllm"])
def test_shards_of_several_processes_merge_into_one_process_output(run_dir, tmp_path, monkeypatch, engine):
    """Each process translates its share (shard=(rank, world)); merged, the shares give one process's output exactly,
    hf sampling included (each batch draws from its own seed), and a sentence no shard covers is an error."""
    import sys

    import torch

    from distillmt.generate import merge_shards, translate_with_engine
    from distillmt.models import load_tokenizer

    if engine == "ct2":
        pytest.importorskip("ctranslate2")
    monkeypatch.setitem(sys.modules, "vllm", _FakeVllm)
    from conftest import build_tiny_qwen

    tok = load_tokenizer(str(run_dir / "train_student" / "model"))
    model = build_tiny_qwen(len(tok), hidden_size=32, seed=2, pad_token_id=tok.pad_token_id).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)  # a random but decisive model: varied greedy output
    words = "the cat sat on a mat and we saw it there every day".split()
    sources = [" ".join(words[: 2 + i]) for i in range(11)]
    # sampling for hf (CTranslate2 samples from per-thread generators that no seed resets: its sampled output
    # depends on the process count; its greedy output does not)
    cfg = GenerateConfig(engine=engine, quantization="float32", max_new_tokens=5, batch_size=3,
                         do_sample=engine == "hf", temperature=1.5)  # fmt: skip
    args = {"work_dir": tmp_path, "seed": 4}
    one, _ = translate_with_engine(model, tok, sources, cfg, **args)
    parts = [translate_with_engine(model, tok, sources, cfg, shard=(r, 3), **args)[0] for r in range(3)]
    assert all(sum(h is not None for h in p.hypotheses) < len(sources) for p in parts)  # each did a share
    merged = merge_shards(parts)
    if engine != "ct2":  # (greedy, this random model says the same thing to every source)
        assert len(set(one.hypotheses)) > 3  # varied output: the order of the merge is checked too
    assert merged.hypotheses == one.hypotheses and merged.generated_tokens == one.generated_tokens
    with pytest.raises(DistillmtError, match="translated by no process"):
        merge_shards(parts[1:])


def test_bench_train_compares_trl_and_distillmt_on_the_same_data(run_dir, tmp_path, capsys):
    out = tmp_path / "train.md"
    args = ["bench", "train", "--tokenizer", str(run_dir / "tokenizer"), "--pairs", "16", "--steps", "2"]
    assert main([*args, "--batch", "4", "--threads", "1", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| trainer")]
    assert len(rows) == 7 and text == out.read_text() + "\n"
    ours = [r for r in rows if "distillmt" in r]
    assert len(ours) == 5 and all("not measured" not in r and float(r.split(" | ")[2]) > 0 for r in ours), ours
    assert main(["bench", "train", "--tokenizer", "store:no-such-model"]) == 2  # said before any child starts
    assert "is not in the store" in capsys.readouterr().err
    assert main(["bench", "train", "--student", str(run_dir / "train_student" / "model")]) == 2
    assert "--student and --teacher together" in capsys.readouterr().err


@pytest.mark.slow  # ~50 s of child processes; the same tables as the test above, from saved models with LoRA
def test_bench_train_on_saved_models_trains_a_lora_student(run_dir, capsys):
    """The real-model path (--student/--teacher): saved model folders, a LoRA student, the models' own dtype."""
    student, teacher = run_dir / "train_student" / "model", run_dir / "train_teacher" / "model"
    args = ["bench", "train", "--student", str(student), "--teacher", str(teacher), "--dtype", "float32"]
    assert main([*args, "--pairs", "8", "--steps", "2", "--batch", "4", "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert f"{teacher} → {student} (LoRA), float32" in text and "LoRA r=16" in text
    rows = [line for line in text.splitlines() if line.startswith("| distillmt")]
    assert len(rows) == 5 and all("not measured" not in r and float(r.split(" | ")[2]) > 0 for r in rows), rows


def test_bench_flops_counts_a_lora_step_against_the_matmul_peak(run_dir):
    import re

    from distillmt.bench import bench_flops

    model = str(run_dir / "train_student" / "model")
    text = bench_flops(model=model, batch=2, steps=1, threads=1, dtype="float32", lora_r=4, lora_dropout=0.0,
                       peak_sizes=(128, 256))  # fmt: skip
    assert "LoRA r=4 (dropout 0) on 7 projections" in text.splitlines()[0]
    peak = re.search(
        r"\| matmul peak, float32 \((\d+)×\1 @ \1×\1\) \| [\d.e+-]+ \| [\d.e+-]+ \| ([\d.e+-]+) \| 1\.00 \|", text
    )
    step = re.search(r"\| LoRA training step \(2 examples, (\d+) tokens, \d+ wide\) \| ([\d.e+-]+) \| [\d.e+-]+ \| ([\d.e+-]+) \| "
                     r"([\d.]+) of float32 \|", text)  # fmt: skip
    assert peak and step, text
    assert int(peak.group(1)) in (128, 256) and float(step.group(2)) > 0  # FLOPs were counted
    assert "bfloat16" not in text.split("\n\n")[1]  # float32 only: the peak is measured in the step's own dtype
    variants = re.findall(
        r"^\| (SDPA in fp32|sdpa|eager)[^|]* \| (fused|loop[^|]*) \| ([\d.e+-]+) \| ([\d.]+)× \|$", text, re.M
    )
    assert [(a, f[:4]) for a, f, _, _ in variants] == [
        ("SDPA in fp32", "fuse"),
        ("sdpa", "fuse"),
        ("eager", "fuse"),
        ("sdpa", "loop"),
    ]
    assert all(float(t) > 0 for _, _, t, _ in variants) and variants[-1][3] == "1.00"


def test_bench_flops_times_a_full_step_under_bf16_autocast(run_dir):
    """lora_r=0 trains every weight (the default teacher's setting), mixed_precision="bf16" runs it under autocast:
    the peak is then measured in bf16, the weights stay fp32."""
    from distillmt.bench import bench_flops

    model = str(run_dir / "train_teacher" / "model")
    text = bench_flops(model=model, batch=2, steps=1, threads=1, dtype="float32", lora_r=0, mixed_precision="bf16",
                       peak_sizes=(128,))  # fmt: skip
    assert "all weights trained, float32 weights under bf16 autocast" in text
    assert "| matmul peak, bfloat16 (128×128 @ 128×128)" in text and "of bfloat16 |" in text
    assert "| training step (2 examples" in text


def test_export_after_a_failed_rerun_describes_the_model_it_exports(run_dir, tmp_path, monkeypatch, capsys):
    """A rerun with other settings that fails leaves config.json, results.md and the export's README as the finished
    run made them; where it did replace a stage, the README says that model was not scored instead of lending it
    another model's scores and decoding."""
    import shutil

    from distillmt.pipeline import Experiment

    root = tmp_path / "micro"
    shutil.copytree(run_dir, root, symlinks=True)
    config, results_md = (root / "config.json").read_bytes(), (root / "results.md").read_bytes()
    rerun = ["systems=[STUDENT,HLKD]", "generate.num_beams=3", "student.scratch.num_layers=2"]

    def fail(self, *args):
        raise DistillmtError("stage failed on purpose")

    monkeypatch.setattr(Experiment, "stage_train_student", fail)
    with pytest.raises(DistillmtError, match="on purpose"):
        run_experiment(micro_cfg(tmp_path, *rerun), progress=False)
    assert (root / "config.json").read_bytes() == config and (root / "results.md").read_bytes() == results_md
    attempt = json.loads((root / "config.attempt.json").read_text())
    assert attempt["generate"]["num_beams"] == 3  # the failed attempt's settings, under their own name

    export_system(root, "HLKD", tmp_path / "hf")
    readme = (tmp_path / "hf" / "README.md").read_text()
    assert "decoding 1 beam(s)" in readme and "hidden size 16, 1 layer(s)" in readme and "chrF" in readme
    assert json.loads((tmp_path / "hf" / "distillmt-export.json").read_text())["decoding"]["num_beams"] == 1

    # A rerun that translates again with 3 beams and fails: the rows keep the scores and decoding of the report.
    monkeypatch.undo()
    monkeypatch.setattr(Experiment, "stage_evaluate", fail)
    with pytest.raises(DistillmtError, match="on purpose"):
        run_experiment(micro_cfg(tmp_path, "systems=[STUDENT,HLKD]", "generate.num_beams=3"), progress=False)
    assert (root / "config.json").read_bytes() == config
    export_system(root, "STUDENT", tmp_path / "student")
    readme = (tmp_path / "student" / "README.md").read_text()
    assert "decoding 1 beam(s)" in readme and "chrF" in readme

    # One that trains a 2-layer student and fails: that student is what gets exported, and it was never scored.
    monkeypatch.setattr(Experiment, "stage_translate", fail)
    with pytest.raises(DistillmtError, match="on purpose"):
        run_experiment(micro_cfg(tmp_path, "systems=[STUDENT,HLKD]", "student.scratch.num_layers=2"), progress=False)
    export_system(root, "STUDENT", tmp_path / "student2")
    readme = (tmp_path / "student2" / "README.md").read_text()
    assert "hidden size 16, 2 layer(s)" in readme and "Not scored" in readme
    assert "beam(s)" not in readme and "chrF" not in readme

    # The run that finishes writes its config and drops the attempt's.
    monkeypatch.undo()
    run_experiment(micro_cfg(tmp_path, *rerun), progress=False)
    assert json.loads((root / "config.json").read_text())["generate"]["num_beams"] == 3
    assert not (root / "config.attempt.json").exists()


def _readme_commands(folder, section: str) -> list[list[str]]:
    """The `distillmt` commands of a README section's code block, THIS_FOLDER replaced by ``folder``, as argv lists."""
    import shlex

    text = (folder / "README.md").read_text(encoding="utf-8").split(f"## {section}\n", 1)[1]
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line.replace("THIS_FOLDER", str(folder)))[1:] for line in block.splitlines()]


def _run_readme_check(folder, capsys) -> tuple[list[str], dict, str]:
    """The README's check commands run as written (in the current folder): the translations, the scores that
    `distillmt evaluate` prints, and what translate said on stderr."""
    translate_argv, evaluate_argv = _readme_commands(folder, "Check the scores")
    assert translate_argv[0] == "translate" and evaluate_argv[0] == "evaluate"
    assert main(translate_argv) == 0
    said = capsys.readouterr().err
    assert main(evaluate_argv) == 0
    return [r["hyp"] for r in read_jsonl("translations.jsonl")], json.loads(capsys.readouterr().out), said


@pytest.mark.parametrize("system", ["STUDENT", "HLKD"])
def test_an_export_translates_and_scores_as_its_row_did(run_dir, tmp_path, capsys, monkeypatch, system):
    """Issue 27: the export records the dtype, engine and decoding its row was scored with (the manifest, and
    generation_config.json for transformers); its README's commands, run as written with no other flag, give the
    run's translations line for line and the scores the README states."""
    from distillmt.metrics import metric_entries

    run_rows = read_jsonl(run_dir / f"translate_{system}" / "translations.jsonl")
    monkeypatch.chdir(tmp_path)
    folder = export_system(run_dir, system, tmp_path / "hf")
    manifest = json.loads((folder / "distillmt-export.json").read_text())
    section = manifest["translate"]
    assert section == {**GenerateConfig(max_new_tokens=6, batch_size=4).output_settings(), "dtype": "float32",
                       "seed": 0, "scored_with": "hf float32",
                       "prompt": {"chat": DEFAULT_PROMPT.chat, "plain": DEFAULT_PROMPT.plain}}  # fmt: skip
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["max_new_tokens"] == 6 and generation["num_beams"] == 1 and generation["do_sample"] is False
    assert "temperature" not in generation and "length_penalty" not in generation  # greedy, one beam
    assert _readme_commands(folder, "Use")[0][:3] == ["translate", "--model", str(folder)]

    hyps, scores, said = _run_readme_check(folder, capsys)
    assert "using the export's settings: dtype float32, batch_size 4, max_new_tokens 6, num_beams 1 " in said
    assert "(override with --dtype, --batch-size, --max-new-tokens, --num-beams)" in said
    assert hyps == [r["hyp"] for r in run_rows]
    stated = manifest["scores"]
    for key in ("chrf", "bleu"):
        assert scores[key]["score"] == stated[key]["score"], key
    readme = (folder / "README.md").read_text()
    for entry in metric_entries(scores).values():
        for column, value in entry["columns"].items():
            assert f"{column} {value:.{entry['decimals']}f}" in readme, column

    pytest.importorskip("ctranslate2")
    (tmp_path / "ct2-check").mkdir()
    monkeypatch.chdir(tmp_path / "ct2-check")  # the ct2 check writes its own translations.jsonl
    ct2 = export_system(run_dir, system, tmp_path / "ct2", fmt="ct2", quantization="float32")
    assert not (ct2 / "generation_config.json").exists()
    hyps, ct2_scores, said = _run_readme_check(ct2, capsys)
    assert "using the export's settings: batch_size 4, max_new_tokens 6, num_beams 1 " in said  # no dtype: ct2's
    assert "it was scored with hf float32, not ct2" in said
    same = sum(a == r["hyp"] for a, r in zip(hyps, run_rows, strict=True))
    assert same >= len(run_rows) - 1  # float32 CTranslate2: at most a rounding-level tie differs
    if same == len(run_rows):
        assert all(ct2_scores[k]["score"] == stated[k]["score"] for k in ("chrf", "bleu"))


def test_a_stage_model_folder_in_a_run_translates_as_its_row_was_scored(run_dir, tmp_path, capsys):
    """`translate --model runs/NAME/train_x/model` finds the translate stage that scored that very model and uses its
    settings, saying so; a flag overrides one; a model no row translated gets the defaults and no such line."""
    rows = read_jsonl(run_dir / "translate_HLKD" / "translations.jsonl")
    sources = tmp_path / "src.jsonl"
    sources.write_text((run_dir / "translate_HLKD" / "translations.jsonl").read_text(), encoding="utf-8")
    base = ["translate", "-i", str(sources), "-o", str(tmp_path / "out.jsonl"), "--no-progress"]
    assert main([*base, "--model", str(run_dir / "train_hlkd" / "model")]) == 0
    said = capsys.readouterr().err
    assert "using the settings micro/translate_HLKD recorded: dtype float32, batch_size 4, max_new_tokens 6" in said
    assert [r["hyp"] for r in read_jsonl(tmp_path / "out.jsonl")] == [r["hyp"] for r in rows]

    assert main([*base, "--model", str(run_dir / "train_hlkd" / "model"), "--num-beams", "2", "--dtype", "auto"]) == 0
    said = capsys.readouterr().err
    taken = "batch_size 4, max_new_tokens 6, length_penalty 1.0"  # not the flags given; beams make the penalty count
    assert f"recorded: {taken} (override with --batch-size, --max-new-tokens, --length-penalty)" in said

    assert main([*base, "--model", str(run_dir / "train_teacher" / "model")]) == 0  # no TEACHER row in this run
    assert "using" not in capsys.readouterr().err


@pytest.mark.unit
def test_recorded_translation_of_a_stage_folder_says_nothing_false(tmp_path):
    """The translate stages that used a training stage at its current key count; rows that disagree give no
    settings and say so; a stale record counts for nothing; a damaged value is refused naming its file."""
    from distillmt.export import recorded_translation

    run = tmp_path / "run"
    (run / "train_x" / "model").mkdir(parents=True)
    (run / "train_x" / "stage.json").write_text(json.dumps({"stage": "train_x", "key": "k1"}))

    def translated(row: str, key: str, beams: int, engine: str = "hf float32") -> None:
        settings = {"model": {"stage": "train_x", "key": key}, "generate": {"num_beams": beams}, "seed": 3}
        (run / f"translate_{row}").mkdir(exist_ok=True)
        record = {"stage": f"translate_{row}", "settings": settings, "result": {"engine": engine}}
        (run / f"translate_{row}" / "stage.json").write_text(json.dumps(record))

    model = run / "train_x" / "model"
    assert recorded_translation(model) == (None, "")
    translated("A", "k0", 4)  # an earlier model of train_x
    assert recorded_translation(model) == (None, "")
    translated("B", "k1", 2)
    want = {"generate": {"num_beams": 2}, "dtype": "float32", "seed": 3, "scored_with": "hf float32"}
    assert recorded_translation(model) == (want, "the settings run/translate_B recorded")
    translated("C", "k1", 2)
    assert recorded_translation(model) == (want, "the settings run/translate_B and run/translate_C recorded")
    translated("C", "k1", 5)
    differ = "run/translate_B and run/translate_C translated this model with different settings: using the defaults"
    assert recorded_translation(model) == (None, differ)
    translated("C", "k1", 2, engine="ct2 int8")  # no torch dtype in a CTranslate2 engine
    translated("B", "k1", 2, engine="ct2 int8")
    assert recorded_translation(model)[0] == {"generate": {"num_beams": 2}, "seed": 3, "scored_with": "ct2 int8"}
    translated("B", "k1", 0)
    with pytest.raises(DistillmtError, match=r"translate_B/stage.json: config key 'num_beams' = 0 is out of range"):
        recorded_translation(model)
    assert recorded_translation(run / "train_x") == (None, "")  # the stage folder, not its model


@pytest.mark.unit
def test_a_sampled_rows_decoding_goes_into_generation_config(tmp_path):
    """Sampling settings are written only with sampling, the length penalty only with beams (transformers refuses to
    save a config that sets what its decoding does not use), and what the model's config held already stays."""
    from conftest import build_tiny_qwen
    from transformers import GenerationConfig

    from distillmt.export import _set_generation_config
    from distillmt.models import train_bpe_tokenizer

    tok = train_bpe_tokenizer(["hello world"] * 20, 300, tmp_path / "tok")
    model = build_tiny_qwen(len(tok), pad_token_id=tok.pad_token_id)
    model.generation_config.repetition_penalty = 1.05  # as a pretrained model's own config may hold
    model.generation_config.temperature = 0.7
    _set_generation_config(model, tok, GenerateConfig(num_beams=3, length_penalty=0.6))
    model.save_pretrained(tmp_path / "beams")
    g = GenerationConfig.from_pretrained(tmp_path / "beams")
    assert (g.num_beams, g.length_penalty, g.do_sample, g.temperature) == (3, 0.6, False, None)
    assert g.repetition_penalty == 1.05 and g.eos_token_id == tok.eos_token_id
    _set_generation_config(model, tok, GenerateConfig(do_sample=True, temperature=0.5, top_k=0, top_p=0.9))
    model.save_pretrained(tmp_path / "sampled")
    g = GenerationConfig.from_pretrained(tmp_path / "sampled")
    assert (g.do_sample, g.temperature, g.top_k, g.top_p, g.num_beams, g.length_penalty) == (True, 0.5, 0, 0.9, 1, None)


def test_a_model_folders_tokenizer_loads_as_the_run_trained_it(run_dir, tmp_path):
    """A scratch model's folder (a training stage's, an export's) holds the run's BPE tokenizer beside a Qwen2
    config.json; loaded as the run loads its own, not as transformers' Qwen2 tokenizer, whose pre-tokenizer splits
    numbers digit by digit: prompts with numbers would tokenize unlike the run's and translate differently."""
    from distillmt.models import load_tokenizer

    run_tok = load_tokenizer(str(run_dir / "tokenizer"))
    folder = export_system(run_dir, "STUDENT", tmp_path / "hf")
    text = "He paid $500 at 9:00 on day 20."
    for where in (run_dir / "train_student" / "model", folder):
        tok = load_tokenizer(str(where))
        assert type(tok) is type(run_tok), where
        pre = tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)
        assert pre == run_tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text), where
        assert tok(text)["input_ids"] == run_tok(text)["input_ids"], where
    assert "PreTrainedTokenizerFast.from_pretrained(THIS_FOLDER)" in (folder / "README.md").read_text()
