"""The training loop: gradient accumulation equals one big batch, resume equals an uninterrupted run, KD learns."""

import json

import pytest
import torch
from conftest import build_tiny_qwen, random_examples

import distillmt.forward as forward_mod
import distillmt.train as train_mod
from distillmt.sections import GKDConfig, SoftKDConfig, TrainConfig
from distillmt.train import Objective, loss_step, make_batches, train

VOCAB = 40


def tiny_model(seed: int = 0, hidden: int = 16, vocab: int = VOCAB):
    return build_tiny_qwen(vocab, hidden_size=hidden, seed=seed, pad_token_id=0)


def params(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


BUDGET = dict(lr=1e-2, warmup_ratio=0.0, schedule="constant", save_every=0, weight_decay=0.0)


def fit(model, ex, valid, out, objective=None, share_prefix=True, **budget):
    """``train`` with this file's budget (``budget`` overrides its TrainConfig keys) on the CPU."""
    cfg = TrainConfig(**{**BUDGET, **budget})
    return train(model, ex, valid, out, cfg, objective, pad_token_id=0, progress=False, device="cpu",
                 share_prefix=share_prefix)  # fmt: skip


@pytest.mark.unit
def test_make_batches_deterministic_and_complete():
    lengths = [5, 3, 8, 1, 9, 2, 7]
    a = make_batches(lengths, 3, seed=1, epoch=0)
    assert a == make_batches(lengths, 3, seed=1, epoch=0)
    assert a != make_batches(lengths, 3, seed=1, epoch=1) or a != make_batches(lengths, 3, seed=2, epoch=0)
    assert sorted(i for b in a for i in b) == list(range(len(lengths)))


@pytest.mark.unit
def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    # Sequences of different lengths: a mean of per-micro-batch means would differ from the token-weighted mean.
    ex = random_examples(8)
    big, acc = tiny_model(), tiny_model()
    fit(big, ex, [], tmp_path / "a", max_steps=1, batch_size=8, grad_accum=1, max_grad_norm=0)
    fit(acc, ex, [], tmp_path / "b", max_steps=1, batch_size=2, grad_accum=4, max_grad_norm=0)
    assert torch.allclose(params(big), params(acc), atol=1e-6)


def die_after_save(monkeypatch, n: int):
    """The n-th checkpoint save raises KeyboardInterrupt right after writing (a kill just after a checkpoint);
    returns the real save function to put back."""
    real_save = train_mod.save_checkpoint
    calls = {"n": 0}

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_die)
    return real_save


def test_resume_after_interrupt_equals_uninterrupted_run(tmp_path, monkeypatch):
    ex = random_examples(12)
    straight = tiny_model()
    fit(straight, ex, ex[:2], tmp_path / "straight", max_steps=6, batch_size=4)

    real_save = die_after_save(monkeypatch, 1)
    first = tiny_model()
    with pytest.raises(KeyboardInterrupt):
        fit(first, ex, ex[:2], tmp_path / "resumed", max_steps=6, batch_size=4, save_every=3)
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    assert (tmp_path / "resumed" / "checkpoints" / "step-0000003" / "state.json").exists()
    second = tiny_model(seed=123)  # a fresh process would start from other weights: the checkpoint must win
    summary = fit(second, ex, ex[:2], tmp_path / "resumed", max_steps=6, batch_size=4, save_every=3)
    assert summary["resumed_from"] == "step-0000003"
    assert torch.allclose(params(straight), params(second), atol=1e-6)
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)  # no duplicated log lines after resume


def test_logit_kd_moves_student_towards_teacher(tmp_path):
    ex = random_examples(8)
    teacher = tiny_model(seed=5, hidden=32)
    student = tiny_model(seed=1)
    kd = SoftKDConfig(alpha=0.0, temperature=1.0, divergence="forward_kl", beta=0.5, chunk_size=7)
    fit(student, ex, [], tmp_path / "kd", Objective(kd, VOCAB, teacher=teacher), max_steps=30, batch_size=8,
        log_every=1, lr=3e-2)  # fmt: skip
    logs = [json.loads(line) for line in (tmp_path / "kd" / "metrics.jsonl").read_text().splitlines()]
    fkl = [r["forward_kl"] for r in logs if "forward_kl" in r]
    assert fkl[-1] < 0.5 * fkl[0]


