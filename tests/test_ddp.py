"""Data parallel training on 2 CPU processes (gloo, launched by torch.distributed.run as accelerate launch would):
each process trains on its share of every global batch, and losses and final weights match one process with the same
global batch."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    import torch
    sys.path.insert(0, {tests!r})
    from conftest import build_tiny_qwen
    from distillmt.engines import full_state_dict, leave_process_group
    from distillmt.models import save_trained
    from distillmt.sections import TrainConfig
    from distillmt.train import train

    out = Path(sys.argv[1])
    g = torch.Generator().manual_seed(0)
    examples, prefix = [], list(range(3, 13))  # a shared prompt prefix: each process runs it once per micro-batch
    for i in range(22):  # 22 examples, micro-batches of 4: the last one has 2, one per process
        p = torch.randint(3, 40, (3 + i % 3,), generator=g).tolist()
        t = torch.randint(3, 40, (2 + i % 4,), generator=g).tolist() + [1]
        examples.append({{"input_ids": prefix + p + t, "labels": [-100] * (len(prefix) + len(p)) + t}})
    model = build_tiny_qwen(40, pad_token_id=0)
    if os.environ.get("LORA"):
        from distillmt.models import apply_lora
        model = apply_lora(model, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
        torch.manual_seed(int(os.environ.get("RANK", "0")))  # each process its own adapter: rank 0's must win
        for n, p in model.named_parameters():
            if "lora_" in n:  # lora_B away from zero: the adapters change the outputs from the first step on
                torch.nn.init.normal_(p, std=0.1)
    budget = TrainConfig(max_steps=4, batch_size=4, grad_accum=2, lr=1e-2, warmup_ratio=0.0, schedule="constant",
                         save_every=2, log_every=1, mixed_precision=os.environ.get("MIXED_PRECISION", "auto"))
    summary = train(model, examples, examples[:3], out, budget, pad_token_id=0, progress=False, device="cpu")
    state = full_state_dict(model)  # under FSDP every process takes part in gathering the shards
    if int(os.environ.get("RANK", "0")) == 0:
        state = state or {{n: p.detach() for n, p in model.named_parameters()}}
        flat = torch.cat([state[n].flatten() for n, _ in model.named_parameters()]).tolist()
        save_trained(model, None, out / "model", state_dict=state)
        if os.environ.get("LORA"):  # the adapter alone, in its file's order
            from safetensors.torch import load_file
            saved = load_file(str(out / "model" / "adapter_model.safetensors"))
            flat_saved = torch.cat([saved[k].flatten() for k in sorted(saved)]).tolist()
        else:
            from transformers import AutoModelForCausalLM
            saved = AutoModelForCausalLM.from_pretrained(str(out / "model"))
            flat_saved = torch.cat([p.detach().flatten() for p in saved.parameters()]).tolist()
        result = {{"params": flat, "saved": flat_saved, "summary": summary}}
        (out / "result.json").write_text(json.dumps(result, default=str))
    leave_process_group()
    """
)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(tmp_path, name: str, processes: int, env: dict | None = None, check: bool = True) -> dict:
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT.format(tests=os.path.dirname(__file__)))
    out = tmp_path / name
    cmd = [sys.executable, str(script), str(out)]
    if processes > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={processes}",
            f"--master_port={_free_port()}",
            *cmd[1:],
        ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    if not check:
        return {"returncode": proc.returncode, "stderr": proc.stderr}
    # Gloo's worker threads now and then abort a process at its exit (seen here 3 times in about 20 runs before the
    # scripts closed the process group, once in 33 after; see pytorch/pytorch#179291). The main process writes the
    # result after the last collective, so where it exists every process has done its work.
    teardown = "terminate called without an active exception" in proc.stderr and (out / "result.json").exists()
    assert proc.returncode == 0 or teardown, proc.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    result["metrics"] = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return result


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    one, two = _run(tmp_path, "one", 1), _run(tmp_path, "two", 2)
    assert torch.allclose(torch.tensor(two["params"]), torch.tensor(one["params"]), atol=1e-5)
    losses = [(m["step"], m["loss"]) for m in one["metrics"] if "loss" in m]
    assert [(s, pytest.approx(v, rel=1e-5)) for s, v in losses] == [
        (m["step"], m["loss"]) for m in two["metrics"] if "loss" in m
    ]
    assert two["summary"]["tokens_seen"] == one["summary"]["tokens_seen"]  # summed over the processes
    assert (tmp_path / "two" / "checkpoints" / "step-0000004" / "state.json").exists()  # written once, by rank 0
    assert two["saved"] == two["params"]


