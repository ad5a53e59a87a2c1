"""Benchmarks that print a table of ratios measured side by side in one run (``distillmt bench``).

``generate``: sentences/s of one model translating the same sentences one at a time, in batches, in batches under a
token budget, and with CTranslate2 float32 and int8 (when installed).

``flops``: achieved FLOP/s of a LoRA training step of a real model against the machine's measured matmul peak.

``loss``: one forward + backward of the output layers and the KD loss, from the last hidden states (default:
vocabulary 151,936, batch × sequence 8 × 256, bf16, half the positions targets, a LoRA-style frozen student output
layer with Qwen2.5-0.5B's hidden size 896 and a teacher with Qwen2.5-1.5B's 1,536), for a full-vocabulary
implementation written the obvious way, TRL's ``GKDTrainer.generalized_jsd_loss`` (when ``trl`` is installed;
beta=0, i.e. forward KL) on the same full logits, ``distillmt.losses.kd_loss`` and ``fused_kd_loss`` on the logits of
the target rows (what training computes), and ``fused_linear_kd_loss``, which never holds the logits. Each runs in
its own child process, so its peak memory is its own: the process's peak resident memory (``VmHWM``, reset after
the inputs are built) minus its resident memory at that point. Time is the median of a few calls after one warm-up
call.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

from distillmt.engines import cpu_name
from distillmt.errors import DistillmtError

IMPLEMENTATIONS = {
    "naive": "full-vocabulary fp32 at every position (the obvious implementation)",
    "trl": "TRL `GKDTrainer.generalized_jsd_loss` (beta=0, forward KL) at every position",
    "kd_loss": "distillmt `kd_loss` on the target rows' logits (autograd, checkpointed chunks)",
    "fused": "distillmt `fused_kd_loss` on the target rows' logits (closed-form gradient)",
    "fused_linear": "distillmt `fused_linear_kd_loss` from the hidden states (logits never held)",
}
STUDENT_HIDDEN, TEACHER_HIDDEN = 896, 1536  # Qwen2.5-0.5B and -1.5B


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _loss_fn(impl: str, temperature: float, chunk_size: int) -> Any:
    """``fn(h_s, w_s, h_t, w_t, labels) -> loss``: the output layers and the loss, as each implementation does it."""
    import torch
    import torch.nn.functional as F

    from distillmt.losses import fused_kd_loss, fused_linear_kd_loss, kd_loss

    def full_logits(h_s, w_s, h_t, w_t):
        with torch.no_grad():
            t = h_t[:, :-1] @ w_t.T
        return h_s[:, :-1] @ w_s.T, t

    def rows(h_s, w_s, h_t, w_t, labels):
        mask = labels[:, 1:] != -100
        with torch.no_grad():
            t = h_t[:, :-1][mask] @ w_t.T
        return h_s[:, :-1][mask], t, labels[:, 1:][mask]

    def naive(h_s, w_s, h_t, w_t, labels):
        s, t = full_logits(h_s, w_s, h_t, w_t)
        logq = F.log_softmax(s.float() / temperature, dim=-1)
        logp = F.log_softmax(t.float() / temperature, dim=-1)
        mask = labels[:, 1:] != -100
        return ((logp.exp() * (logp - logq)).sum(-1) * mask).sum() / mask.sum()

    def trl(h_s, w_s, h_t, w_t, labels):
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from trl.experimental.gkd.gkd_trainer import GKDTrainer

        s, t = full_logits(h_s, w_s, h_t, w_t)
        return GKDTrainer.generalized_jsd_loss(s, t, labels[:, 1:], beta=0.0, temperature=temperature)

    weights = {"ce_weight": 0.5, "kd_weight": 0.5 * temperature**2}

    def ours(h_s, w_s, h_t, w_t, labels):
        h, t, ids = rows(h_s, w_s, h_t, w_t, labels)
        out = kd_loss(h @ w_s.T, t, ids, temperature=temperature, chunk_size=chunk_size)
        return weights["ce_weight"] * out["ce"] + weights["kd_weight"] * out["kd"]

    def fused(h_s, w_s, h_t, w_t, labels):
        h, t, ids = rows(h_s, w_s, h_t, w_t, labels)
        return fused_kd_loss(h @ w_s.T, t, ids, temperature=temperature, chunk_size=chunk_size, **weights)["loss"]

    def fused_linear(h_s, w_s, h_t, w_t, labels):
        mask = labels[:, 1:] != -100
        h, ht, ids = h_s[:, :-1][mask], h_t[:, :-1][mask], labels[:, 1:][mask]
        return fused_linear_kd_loss(h, w_s, ht, w_t, ids, temperature=temperature, chunk_size=chunk_size, **weights)[
            "loss"
        ]

    return {"naive": naive, "trl": trl, "kd_loss": ours, "fused": fused, "fused_linear": fused_linear}[impl]


def _child(
    impl: str, vocab: int, batch: int, seq: int, dtype: str, chunk_size: int, repeats: int, threads: int
) -> None:
    """Measure one implementation in this (fresh) process and print a JSON line."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    h_s = torch.randn(batch, seq, STUDENT_HIDDEN, dtype=dt).requires_grad_(True)
    w_s = torch.randn(vocab, STUDENT_HIDDEN, dtype=dt).mul_(STUDENT_HIDDEN**-0.5 * 2)
    h_t = torch.randn(batch, seq, TEACHER_HIDDEN, dtype=dt)
    w_t = torch.randn(vocab, TEACHER_HIDDEN, dtype=dt).mul_(TEACHER_HIDDEN**-0.5 * 2)
    labels = torch.randint(0, vocab, (batch, seq))
    labels[:, : seq // 2] = -100  # the prompt half: no targets
    fn = _loss_fn(impl, 2.0, chunk_size)
    fn(h_s, w_s, h_t, w_t, labels).backward()  # warm-up (and imports)
    h_s.grad = None
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak to the current resident memory
        f.write("5")
    base = _status_kb("VmRSS")
    times, value = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        loss = fn(h_s, w_s, h_t, w_t, labels)
        loss.backward()
        times.append(time.perf_counter() - start)
        value = float(loss)
        h_s.grad = None
    peak = _status_kb("VmHWM") - base
    print(json.dumps({"impl": impl, "seconds": statistics.median(times), "peak_mb": peak / 1024, "value": value}))


def bench_loss(
    *, vocab: int = 151936, batch: int = 8, seq: int = 256, dtype: str = "bfloat16", chunk_sizes=(1024, 256),
    repeats: int = 3, threads: int = 0,
) -> str:  # fmt: skip
    """Run every implementation (ours at each chunk size) in a child process; returns the markdown report."""
    from distillmt.engines import available_cores
    from distillmt.losses import rows_per_chunk

    threads = threads or available_cores()
    runs: list[tuple[str, int]] = [("naive", 0), ("trl", 0)] + [
        (i, c) for c in chunk_sizes for i in ("kd_loss", "fused", "fused_linear")
    ]
    results = []
    for impl, chunk in runs:
        args = [sys.executable, "-m", "distillmt.bench", impl, str(vocab), str(batch), str(seq), dtype, str(chunk)]
        proc = subprocess.run([*args, str(repeats), str(threads)], capture_output=True, text=True)
        if proc.returncode != 0:
            reason = (proc.stderr.strip().splitlines() or ["failed"])[-1][:120]
            results.append({"impl": impl, "chunk": chunk, "error": reason})
            continue
        results.append({**json.loads(proc.stdout.strip().splitlines()[-1]), "chunk": chunk})
    base = next(r for r in results if r["impl"] == "naive" and "error" not in r)
    lines = [
        f"# KD loss from the last hidden states: output layers + loss, forward + backward, vocabulary {vocab:,}, "
        f"batch × sequence {batch} × {seq}, {dtype}, half the positions targets",
        "",
        "| implementation | chunk (rows per chunk) | seconds per call | time vs naive | peak extra memory (MB) | memory vs naive | "
        "value |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        name = IMPLEMENTATIONS[r["impl"]]
        chunk = f"{r['chunk']} ({rows_per_chunk(vocab, r['chunk'])})" if r["chunk"] else "–"
        if "error" in r:
            lines.append(f"| {name} | {chunk} | not measured: {r['error']} | | | | |")
            continue
        lines.append(
            f"| {name} | {chunk} | {r['seconds']:.2f} | {r['seconds'] / base['seconds']:.2f}× | {r['peak_mb']:.0f} | "
            f"{r['peak_mb'] / base['peak_mb']:.2f}× | {r['value']:.4f} |"
        )
    lines += [
        "",
        "The values differ by design: naive and TRL compute forward KL alone, distillmt's rows the training "
        "objective 0.5·CE + 0.5·T²·KL (T = 2) with CE and the true forward KL from the same pass. Every row starts "
        f"from the same bf16 hidden states (student {STUDENT_HIDDEN}, teacher {TEACHER_HIDDEN} wide) and frozen "
        "output weights, as with LoRA, and its time includes both output layers; the gradient flows to the student's "
        "hidden states. The chunk is `soft_kd.chunk_size`; rows per chunk is what the memory budget "
        "(`distillmt.losses.CHUNK_BUDGET_BYTES`) leaves of it at this vocabulary. Peak extra memory: the child "
        "process's peak resident memory during the timed calls minus its resident memory before them (inputs built, "
        "one warm-up call done).",
        "",
        f"Machine: {cpu_name()}, {platform.platform()}, {os.cpu_count()} CPUs, {threads} torch threads, Python "
        f"{platform.python_version()}. {repeats} timed calls each (median), after one warm-up call.",
        "",
    ]
    return "\n".join(lines)


def generate_sources(path: str | None, n: int) -> list[str]:
    """The first ``n`` sources of ``path`` (plain text or JSONL with 'src'; ``-`` reads stdin), or without a path
    ``n`` English sources of the Tatoeba corpus the default experiment uses (a seeded draw, the same every time)."""
    from distillmt.data import load_pairs, read_sources, split_pairs

    if path is None:
        pairs, _ = load_pairs("tatoeba")
        sources = [p.src for p in split_pairs(pairs, train_size=n, valid_size=0, test_size=0, seed=0)["train"]]
    else:
        sources = [r["src"] for r in read_sources(path)][:n]
    if not sources:
        raise DistillmtError(f"bench generate: {'<stdin>' if path == '-' else path} holds no sources to translate")
    return sources


def bench_generate(
    model: str,
    sources: list[str],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 32,
    threads: int = 0,
    dtype: str = "auto",
) -> str:
    """Sentences/s translating ``sources`` with ``model`` (a folder or store:NAME), greedy: one sentence at a time,
    batched, batched with the shared prompt prefix (a chat template's) run in every row instead of once, batched
    under a token budget, and with CTranslate2 (float32 and int8) when it is installed; the same sentences in one
    process, one after another. Returns the markdown report."""
    import tempfile

    import torch

    from distillmt.engines import available_cores
    from distillmt.generate import convert_to_ct2, translate, translate_ct2
    from distillmt.models import load_model, load_tokenizer, pick_dtype
    from distillmt.sections import GenerateConfig

    if not sources:  # sentences per second of nothing
        raise DistillmtError("bench generate needs at least one source sentence")
    threads = threads or available_cores()
    torch.set_num_threads(threads)
    tokenizer = load_tokenizer(model)
    device = torch.device("cpu")
    hf = load_model(model, dtype=pick_dtype(dtype, device, scratch=False), device=device)
    one = GenerateConfig(batch_size=1, max_new_tokens=max_new_tokens)
    batched = GenerateConfig(batch_size=batch_size, max_new_tokens=max_new_tokens)
    budget = GenerateConfig(batch_size=batch_size, max_new_tokens=max_new_tokens, max_batch_tokens=4096)
    runs = {
        "hf, one sentence at a time": lambda: translate(hf, tokenizer, sources, one, progress=False),
        f"hf, batches of {batch_size}": lambda: translate(hf, tokenizer, sources, batched, progress=False),
        f"hf, batches of {batch_size}, shared prompt prefix run in every row": lambda: translate(
            hf, tokenizer, sources, batched, share_prefix=False, progress=False
        ),
        f"hf, batches of {batch_size} within 4,096 tokens": lambda: translate(
            hf, tokenizer, sources, budget, progress=False
        ),
    }
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for q in ("float32", "int8"):
                folder = convert_to_ct2(hf, tokenizer, f"{tmp}/{q}", q)
                runs[f"ct2 {q}, batches of {batch_size}"] = lambda f=folder: translate_ct2(
                    str(f), tokenizer, sources, batched, progress=False
                )
        except Exception as e:  # CTranslate2 missing or unable to convert this model: said in the table
            runs[f"ct2: not measured ({type(e).__name__}: {str(e).splitlines()[0][:80]})"] = None
        results = {name: (fn() if fn else None) for name, fn in runs.items()}
    base = results["hf, one sentence at a time"]
    dtype = str(next(hf.parameters()).dtype)[6:]
    lines = [
        f"# Generation: {len(sources)} sentences, greedy, at most {max_new_tokens} new tokens, {model} ({dtype} for hf)",
        "",
        "| engine and batching | sentences/s | tokens/s | vs one at a time | same output as hf one at a time |",
        "|---|---|---|---|---|",
    ]
    for name, res in results.items():
        if res is None:
            lines.append(f"| {name} | | | | |")
            continue
        sps = len(sources) / res.seconds
        same = sum(a == b for a, b in zip(res.hypotheses, base.hypotheses, strict=True))
        lines.append(
            f"| {name} | {sps:.1f} | {res.tokens_per_second:.0f} | {sps / (len(sources) / base.seconds):.2f}× | "
            f"{same}/{len(sources)} |"
        )
    lines += ["", f"Machine: {cpu_name()}, {platform.platform()}, {os.cpu_count()} CPUs, {threads} torch threads.", ""]
    return "\n".join(lines)


TRAINERS = {
    "trl": "TRL `GKDTrainer` (lmbda=0, beta=0: forward KL against the live teacher)",
    "trl_grouped": "TRL `GKDTrainer`, length-grouped batches (`train_sampling_strategy=group_by_length`)",
    "live_unshared": "distillmt `train`, the shared prompt prefix run for every example (`share_prefix=False`)",
    "live": "distillmt `train` (SLKD, live teacher, output layers at target rows, shared prompt prefix run once)",
    "live_alpha": "distillmt `train`, alpha=0.5 (0.5·CE + 0.5·KL; TRL has no CE mix)",
    "fused": "distillmt `train` (SLKD, live teacher, `soft_kd.fused`: fused-linear, logits never held)",
    "cache": "distillmt `train` (SLKD, teacher top-64 cache built beforehand, not timed)",
}


def _bench_models(spec: dict[str, Any], tok: Any) -> tuple[Any, Any]:
    """The teacher and student of a ``bench train`` child: the default experiment's shapes at the tokenizer's whole
    vocabulary (randomly initialised, fp32), or real models (``spec["student"]`` and ``spec["teacher"]``, in
    ``spec["dtype"]``) with a LoRA student, as in the real study."""
    import torch

    from distillmt.models import apply_lora, build_scratch_model, load_model

    if spec.get("student"):
        dtype, cpu = getattr(torch, spec["dtype"]), torch.device("cpu")
        from distillmt.sections import QWEN_LORA_TARGETS

        teacher = load_model(spec["teacher"], dtype=dtype, device=cpu).eval()
        student = load_model(spec["student"], dtype=dtype, device=cpu)
        torch.manual_seed(0)  # the LoRA weights: the same for every trainer
        student = apply_lora(student, r=16, alpha=32, dropout=0.05, target_modules=list(QWEN_LORA_TARGETS))
        return teacher, student
    shape = {"num_heads": 4, "num_kv_heads": 2, "max_positions": 200}
    teacher = build_scratch_model(tok, hidden_size=224, num_layers=4, intermediate_size=640, seed=1, **shape).eval()
    student = build_scratch_model(tok, hidden_size=64, num_layers=1, intermediate_size=192, seed=0, **shape)
    return teacher, student


def _train_trl(student: Any, teacher: Any, tok: Any, pairs: list, examples: list[dict], tmp: str, spec: dict) -> float:
    """TRL's GKD trainer (lmbda=0, beta=0) on the same token ids as distillmt's examples; returns the seconds of
    ``trainer.train()`` (its setup is not timed)."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from distillmt.prompts import build_prompt

    rows = []
    for p, e in zip(pairs, examples, strict=True):
        mask = [int(y != -100) for y in e["labels"]]
        rows.append({"prompt": build_prompt(tok, p.src), "input_ids": e["input_ids"], "completion_mask": mask})
    sampling = "group_by_length" if spec["impl"] == "trl_grouped" else "random"
    args = GKDConfig(
        output_dir=f"{tmp}/trl", per_device_train_batch_size=spec["batch"], max_steps=spec["steps"],
        learning_rate=spec["lr"], lr_scheduler_type="constant", lmbda=0.0, beta=0.0, save_strategy="no",
        report_to="none", use_cpu=True, logging_steps=spec["steps"], dataloader_num_workers=0, disable_tqdm=True,
        seed=0, train_sampling_strategy=sampling,
        # GKDConfig's defaults differ from the other rows: T = 0.9, bf16 autocast and gradient checkpointing (which
        # recomputes the forward); set as distillmt's rows run, so both do the same work in the same precision
        temperature=1.0, bf16=False, gradient_checkpointing=False,
    )  # fmt: skip
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, processing_class=tok,
                         train_dataset=Dataset.from_list(rows))  # fmt: skip
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start


def _train_child(spec: dict[str, Any]) -> None:
    """Train one student for ``spec["steps"]`` steps in this (fresh) process and print a JSON line: wall seconds of
    the training itself, target tokens seen, peak resident memory."""
    import tempfile

    import torch

    from distillmt.data import load_pairs, split_pairs
    from distillmt.forward import PrefixCache, shared_prefix
    from distillmt.models import load_tokenizer
    from distillmt.prompts import encode_example
    from distillmt.sections import SoftKDConfig, TrainConfig
    from distillmt.train import Objective, train

    impl = spec["impl"]
    torch.set_num_threads(spec["threads"])
    tok = load_tokenizer(spec["tokenizer"])
    pairs, _ = load_pairs("tatoeba")
    pairs = split_pairs(pairs, train_size=spec["pairs"], valid_size=0, test_size=0, seed=0)["train"]
    examples = [encode_example(tok, p.src, p.tgt, max_source_tokens=160, max_target_tokens=64) for p in pairs]
    teacher, student = _bench_models(spec, tok)
    with torch.no_grad():  # loaded weights are mapped from disk lazily: page them in, or the first steps count them
        for p in (*teacher.parameters(), *student.parameters()):
            p.sum()
    n_targets = sum(sum(1 for y in e["labels"] if y != -100) for e in examples)
    with tempfile.TemporaryDirectory() as tmp:
        kd = SoftKDConfig(alpha=0.5 if impl == "live_alpha" else 0.0, temperature=1.0, divergence="forward_kl",
                          beta=0.0, chunk_size=1024, fused=impl == "fused")  # fmt: skip
        objective = Objective(kd, len(tok), teacher=teacher, teacher_prefix=PrefixCache(shared_prefix(examples)))
        if impl == "cache":
            from distillmt.logit_cache import build_teacher_cache

            objective.cache = build_teacher_cache(teacher, examples, f"{tmp}/cache", teacher_id="t", k=64,
                                                  temperature=1.0, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                                  progress=False)  # fmt: skip
            objective.teacher = None
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_kb("VmRSS")
        if impl.startswith("trl"):
            seconds = _train_trl(student, teacher, tok, pairs, examples, tmp, spec)
        else:
            start = time.perf_counter()
            budget = TrainConfig(max_steps=spec["steps"], batch_size=spec["batch"], lr=spec["lr"], schedule="constant",
                                 warmup_ratio=0.0, save_every=0)  # fmt: skip
            train(student, examples, [], f"{tmp}/ours", budget, objective, pad_token_id=tok.pad_token_id,
                  device="cpu", progress=False, share_prefix=impl != "live_unshared")  # fmt: skip
            seconds = time.perf_counter() - start
    peak = _status_kb("VmHWM") - base
    seen = n_targets * spec["steps"] * spec["batch"] / len(examples)  # the expected target tokens of the steps
    print(json.dumps({"impl": impl, "seconds": seconds, "target_tokens_per_s": seen / seconds, "peak_mb": peak / 1024}))


def bench_train(
    *, tokenizer: str = "store:qwen2.5-coder-0.5b-instruct", pairs: int = 512, steps: int = 30, batch: int = 8,
    threads: int = 0, student: str | None = None, teacher: str | None = None, dtype: str = "bfloat16",
) -> str:  # fmt: skip
    """KD training throughput: the same student, teacher and token ids through TRL's GKD trainer (random and
    length-grouped batches) and distillmt's loop (live teacher at alpha 0 and 0.5, fused, cached teacher), each in
    its own child process; returns the markdown report. Without ``student``/``teacher`` the models are the default
    experiment's shapes at ``tokenizer``'s vocabulary; with them, those real models (in ``dtype``, the student with
    LoRA r=16 on every projection) and the student's tokenizer."""
    from distillmt.engines import available_cores

    if bool(student) != bool(teacher):
        raise DistillmtError("bench train takes --student and --teacher together (real models), or neither")
    threads = threads or available_cores()
    real = bool(student)
    spec = {"tokenizer": student or tokenizer, "pairs": pairs, "steps": steps, "batch": batch, "threads": threads,
            "student": student, "teacher": teacher, "dtype": dtype, "lr": 2e-4 if real else 3e-3}  # fmt: skip
    results = []
    for impl in TRAINERS:
        proc = subprocess.run(
            [sys.executable, "-m", "distillmt.bench", "train", json.dumps({**spec, "impl": impl})],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            reason = (proc.stderr.strip().splitlines() or ["failed"])[-1][:160]
            results.append({"impl": impl, "error": reason})
            continue
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return _train_report(results, spec, real)


def _train_report(results: list[dict], spec: dict[str, Any], real: bool) -> str:
    base = next((r for r in results if r["impl"] == "trl" and "error" not in r), None)
    what = (
        f"{spec['teacher']} → {spec['student']} (LoRA), {spec['dtype']}" if real else f"tokenizer {spec['tokenizer']}"
    )
    lines = [
        f"# KD training throughput: {spec['steps']} steps of {spec['batch']} examples, {spec['pairs']} Tatoeba pairs, "
        f"{what}",
        "",
        "| trainer | seconds | target tokens/s | vs TRL | peak extra memory (MB) |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {TRAINERS[r['impl']]} | not measured: {r['error']} | | | |")
            continue
        ratio = f"{r['target_tokens_per_s'] / base['target_tokens_per_s']:.2f}×" if base else "–"
        lines.append(
            f"| {TRAINERS[r['impl']]} | {r['seconds']:.1f} | {r['target_tokens_per_s']:.0f} | {ratio} | "
            f"{r['peak_mb']:.0f} |"
        )
    models = (
        f"The models are {spec['teacher']} (teacher, frozen) and {spec['student']} (student, LoRA r=16 on the seven "
        f"projections, the same initial adapter weights in every row), loaded in {spec['dtype']}; "
        if real
        else "The models are the default experiment's shapes (teacher 224 wide, 4 layers; student 64 wide, 1 layer) "
        "with the tokenizer's whole vocabulary, randomly initialised, fp32; "
    )
    lines += [
        "",
        models + "every trainer gets the same token ids (prompt masked) and the same objective, forward "
        "KL(teacher‖student) at T = 1 with no CE term (TRL's GKD with lmbda=0, beta=0; distillmt's SLKD with alpha=0), "
        "except the alpha=0.5 row, which adds half CE. TRL batches examples at random (or, length-grouped, by its "
        "`LengthGroupedSampler`) and pads each batch to its longest; distillmt batches examples of similar length "
        "and, in the student and the live teacher, runs the prompt prefix every example shares (a chat template's "
        "system prompt and instruction) once per micro-batch instead of once per example. "
        "Target tokens/s: the target tokens of the steps' examples (their expected number) over the wall time of the "
        "training loop; setup and the cache build are not timed. Peak extra memory: the child's peak resident memory "
        "during training minus its memory before it (both models' weights already resident).",
        "",
        f"Machine: {cpu_name()}, {platform.platform()}, {os.cpu_count()} CPUs, {spec['threads']} torch threads, Python "
        f"{platform.python_version()}.",
        "",
    ]
    return "\n".join(lines)


def _matmul_peak(dtype: Any, sizes: tuple[int, ...] = (1024, 2048, 4096), repeats: int = 3) -> tuple[float, int]:
    """The machine's measured matmul peak in this dtype: the best FLOP/s of square n×n @ n×n products (median of
    ``repeats`` calls after a warm-up), and the n that reached it."""
    import torch

    best = (0.0, 0)
    for n in sizes:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        torch.mm(a, b)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - start)
        best = max(best, (2 * n**3 / statistics.median(times), n))
    return best


def bench_flops(
    *, model: str = "store:qwen2.5-coder-0.5b-instruct", batch: int = 8, steps: int = 3, threads: int = 0,
    dtype: str = "bfloat16", lora_r: int = 16, mixed_precision: str = "no", lora_dropout: float = 0.05,
    peak_sizes: tuple[int, ...] = (1024, 2048, 4096),
) -> str:  # fmt: skip
    """Achieved FLOP/s of a training step (forward, backward, AdamW) of ``model`` against this machine's measured
    matmul peak, and the step's time with each attention and AdamW implementation. The step is distillmt's
    (``train.loss_step``: CE, output layer at the target rows) on one batch of real Tatoeba examples, repeated, with
    LoRA (rank ``lora_r``) or, at ``lora_r=0``, every weight trained; ``mixed_precision="bf16"``: under bf16 autocast
    (the default teacher's setting: fp32 weights). FLOPs are counted by ``torch.utils.flop_counter`` during an
    untimed warm-up step; the timed steps run without the counter, the variants taking turns. Returns the markdown
    report."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from distillmt.data import load_pairs, split_pairs
    from distillmt.engines import available_cores
    from distillmt.forward import FP32_SDPA, register_fp32_sdpa, target_tokens
    from distillmt.models import apply_lora, count_parameters, load_model, load_tokenizer
    from distillmt.prompts import encode_example, pad_batch
    from distillmt.sections import QWEN_LORA_TARGETS
    from distillmt.train import loss_step, make_optimizer

    threads = threads or available_cores()
    torch.set_num_threads(threads)
    step_dtype = "bfloat16" if mixed_precision == "bf16" else dtype
    peaks = {name: _matmul_peak(getattr(torch, name), peak_sizes) for name in dict.fromkeys([step_dtype, "float32"])}
    tok = load_tokenizer(model)
    pairs = split_pairs(load_pairs("tatoeba")[0], train_size=batch, valid_size=0, test_size=0, seed=0)["train"]
    examples = [encode_example(tok, p.src, p.tgt, max_source_tokens=160, max_target_tokens=64) for p in pairs]
    inputs = pad_batch(examples, tok.pad_token_id)
    net = load_model(model, dtype=getattr(torch, dtype), device=torch.device("cpu"))
    modules = list(QWEN_LORA_TARGETS)  # the configs' default LoRA targets
    if lora_r:
        net = apply_lora(net, r=lora_r, alpha=2 * lora_r, dropout=lora_dropout, target_modules=modules)
    net.train()
    trainable = [p for p in net.parameters() if p.requires_grad]
    register_fp32_sdpa()  # variants: (attention, fused AdamW)
    variants = [(FP32_SDPA, True), ("sdpa", True), ("eager", True), ("sdpa", False)]
    optimizers = {
        True: make_optimizer(net, lr=2e-4, weight_decay=0.01),
        False: torch.optim.AdamW(trainable, foreach=False),
    }
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed_precision == "bf16")

    def step(attention: str, fused: bool) -> None:
        net.set_attn_implementation(attention)
        with autocast:
            loss_sum, _ = loss_step(net, inputs, examples, None)
        (loss_sum / target_tokens(inputs["labels"])).backward()
        optimizers[fused].step()
        optimizers[fused].zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter:
        step(*variants[0])
    flops, times = counter.get_total_flops(), {v: [] for v in variants}
    for v in variants:  # each variant's own warm-up (its optimizer state, its kernels)
        step(*v)
    for _ in range(steps):
        for v in variants:
            start = time.perf_counter()
            step(*v)
            times[v].append(time.perf_counter() - start)
    seconds = {v: statistics.median(t) for v, t in times.items()}
    achieved, n_params = flops / seconds[variants[0]], count_parameters(net)
    what = (
        f"LoRA r={lora_r} (dropout {lora_dropout:g}) on {len(modules)} projections" if lora_r else "all weights trained"
    )
    precision = f"{dtype} weights under bf16 autocast" if mixed_precision == "bf16" else dtype
    kind = "LoRA training step" if lora_r else "training step"
    lines = [
        f"# Achieved FLOP/s of a training step: {model}, {what}, {precision}",
        "",
        "| what | GFLOP | seconds | GFLOP/s | fraction of the matmul peak |",
        "|---|---|---|---|---|",
    ]
    for name, (peak, n) in peaks.items():
        lines.append(f"| matmul peak, {name} ({n}×{n} @ {n}×{n}) | {2 * n**3 / 1e9:.3g} | {2 * n**3 / peak:.3g} | "
                     f"{peak / 1e9:.3g} | 1.00 |")  # fmt: skip
    lines.append(
        f"| {kind} ({batch} examples, {int(inputs['attention_mask'].sum())} tokens, {inputs['input_ids'].shape[1]} "
        f"wide) | {flops / 1e9:.3g} | {seconds[variants[0]]:.3g} | {achieved / 1e9:.3g} | "
        f"{achieved / peaks[step_dtype][0]:.2f} of {step_dtype} |"
    )
    base = seconds[variants[-1]]
    lines += ["", "| attention | AdamW | seconds per step | vs SDPA with AdamW's loop |", "|---|---|---|---|"]
    for attention, fused in variants:
        label = "fused" if fused else "loop over parameters (CPU default)"
        name = "SDPA in fp32 (what `train` runs on a CPU)" if attention == FP32_SDPA else attention
        lines.append(f"| {name} | {label} | {seconds[(attention, fused)]:.3g} | "
                     f"{seconds[(attention, fused)] / base:.2f}× |")  # fmt: skip
    lines += _flops_notes(batch, n_params, steps, peak_sizes, threads)
    return "\n".join(lines)


def _flops_notes(batch: int, n_params: dict, steps: int, peak_sizes: tuple[int, ...], threads: int) -> list[str]:
    """What :func:`bench_flops` measured and on which machine, below its tables."""
    import torch

    return [
        "",
        f"The step: forward, backward and AdamW of distillmt's training step (`train.loss_step`: CE, output layer at "
        f"the target rows only) on one batch of {batch} Tatoeba examples in the model's prompt (padded to the "
        f"longest), repeated; {n_params['trainable']:,} of {n_params['total']:,} parameters trainable. GFLOP: "
        f"counted by `torch.utils.flop_counter.FlopCounterMode` (matmuls and attention, forward and backward) in an "
        f"untimed warm-up step; seconds: the median of {steps} timed steps of each variant, the four taking turns. "
        f"The first table's step is the first variant. The peak is the best of the "
        f"{', '.join(map(str, peak_sizes))}-wide square matmuls, median of 3 calls each.",
        "",
        f"Machine: {cpu_name()}, {platform.platform()}, {os.cpu_count()} CPUs, {threads} torch threads, torch {torch.__version__}.",
        "",
    ]


if __name__ == "__main__":
    if sys.argv[1] == "train":
        _train_child(json.loads(sys.argv[2]))
    else:
        impl, vocab, batch, seq, dtype, chunk, repeats, threads = sys.argv[1:9]
        _child(impl, int(vocab), int(batch), int(seq), dtype, int(chunk), int(repeats), int(threads))