@pytest.mark.unit
def test_on_policy_kd_runs_and_logs(tmp_path):
    ex = random_examples(4)
    kd = SoftKDConfig(alpha=0.5, temperature=2.0, divergence="jsd", beta=0.5, chunk_size=64)
    gkd = GKDConfig(lmbda=1.0, max_new_tokens=4)
    objective = Objective(kd, VOCAB, teacher=tiny_model(seed=5), gkd=gkd, end_token_id=1)
    summary = fit(tiny_model(), ex, [], tmp_path / "gkd", objective, max_steps=2, batch_size=4, log_every=1)
    logs = [json.loads(line) for line in (tmp_path / "gkd" / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 2 and all(r["on_policy"] for r in logs if "on_policy" in r)


# --- loss_step: the one place where every method's micro-batch loss is computed ------------------------------------


def _batch(ex):
    from distillmt.prompts import pad_batch

    return pad_batch(ex, 0)


def _kd(fused: bool = False, **kw) -> Objective:
    kd = SoftKDConfig(alpha=0.3, temperature=2.0, divergence="forward_kl", beta=0.5, chunk_size=5, fused=fused)
    return Objective(kd, VOCAB, **kw)


@pytest.mark.unit
def test_loss_step_mixes_ce_and_divergence_once():
    from distillmt.losses import kd_loss

    ex = random_examples(4)
    batch = _batch(ex)
    student, teacher = tiny_model(seed=1), tiny_model(seed=5, hidden=32)
    n = int(batch["labels"][:, 1:].ne(-100).sum())
    s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    terms = kd_loss(s_logits, t_logits, batch["labels"], temperature=2.0)

    plain, parts = loss_step(student, batch, ex, None)
    assert plain.item() == pytest.approx(terms["ce"].item() * n, rel=1e-5) and set(parts) == {"ce"}
    mixed, parts = loss_step(student, batch, ex, _kd(teacher=teacher))
    assert mixed.item() == pytest.approx((0.3 * terms["ce"] + 0.7 * 4.0 * terms["kd"]).item() * n, rel=1e-5)
    assert set(parts) == {"ce", "kd", "forward_kl"}
    on_policy, _ = loss_step(student, batch, ex, _kd(teacher=teacher), on_policy=True)
    assert on_policy.item() == pytest.approx(4.0 * terms["kd"].item() * n, rel=1e-5)  # no reference, no CE


@pytest.mark.unit
def test_cached_teacher_with_full_vocab_gives_the_online_loss_for_a_padded_student(tmp_path):
    """The cache path renormalises the student over the real vocabulary like the online path: a student whose
    embedding matrix has padding rows gets the same loss from a top-k cache with k = vocabulary as from the teacher."""
    from distillmt.logit_cache import build_teacher_cache

    ex = random_examples(6)
    batch = _batch(ex)
    teacher = tiny_model(seed=5, hidden=32)
    student = tiny_model(seed=1, vocab=VOCAB + 8)  # 8 padding rows
    with torch.no_grad():  # sharpen both (random init is near uniform, so D would be tiny next to fp16 rounding)
        teacher.lm_head.weight.mul_(25.0)
        student.lm_head.weight.mul_(25.0)
        student.lm_head.weight[VOCAB:] = 3.0  # padding rows that would take real probability mass if counted
    cache = build_teacher_cache(
        teacher,
        ex,
        tmp_path / "cache",
        teacher_id="t",
        k=VOCAB,
        temperature=2.0,
        vocab_size=VOCAB,
        pad_token_id=0,
        progress=False,
    )
    online, online_parts = loss_step(student, batch, ex, _kd(teacher=teacher))
    cached, cached_parts = loss_step(student, batch, ex, _kd(cache=cache))
    assert cached_parts["ce"] == pytest.approx(online_parts["ce"], rel=1e-5)
    assert cached_parts["kd"] == pytest.approx(online_parts["kd"], rel=2e-3)  # fp16 cache, 1e-7 rest bucket
    assert cached.item() == pytest.approx(online.item(), rel=2e-3)


@pytest.mark.parametrize("damaged", ["trainable.safetensors", "state.json", "optimizer.pt"])
def test_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path, caplog, monkeypatch, damaged):
    ex = random_examples(12)
    straight = tiny_model()
    fit(straight, ex, [], tmp_path / "straight", max_steps=6, batch_size=4)
    args = dict(max_steps=6, batch_size=4, save_every=2)
    real_save = die_after_save(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_model(), ex, [], tmp_path / "run", **args)
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    ckpts = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))
    assert [p.name for p in ckpts] == ["step-0000002", "step-0000004"]
    broken = ckpts[-1] / damaged
    broken.write_bytes(broken.read_bytes()[:20])  # truncated by a full disk or a kill
    with (tmp_path / "run" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "lo')  # a line cut short by kill -9
    resumed = tiny_model(seed=9)
    summary = fit(resumed, ex, [], tmp_path / "run", **args)
    assert summary["resumed_from"] == "step-0000002"
    assert "step-0000004 is damaged" in caplog.text
    assert torch.allclose(params(straight), params(resumed), atol=1e-6)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines)