# What `accelerate launch --config_file configs/accelerate/fsdp.yaml` puts in each process's environment.
FSDP_ENV = {
    "ACCELERATE_USE_FSDP": "true",
    "FSDP_VERSION": "2",
    "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
    "FSDP_RESHARD_AFTER_FORWARD": "true",
    "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT",
}


# What `accelerate launch --config_file configs/accelerate/deepspeed-zero2.yaml` puts in each process's environment.
DEEPSPEED_ENV = {
    "ACCELERATE_USE_DEEPSPEED": "true",
    "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2",
    "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "none",
    "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "none",
    "ACCELERATE_DEEPSPEED_ZERO3_INIT": "false",
}


ENGINES = {"fsdp": FSDP_ENV, "deepspeed": DEEPSPEED_ENV}


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize(
    ("engine", "lora"),
    [
        pytest.param("fsdp", False, id="fsdp-full"),
        pytest.param("fsdp", True, id="fsdp-lora"),
        # ZeRO-2 with whole weights: also covered by the bf16 checkpoint test below; ~50 s, so with -m slow
        pytest.param("deepspeed", False, id="deepspeed-full", marks=pytest.mark.slow),
        pytest.param("deepspeed", True, id="deepspeed-lora"),
    ],
)
def test_sharded_engines_on_two_processes_match_one_and_resume(tmp_path, engine, lora):
    """FSDP2 (each process holds half of every parameter) and DeepSpeed ZeRO-2 (half of the optimizer state and of
    the gradients; its engine steps inside backward) through accelerate on 2 CPU processes: the losses and the final
    weights match one process with the same global batch, for a full model and for LoRA adapters on a frozen base
    (initialised differently on each process: the main process's are taken, as DDP does); the saved model holds the
    whole weights (the saved adapter equals one process's). A run that lost its last checkpoint resumes from the one
    before (gathered by parameter name, written once, split again on load) on 3 processes and ends at the same
    weights, and so does one under the other engine; a run launched without either refuses that checkpoint instead of
    misreading it."""
    import shutil

    has_deepspeed = importlib.util.find_spec("deepspeed") is not None
    if engine == "deepspeed" and not has_deepspeed:
        pytest.skip("DeepSpeed is not installed")
    extra = {"LORA": "1"} if lora else {}
    one, run = _run(tmp_path, "one", 1, extra), _run(tmp_path, engine, 2, {**ENGINES[engine], **extra})
    assert torch.allclose(torch.tensor(run["params"]), torch.tensor(one["params"]), atol=1e-5)
    losses = [(m["step"], m["loss"]) for m in one["metrics"] if "loss" in m]
    assert [(s, pytest.approx(v, rel=1e-5)) for s, v in losses] == [
        (m["step"], m["loss"]) for m in run["metrics"] if "loss" in m
    ]
    if lora:
        assert torch.allclose(torch.tensor(run["saved"]), torch.tensor(one["saved"]), atol=1e-6)
        return
    assert run["saved"] == run["params"]
    ckpt = json.loads((tmp_path / engine / "checkpoints" / "step-0000004" / "state.json").read_text())
    assert ckpt["sharded"] is True

    def resume(name: str, processes: int, env: dict | None, check: bool = True) -> dict:
        shutil.copytree(tmp_path / engine, tmp_path / name)
        shutil.rmtree(tmp_path / name / "checkpoints" / "step-0000004")
        (tmp_path / name / "result.json").unlink()
        return _run(tmp_path, name, processes, env, check)

    other = {"fsdp": "deepspeed", "deepspeed": "fsdp"}[engine]
    for name, processes in (("resumed", 3), (other, 2)):  # on another number of processes; under the other engine
        if name == "deepspeed" and not has_deepspeed:
            continue
        resumed = resume(name, processes, ENGINES[engine if name == "resumed" else other])
        assert str(resumed["summary"]["resumed_from"]).endswith("step-0000002")
        assert torch.allclose(torch.tensor(resumed["params"]), torch.tensor(run["params"]), atol=1e-6)
    plain = resume("plain", 1, None, check=False)
    assert plain["returncode"] != 0 and "was written under FSDP or DeepSpeed" in plain["stderr"]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_deepspeed_bf16_checkpoints_hold_the_fp32_masters_and_resume_exactly(tmp_path):
    """Under DeepSpeed with bf16 the model computes with bf16 weights and the optimizer keeps fp32 masters: the
    checkpoint holds the masters (a bf16 copy would lose the small updates), and a run that lost its last checkpoint
    ends at exactly the weights and losses of the uninterrupted one."""
    import shutil

    from safetensors.torch import load_file

    pytest.importorskip("deepspeed")
    env = {**DEEPSPEED_ENV, "MIXED_PRECISION": "bf16"}
    run = _run(tmp_path, "bf16", 2, env)
    trainable = load_file(str(tmp_path / "bf16" / "checkpoints" / "step-0000004" / "trainable.safetensors"))
    assert {t.dtype for t in trainable.values()} == {torch.float32}
    shutil.copytree(tmp_path / "bf16", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-0000004")
    (tmp_path / "resumed" / "result.json").unlink()
    resumed = _run(tmp_path, "resumed", 2, env)
    assert str(resumed["summary"]["resumed_from"]).endswith("step-0000002")
    assert resumed["params"] == run["params"]
    assert [m.get("loss") for m in resumed["metrics"]] == [m.get("loss") for m in run["metrics"]]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_distillmt_run_on_two_processes(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2 -m distillmt run` on CPUs (accelerate starts the processes
    through torchrun; with no GPU, distillmt's Accelerator takes gloo): the main process keeps the books and prints
    the table, both processes train and share the label and translation work, and the rows match a one-process run.
    The same with the shipped FSDP config (`--config_file configs/accelerate/fsdp.yaml`): each process holds half of
    every parameter, and the saved models hold the whole weights (the same translations), GKD's on-policy sampling
    included; and with the DeepSpeed ZeRO-2 one, where DeepSpeed is installed."""
    from conftest import MICRO

    from distillmt.io import read_json

    args = [
        "run",
        "--no-progress",
        *MICRO,
        "systems=[TEACHER,STUDENT,HLKD,SLKD,GKD]",  # GKD: the student samples its own targets on every process
        "threads=1",
        f"output_dir={tmp_path}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2",
              "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no", f"--main_process_port={_free_port()}"]  # fmt: skip
    configs = os.path.join(os.path.dirname(__file__), "..", "configs", "accelerate")
    runs = {"one": [sys.executable], "two": launch}
    for name, config in (("fsdp", "fsdp.yaml"), ("deepspeed", "deepspeed-zero2.yaml")):
        if name != "deepspeed" or importlib.util.find_spec("deepspeed"):
            runs[name] = [*launch[:3], f"--config_file={os.path.join(configs, config)}", *launch[4:]]  # not --multi_gpu
    engines = {"one": "", "two": "under DDP", "fsdp": "under FSDP", "deepspeed": "under DeepSpeed ZeRO-2"}
    for name, cmd in runs.items():
        cmd = [*cmd, "-m", "distillmt", *args, f"name={name}"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert ("2 processes" in proc.stderr) == (name != "one")
        assert engines[name] in proc.stderr
        assert proc.stdout.count("run folder:") == 1  # printed by the main process alone
    one = read_json(tmp_path / "one" / "results.json")["systems"]
    for name in set(runs) - {"one"}:
        other = read_json(tmp_path / name / "results.json")["systems"]
        for system in one:
            hyps = [
                [
                    r["hyp"]
                    for r in map(json.loads, (tmp_path / n / f"translate_{system}" / "translations.jsonl").open())
                ]
                for n in ("one", name)
            ]
            assert sum(a == b for a, b in zip(*hyps, strict=True)) >= len(hyps[0]) - 1, (name, system)
            chrf = one[system]["scores"]["chrf"]["score"]
            assert other[system]["scores"]["chrf"]["score"] == pytest.approx(chrf, abs=1.0)
    logs = (tmp_path / "two" / "train_slkd" / "metrics.jsonl").read_text().splitlines()
    assert len([x for x in logs if '"valid_ce"' in x]) == 1  # written once, by the main process
    stage = read_json(tmp_path / "two" / "translate_HLKD" / "stage.json")["result"]
    assert stage["processes"] == 2  # the test set was split between the processes
    assert len(read_json(tmp_path / "two" / "teacher_labels" / "stage.json")["result"]["shards"]) == 3


GENERATION_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    import torch
    sys.path.insert(0, {tests!r})
    from conftest import build_tiny_qwen
    from distillmt.data import Pair
    from distillmt.engines import leave_process_group
    from distillmt.logit_cache import build_teacher_cache
    from distillmt.models import train_bpe_tokenizer
    from distillmt.pipeline import processes_state, translate_split
    from distillmt.sections import GenerateConfig, HardKDConfig
    from distillmt.teacher_labels import build_teacher_labels, read_label_pairs

    out = Path(sys.argv[1])
    processes = processes_state("cpu")
    words = "the cat sat on a mat and we saw it there every day".split()
    pairs = [Pair(" ".join(words[i % 5 : i % 5 + 2 + i % 7]), "") for i in range(23)]
    tok = train_bpe_tokenizer([p.src for p in pairs] * 5 + ["你好世界"] * 20, 300, out / "tok")
    model = build_tiny_qwen(len(tok), hidden_size=32, seed=2, pad_token_id=tok.pad_token_id).eval()
    decoding = GenerateConfig(batch_size=3, max_new_tokens=4, do_sample=True, temperature=1.5)
    result = build_teacher_labels(lambda: (model, tok), pairs, out / "labels",
                                  HardKDConfig(decoding=decoding, shard_size=4), identity={{"t": 1}},
                                  progress=False, processes=processes)
    test = translate_split(model, tok, pairs, out, decoding, processes, seed=5, progress=False)
    examples = []
    for p in pairs:
        ids = tok(p.src)["input_ids"] + [5, 6, 7]
        examples.append({{"input_ids": ids, "labels": [-100] * (len(ids) - 3) + [5, 6, 7]}})
    cache = build_teacher_cache(model, examples, out / "cache", teacher_id="t", k=5, temperature=2.0,
                                vocab_size=len(tok), shard_size=4, pad_token_id=tok.pad_token_id,
                                progress=False, processes=processes)
    lp, idx = cache.gather([e["input_ids"] for e in examples], [e["labels"] for e in examples], 40)
    if int(os.environ.get("RANK", "0")) == 0:
        labels = [p.tgt for p in read_label_pairs(out / "labels", result["shards"], 0.0, seed=0)]
        cached = {{"logprobs": lp.tolist(), "indices": idx.tolist(), "entries": len(cache)}}
        (out / "result.json").write_text(json.dumps({{"labels": labels, "result": result, "test": test,
                                                     "cache": cached}}))
    leave_process_group()
    """
)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_label_generation_and_translation_split_across_two_processes(tmp_path):
    """Label shards, test batches and teacher-cache shards are divided between 2 processes (each writes or
    translates its share, the main process merges in order or writes the manifest), and the labels, translations
    and cached top-k equal one process's, sampled labels included."""
    script = tmp_path / "ddp_generate.py"
    script.write_text(GENERATION_SCRIPT.format(tests=os.path.dirname(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}"]
    results = {}
    for name, cmd in (("one", [sys.executable]), ("two", launch)):
        proc = subprocess.run([*cmd, str(script), str(tmp_path / name)], env=env, capture_output=True, text=True,
                              timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[name] = json.loads((tmp_path / name / "result.json").read_text())
    one, two = results["one"], results["two"]
    assert len(one["labels"]) == 23 and len(set(one["labels"])) > 5  # sampled, varied
    assert two["labels"] == one["labels"] and two["result"]["shards"] == one["result"]["shards"]
    assert two["result"]["generated_tokens"] == one["result"]["generated_tokens"]  # summed over the processes
    assert (two["test"]["processes"], one["test"]["processes"]) == (2, 1)
    assert two["test"]["generated_tokens"] == one["test"]["generated_tokens"]
    rows = [(tmp_path / n / "translations.jsonl").read_text() for n in ("one", "two")]
    assert rows[0] == rows[1] and rows[0].count("\n") == 23
    assert two["cache"] == one["cache"] and one["cache"]["entries"] == 23  # the teacher cache, 6 shards of 4


@pytest.mark.parametrize(
    ("name", "kind"), [("multi-gpu", "MULTI_GPU"), ("fsdp", "FSDP"), ("deepspeed-zero2", "DEEPSPEED")]
)
def test_shipped_accelerate_configs_parse(name, kind):
    """The launch configs are accelerate's own format (its loader accepts them) and say how to use them."""
    from accelerate.commands.config.config_args import load_config_from_file

    path = os.path.join(os.path.dirname(__file__), "..", "configs", "accelerate", f"{name}.yaml")
    config = load_config_from_file(path)
    assert config.distributed_type.value == kind and config.num_processes >= 2 and not config.use_cpu
    if kind == "FSDP":  # the version the checkpoints handle, wrapping each decoder layer
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    if kind == "DEEPSPEED":  # the stage the checkpoints handle, with nothing offloaded
        assert config.deepspeed_config["zero_stage"] == 2
        assert config.deepspeed_config["offload_optimizer_device"] == "none"
    first = open(path, encoding="utf-8").readline()
    assert first.startswith(f"# accelerate launch --config_file configs/accelerate/{name}.yaml -m distillmt run")


def test_engines_the_checkpoints_cannot_handle_are_refused_before_training():
    """ZeRO-3 partitions the weights themselves, DeepSpeed's offload moves the optimizer behind a compiled op, and
    FSDP version 1 flattens the parameters: all refused with a clear error, naming the setting to change, instead of
    saving a partial model. ZeRO-1/2, FSDP2 and DDP go through."""
    from accelerate.utils import DistributedType

    from distillmt.engines import check_engine
    from distillmt.errors import DistillmtError

    def accelerator(kind, fsdp2=False, stage=2, offload="none"):
        plugin = type("P", (), {"zero_stage": stage, "offload_optimizer_device": offload, "offload_param_device": None})
        state = type("S", (), {"deepspeed_plugin": plugin})
        return type("A", (), {"distributed_type": kind, "is_fsdp2": fsdp2, "state": state})()

    with pytest.raises(DistillmtError, match="ZeRO stage 3 is not supported: set zero_stage: 2"):
        check_engine(accelerator(DistributedType.DEEPSPEED, stage=3))
    with pytest.raises(DistillmtError, match=r"DeepSpeed offload \(cpu\) is not supported"):
        check_engine(accelerator(DistributedType.DEEPSPEED, offload="cpu"))
    with pytest.raises(DistillmtError, match="set fsdp_version: 2"):
        check_engine(accelerator(DistributedType.FSDP))
    for ok in (
        accelerator(DistributedType.DEEPSPEED, stage=1),
        accelerator(DistributedType.DEEPSPEED),
        accelerator(DistributedType.FSDP, fsdp2=True),
        accelerator(DistributedType.MULTI_GPU),
    ):
        check_engine(ok)