def test_no_usable_checkpoint_restarts_the_stage_and_says_so(tmp_path, caplog):
    ex = random_examples(8)
    straight = tiny_model()
    fit(straight, ex, [], tmp_path / "straight", max_steps=3, batch_size=4)
    ckpt = tmp_path / "run" / "checkpoints" / "step-0000002"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text("{not json")
    restarted = tiny_model()
    summary = fit(restarted, ex, [], tmp_path / "run", max_steps=3, batch_size=4)
    assert summary["resumed_from"] is None and "starts again from step 0" in caplog.text
    assert torch.allclose(params(straight), params(restarted), atol=1e-6)


@pytest.mark.unit
def test_nan_loss_stops_with_the_step_and_last_checkpoint(tmp_path):
    from distillmt.errors import DistillmtError

    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    with pytest.raises(DistillmtError, match=r"training loss is nan at step 1.*last good checkpoint: none"):
        fit(model, random_examples(4), [], tmp_path / "nan", max_steps=2, batch_size=4)


@pytest.mark.unit
@pytest.mark.parametrize("on_policy", [False, True])
@pytest.mark.parametrize("lora", [False, True])
def test_fused_loss_step_equals_the_autograd_one(on_policy, lora):
    """soft_kd.fused (here from the last hidden states: both output layers are plain) gives the loss, logged parts
    and gradients of the autograd path, for a fully trained student (its output weight gets a gradient too) and a
    LoRA one (frozen output layer)."""
    from peft import LoraConfig, get_peft_model

    ex = random_examples(4)
    batch = _batch(ex)
    teacher = tiny_model(seed=5, hidden=32)
    grads = []
    for fused in (False, True):
        student = tiny_model(seed=1)
        if lora:
            torch.manual_seed(0)
            student = get_peft_model(
                student, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
            )
        loss, parts = loss_step(student, batch, ex, _kd(teacher=teacher, fused=fused), on_policy=on_policy)
        loss.backward()
        trained = [p for p in student.parameters() if p.requires_grad]
        grads.append((loss.item(), parts, torch.cat([p.grad.flatten() for p in trained])))
    (l0, p0, g0), (l1, p1, g1) = grads
    assert l1 == pytest.approx(l0, rel=1e-5)
    assert p1 == pytest.approx(p0, rel=1e-5)
    assert torch.allclose(g1, g0, rtol=1e-4, atol=1e-7)


@pytest.mark.unit
def test_token_budget_batches():
    from distillmt.generate import token_budget_batches

    lengths = [10, 9, 9, 4, 3, 3, 3, 2]
    order = list(range(8))  # longest first, as translate sorts them
    assert token_budget_batches(order, lengths, 4, 0) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # no budget: by count
    # budget 40 tokens, 2 new tokens per row: rows of width 10+2 fit three to a batch, rows of width 4+2 five
    assert token_budget_batches(order, lengths, 8, 40, (2, 1)) == [[0, 1, 2], [3, 4, 5, 6, 7]]
    assert token_budget_batches(order, lengths, 4, 40, (2, 1)) == [[0, 1, 2], [3, 4, 5, 6], [7]]  # and the count
    # two beams double every row: (10+2)*2 = 24 fits once in 40
    assert token_budget_batches(order, lengths, 8, 40, (2, 2)) == [[0], [1], [2], [3, 4, 5], [6, 7]]
    assert token_budget_batches([0], [100], 8, 10, (2, 1)) == [[0]]  # over the budget alone: still translated


@pytest.mark.unit
def test_target_logits_are_the_full_logits_at_target_rows():
    """The output layer run at target positions alone gives the full forward's logits there, for a plain model and
    a LoRA-wrapped one, and the hook is gone afterwards (a later forward returns every position)."""
    from peft import LoraConfig, get_peft_model

    from distillmt.forward import target_logits, target_positions

    ex = random_examples(5)
    batch = _batch(ex)
    rows = target_positions(batch["labels"])
    assert rows.sum() == int(batch["labels"][:, 1:].ne(-100).sum()) and not rows[:, -1].any()
    lora = get_peft_model(tiny_model(seed=3), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for model in (tiny_model(seed=2), lora):
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = target_logits(model, batch, rows)
        assert got.shape == (int(rows.sum()), VOCAB)
        assert torch.allclose(got, full[rows], atol=1e-6)
        again = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert again.shape == full.shape


@pytest.mark.unit
def test_target_hidden_skips_the_output_layer_and_matches_its_input():
    from distillmt.forward import target_hidden, target_positions

    ex = random_examples(5)
    batch = _batch(ex)
    rows = target_positions(batch["labels"])
    model = tiny_model(seed=2)
    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    h, w = target_hidden(model, batch, rows)
    assert w is model.lm_head.weight and h.shape == (int(rows.sum()), 16)
    assert torch.allclose(h, full.hidden_states[-1][rows], atol=1e-6)
    assert torch.allclose(h @ w.T, full.logits[rows], atol=1e-5)
    assert model(input_ids=batch["input_ids"]).logits.shape == full.logits.shape  # the hook is gone


def test_stages_of_one_process_may_train_at_different_precisions(tmp_path):
    """A bf16-autocast teacher then an fp32 student in one process (accelerate keeps one precision per process and
    refused the second); the fp32 stage after the bf16 one gives what it gives alone."""
    ex = random_examples(8)
    alone = tiny_model()
    fit(alone, ex, [], tmp_path / "alone", max_steps=2, batch_size=4, mixed_precision="no")
    bf16, fp32 = tiny_model(seed=1), tiny_model()
    fit(bf16, ex, [], tmp_path / "bf16", max_steps=2, batch_size=4, mixed_precision="bf16")
    from accelerate.state import AcceleratorState

    assert AcceleratorState().mixed_precision == "bf16"
    fit(fp32, ex, [], tmp_path / "fp32", max_steps=2, batch_size=4, mixed_precision="no")
    assert AcceleratorState().mixed_precision == "no"
    assert torch.equal(params(fp32), params(alone))


def _prefixed(n: int = 5, prefix_len: int = 10) -> list[dict]:
    """Examples that all start with the same prompt prefix (a chat template's system prompt and instruction)."""
    prefix = list(range(3, 3 + prefix_len))
    return [
        {"input_ids": prefix + e["input_ids"], "labels": [-100] * prefix_len + e["labels"]} for e in random_examples(n)
    ]


@pytest.mark.unit
def test_shared_prefix_stops_before_the_first_target_row():
    from distillmt.forward import MIN_SHARED_PREFIX, shared_prefix

    ex = _prefixed(prefix_len=10)
    assert shared_prefix(ex) == ex[0]["input_ids"][: len(shared_prefix(ex))]
    assert 10 <= len(shared_prefix(ex)) < min(next(i for i, y in enumerate(e["labels"]) if y != -100) for e in ex)
    same = [dict(ex[0]) for _ in range(3)]  # identical examples: the prefix still ends before the target's row
    first_target = next(i for i, y in enumerate(same[0]["labels"]) if y != -100)
    assert len(shared_prefix(same)) == first_target - 1
    assert shared_prefix(_prefixed(prefix_len=MIN_SHARED_PREFIX - 2)) == []  # too short to be worth a cache
    assert shared_prefix(random_examples(5)) == []  # nothing shared: no cache


@pytest.mark.parametrize("fused", [False, True])
def test_teacher_prefix_cache_gives_the_same_loss_and_gradient(fused):
    """The live teacher run after its cached shared prefix gives the same loss and student gradient as the whole
    forward, the prefix's keys and values are computed once, and a batch that does not start with it falls back."""
    from distillmt.forward import PrefixCache, shared_prefix

    ex = _prefixed(5)
    batch = _batch(ex)
    teacher = tiny_model(seed=5, hidden=32).eval()
    results = []
    for prefix in ([], shared_prefix(ex)):
        student = tiny_model(seed=1)
        kd = _kd(teacher=teacher, fused=fused, teacher_prefix=PrefixCache(prefix))
        loss, parts = loss_step(student, batch, ex, kd)
        loss.backward()
        results.append((loss.item(), parts, torch.cat([p.grad.flatten() for p in student.parameters()]), kd))
    (l0, p0, g0, _), (l1, p1, g1, kd) = results
    assert kd.teacher_prefix.kv is not None and len(kd.teacher_prefix.kv) == teacher.config.num_hidden_layers
    assert l1 == pytest.approx(l0, rel=1e-5) and p1 == pytest.approx(p0, rel=1e-5)
    assert torch.allclose(g1, g0, rtol=1e-4, atol=1e-7)
    cached = kd.teacher_prefix.kv
    loss_step(tiny_model(seed=1), batch, ex, kd)
    assert kd.teacher_prefix.kv is cached  # computed once
    other = random_examples(4)  # rows that do not start with the prefix: the whole forward, the same loss as without
    plain, _ = loss_step(tiny_model(seed=1), _batch(other), other, _kd(teacher=teacher, fused=fused))
    with_prefix, _ = loss_step(tiny_model(seed=1), _batch(other), other, kd)
    assert with_prefix.item() == pytest.approx(plain.item(), rel=1e-6)


def _lora_student(seed: int = 1):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(tiny_model(seed=seed), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))


@pytest.mark.parametrize("method", ["ce", "kd", "fused", "lora_ce", "lora_fused"])  # every path of loss_step
def test_student_prefix_run_once_gives_the_same_loss_and_gradient(method):
    """The student's shared prefix run once for the micro-batch (with gradients, its weights being trained) gives
    the loss and gradient of the whole forward, for plain and LoRA students, CE and KD; it is recomputed at every
    call, so an update of the weights shows."""
    from distillmt.forward import PrefixCache, shared_prefix

    ex = _prefixed(5)
    batch = _batch(ex)
    teacher = tiny_model(seed=5, hidden=32).eval()
    kd = None if method.endswith("ce") else _kd(teacher=teacher, fused=method.endswith("fused"))
    results = []
    for prefix in ([], shared_prefix(ex)):
        student = _lora_student() if method.startswith("lora") else tiny_model(seed=1)
        loss, parts = loss_step(student, batch, ex, kd, prefix=PrefixCache(prefix, frozen=False))
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in student.parameters() if p.requires_grad])
        results.append((loss.item(), parts, grads, student))
    (l0, p0, g0, _), (l1, p1, g1, student) = results
    assert l1 == pytest.approx(l0, rel=1e-5) and p1 == pytest.approx(p0, rel=1e-5)
    assert g1.abs().sum() > 0 and torch.allclose(g1, g0, rtol=1e-4, atol=1e-7)
    prefix = PrefixCache(shared_prefix(ex), frozen=False)
    _, kv = prefix.past(student, batch["input_ids"])
    assert kv[0][1].shape[0] == 1 and kv[0][1].requires_grad  # one row (values: LoRA on v_proj), with gradients
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.1)
    assert not torch.allclose(prefix.past(student, batch["input_ids"])[1][0][0], kv[0][0])  # not kept


@pytest.mark.unit
def test_training_with_the_shared_prefix_run_once_equals_the_whole_forward(tmp_path):
    """train() runs the prompt prefix the examples share once per micro-batch by default: the same weights and
    validation loss as running it for every example."""
    ex, valid = _prefixed(8), _prefixed(3)
    runs = {}
    for share in (False, True):
        model = tiny_model()
        summary = fit(model, ex, valid, tmp_path / str(share), max_steps=3, batch_size=4, share_prefix=share,
                        )  # fmt: skip
        runs[share] = (params(model), summary["valid_ce"])
    assert torch.allclose(runs[True][0], runs[False][0], atol=1e-5)
    assert runs[True][1] == pytest.approx(runs[False][1], rel=1e-5)


def test_training_on_a_cpu_runs_sdpa_in_fp32_then_restores_sdpa(tmp_path, monkeypatch):
    """On a CPU the training forwards run SDPA in fp32 (forward.sdpa_in_fp32); the model keeps SDPA afterwards, and an
    fp32 model's weights equal a plain SDPA run's."""
    ex, valid = random_examples(8), random_examples(3, seed=1)
    model, seen = tiny_model(), []
    assert model.config._attn_implementation == "sdpa"
    model.register_forward_pre_hook(lambda m, args: seen.append(m.config._attn_implementation))
    fit(model, ex, valid, tmp_path / "fp32", max_steps=3, batch_size=4)
    assert seen[:3] == [forward_mod.FP32_SDPA] * 3 and seen[-1] == "sdpa"  # 3 training steps, then validation
    assert model.config._attn_implementation == "sdpa"

    class KeepSDPA:
        def __init__(self, model, device):
            pass

        def restore(self):
            pass

    monkeypatch.setattr(train_mod, "TrainingAttention", KeepSDPA)
    sdpa = tiny_model()
    fit(sdpa, ex, valid, tmp_path / "sdpa", max_steps=3, batch_size=4)
    assert torch.allclose(params(model), params(sdpa), atol=1e-6)
    assert not torch.equal(params(model), params(tiny_model()))  # trained


@pytest.mark.unit
def test_sdpa_in_fp32_masks_padding_and_is_closer_to_fp32_under_bf16_autocast():
    """The padding mask reaches the fp32 attention (a registered attention without its mask type gets none), and under
    bf16 autocast its logits are at least as close to the fp32 model's as bf16 SDPA's."""
    model = tiny_model(hidden=32)
    batch = _batch(random_examples(4))
    assert int(batch["attention_mask"].eq(0).sum()) > 0  # padded rows

    def logits(attention, autocast):
        model.set_attn_implementation(attention)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()

    forward_mod.register_fp32_sdpa()
    exact = logits("sdpa", False)
    assert torch.allclose(logits(forward_mod.FP32_SDPA, False), exact, atol=1e-6)
    err_fp32 = (logits(forward_mod.FP32_SDPA, True) - exact).norm()
    err_bf16 = (logits("sdpa", True) - exact).norm()
    assert err_fp32 <= err_bf16 * 1.05, (err_fp32, err_bf16)


@pytest.mark.unit
def test_the_optimizer_is_fused_adamw_without_empty_groups():
    opt = train_mod.make_optimizer(tiny_model(), lr=1e-3, weight_decay=0.01)
    assert opt.defaults["fused"] is True
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
