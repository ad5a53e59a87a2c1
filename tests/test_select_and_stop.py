"""Which validation is the best, and when to stop (issue #25): ``train_*.select_by=valid_chrf`` keeps the weights of
the best chrF of the validation split's translations (a student trained on a teacher's labels can score a higher CE
on the references while it translates better), and ``patience`` stops a phase once the best is that many validations
behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_qwen, micro_cfg, random_examples

from distillmt.config import load_config
from distillmt.errors import DistillmtError
from distillmt.io import read_json
from distillmt.pipeline import run_experiment
from distillmt.sections import TrainConfig
from distillmt.train import train

VOCAB = 40
TRAIN, VALID = random_examples(12, 0), random_examples(4, 1)
BUDGET = dict(lr=0.01, warmup_ratio=0.0, schedule="constant", max_steps=6, batch_size=4, eval_every=1,
              keep_best=True, save_every=0)  # fmt: skip


def scripted(scores: list[float]):
    """A stand-in for the validation translation: the next score of ``scores`` at each call, and a copy of the
    weights (and whether the model was in eval mode) it was given."""
    seen = []

    def score(model) -> float:
        seen.append(
            {
                "weights": torch.cat([p.detach().flatten().clone() for p in model.parameters()]),
                "eval": not model.training,
            }
        )
        return scores[len(seen) - 1]

    return score, seen


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.unit
def test_valid_chrf_keeps_the_weights_of_the_highest_chrf_not_the_lowest_ce(tmp_path):
    score, seen = scripted([10.0, 12.0, 30.0, 11.0, 9.0, 8.0, 7.0])  # the start, then steps 1..6: best at step 2
    model = build_tiny_qwen(VOCAB, seed=0, pad_token_id=0)
    cfg = TrainConfig(**BUDGET, select_by="valid_chrf")
    summary = train(model, TRAIN, VALID, tmp_path, cfg, pad_token_id=0, progress=False, device="cpu", score_valid=score)
    assert len(seen) == 7  # the start and every step; the end reuses step 6's validation
    assert all(s["eval"] for s in seen)  # translated in eval mode
    assert summary["best_step"] == 2 and summary["best_valid_chrf"] == 30.0
    assert torch.equal(torch.cat([p.detach().flatten() for p in model.parameters()]), seen[2]["weights"])
    logged = [(r["step"], r["valid_chrf"]) for r in records(tmp_path) if "valid_chrf" in r]
    assert logged[:7] == [(0, 10.0), (1, 12.0), (2, 30.0), (3, 11.0), (4, 9.0), (5, 8.0), (6, 7.0)]
    ces = [r["valid_ce"] for r in records(tmp_path) if "valid_ce" in r]
    assert summary["valid_ce"] == pytest.approx(ces[2])  # the saved model's CE: step 2's, whatever the lowest is


@pytest.mark.unit
def test_patience_stops_once_the_best_is_that_many_validations_behind(tmp_path):
    score, seen = scripted([20.0, 25.0, 24.0, 23.0, 26.0, 1.0, 1.0])
    cfg = TrainConfig(**BUDGET, select_by="valid_chrf", patience=2)
    model = build_tiny_qwen(VOCAB, seed=0, pad_token_id=0)
    summary = train(model, TRAIN, VALID, tmp_path, cfg, pad_token_id=0, progress=False, device="cpu", score_valid=score)
    # best at step 1; steps 2 and 3 do not beat it: stop at step 3 (step 4's 26 is never seen)
    assert summary["steps"] == 3 and summary["stopped_early"] is True and summary["planned_steps"] == 6
    assert summary["best_step"] == 1 and len(seen) == 4
    assert torch.equal(torch.cat([p.detach().flatten() for p in model.parameters()]), seen[1]["weights"])


@pytest.mark.unit
def test_patience_with_the_validation_ce(tmp_path):
    """lr 0.1 on random targets: the CE reaches its lowest within a few steps, then rises; patience 3 stops three
    validations after the lowest, and without patience the whole budget runs."""
    over = {**BUDGET, "lr": 0.1, "weight_decay": 0.0, "max_grad_norm": 0.0, "max_steps": 12}
    full = train(build_tiny_qwen(VOCAB, seed=0, pad_token_id=0), TRAIN, VALID, tmp_path / "full",
                 TrainConfig(**over), pad_token_id=0, progress=False, device="cpu")  # fmt: skip
    assert full["steps"] == 12 and "stopped_early" not in full
    stopped = train(build_tiny_qwen(VOCAB, seed=0, pad_token_id=0), TRAIN, VALID, tmp_path / "stopped",
                    TrainConfig(**over, patience=3), pad_token_id=0, progress=False, device="cpu")  # fmt: skip
    assert 0 < stopped["best_step"] == full["best_step"] < 9
    assert stopped["steps"] == full["best_step"] + 3 and stopped["best_valid_ce"] == pytest.approx(
        full["best_valid_ce"]
    )


@pytest.mark.unit
def test_select_by_and_patience_need_keep_best_and_key_only_when_set(tmp_path):
    with pytest.raises(DistillmtError, match=r"'train_student.select_by' = valid_chrf needs train_student.keep_best"):
        load_config(None, ["train_student.select_by=valid_chrf"])
    with pytest.raises(DistillmtError, match=r"'train_teacher.patience' = 3 needs train_teacher.keep_best"):
        load_config(None, ["train_teacher.patience=3"])
    with pytest.raises(DistillmtError, match="needs score_valid"):
        train(build_tiny_qwen(VOCAB), TRAIN, VALID, tmp_path, TrainConfig(**BUDGET, select_by="valid_chrf"),
              pad_token_id=0)  # fmt: skip
    default = TrainConfig(keep_best=True, eval_every=5).key_settings()
    assert "select_by" not in default and "patience" not in default
    chosen = TrainConfig(keep_best=True, eval_every=5, select_by="valid_chrf", patience=2).key_settings()
    assert chosen["select_by"] == "valid_chrf" and chosen["patience"] == 2


def test_a_pipeline_student_selected_by_the_chrf_of_its_validation_translations(tmp_path):
    """Through the pipeline: train_student translates the validation split at every validation (real generation,
    sacrebleu's chrF), keeps the best chrF's weights, and records it in its stage result."""
    every = "train_student={max_steps: 3, batch_size: 8, save_every: 0, log_every: 1, eval_every: 1, keep_best: true, "
    cfg = micro_cfg(tmp_path, "systems=[STUDENT]", every + "select_by: valid_chrf, patience: 5}")
    report = run_experiment(cfg, progress=False)
    stage = tmp_path / "micro" / "train_student"
    result = read_json(stage / "stage.json")["result"]
    chrfs = {r["step"]: r["valid_chrf"] for r in records(stage) if "valid_chrf" in r}
    assert sorted(chrfs) == [0, 1, 2, 3] and all(0.0 <= v <= 100.0 for v in chrfs.values())
    best = max(chrfs, key=lambda s: (chrfs[s], -s))  # the first of equal ones wins
    assert result["best_step"] == best and result["best_valid_chrf"] == chrfs[best]
    assert read_json(stage / "stage.json")["settings"]["train"]["select_by"] == "valid_chrf"
    assert report["systems"]["STUDENT"]["settings"].endswith(
        "; the weights of its highest validation chrF, stopped once the best was 5 validations behind"
    )


def test_a_lora_models_validation_translates_as_its_row_will(tmp_path, pretrained_folder):
    """A LoRA model in training is scored with its adapter merged into a plain copy of the base model: the chrF equals
    that of the saved adapter loaded as a row is (merged), and the model in training is left untouched."""
    from functools import partial

    from distillmt.generate import translate
    from distillmt.metrics import chrf
    from distillmt.models import MergedCopy, load_trained, save_trained
    from distillmt.pipeline import Experiment, ValidChrF, hold

    lora = "student.lora={enabled: true, r: 4, alpha: 8, dropout: 0.0, target_modules: [q_proj, v_proj]}"
    models = [f"teacher.model={pretrained_folder}", f"student.model={pretrained_folder}", "teacher.dtype=float32",
              "student.dtype=float32", lora]  # fmt: skip
    cfg = micro_cfg(tmp_path, *models, "systems=[STUDENT_PEFT]")
    exp = Experiment(cfg, progress=False)
    with hold(exp):
        exp.stage_data()
    tok, valid = exp.models.tokenizer(), exp.split("valid")
    model = exp.models.new_trainable(cfg.student, tok)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # a fresh adapter is zero: give it something to merge
            p.data.normal_(0.0, 0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = cfg.generate
    merged = MergedCopy(partial(exp.models.base_model, cfg.student))
    score = ValidChrF(tok, valid, g, exp.models.prompt, seed=0, merged=merged)
    measured = score(model)
    assert hasattr(model, "merge_and_unload")  # still the peft model, adapter unmerged, weights unchanged
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())

    save_trained(model, tok, tmp_path / "adapter")
    row = load_trained(pretrained_folder, tmp_path / "adapter", dtype=torch.float32, device="cpu", merge=True)
    hyps = translate(row, tok, [p.src for p in valid], g, seed=0, progress=False, prompt=exp.models.prompt)
    assert sum(map(len, hyps.hypotheses)) > 0  # something was translated
    assert measured == chrf(hyps.hypotheses, [p.tgt for p in valid])["score"]
    assert score(model) == measured  # the second call reuses the plain copy


@pytest.mark.unit
def test_a_merged_copy_holds_the_weights_peft_merges_to_in_bf16(pretrained_folder):
    """MergedCopy writes each adapted weight as peft's merge does (bf16 base plus the fp32 delta, in place): the copy
    equals merge_and_unload of a deep copy bit for bit, and the model in training keeps its unmerged adapter."""
    import copy

    from distillmt.models import MergedCopy, apply_lora, load_model

    def base():
        return load_model(pretrained_folder, dtype=torch.bfloat16, device=torch.device("cpu"))

    model = apply_lora(base(), r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    torch.manual_seed(3)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data.normal_(0.0, 0.3)
    expected = copy.deepcopy(model).merge_and_unload().state_dict()
    merged = MergedCopy(base)
    plain = merged(model)
    assert not hasattr(plain, "merge_and_unload") and not plain.training
    got = plain.state_dict()
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
    assert hasattr(model, "merge_and_unload") and any("lora_A" in n for n, _ in model.named_parameters())
    for name, p in model.named_parameters():  # training moves the adapter: the next call follows it
        if "lora_B" in name:
            p.data.zero_()
    assert all(torch.equal(merged(model).state_dict()[k], v) for k, v in base().state_dict().items())


@pytest.mark.unit
def test_gkd_samples_from_the_objectives_sampler():
    from distillmt.sections import GKDConfig, SoftKDConfig
    from distillmt.train import Objective, _on_policy_examples

    student, other = build_tiny_qwen(VOCAB, seed=0, pad_token_id=0), build_tiny_qwen(VOCAB, seed=5, pad_token_id=0)
    given = []

    def sampler(model):
        given.append(model)
        return other

    kd, gkd = SoftKDConfig(), GKDConfig(lmbda=1.0, max_new_tokens=6)
    examples = random_examples(4, 2)
    outs = []
    for s in (None, sampler, lambda m: m):
        objective = Objective(kd, VOCAB, teacher=object(), gkd=gkd, end_token_id=1, sampler=s)
        torch.manual_seed(0)
        outs.append(_on_policy_examples(student, examples, objective, 0, "cpu"))
    assert given == [student]
    assert outs[2] == outs[0] != outs[1]  # the sampler's model wrote the targets


def test_a_lora_gkd_objective_samples_from_a_merged_copy(tmp_path, pretrained_folder):
    from distillmt.models import MergedCopy
    from distillmt.pipeline import Experiment, hold

    lora = "student.lora={enabled: true, r: 4, alpha: 8, dropout: 0.0, target_modules: [q_proj, v_proj]}"
    models = [f"teacher.model={pretrained_folder}", f"student.model={pretrained_folder}", "teacher.dtype=float32",
              "student.dtype=float32", "soft_kd.teacher=base"]  # fmt: skip
    for extra, merged in (([lora], True), ([], False)):
        cfg = micro_cfg(tmp_path, *models, *extra, "systems=[GKD]")
        exp = Experiment(cfg, progress=False)
        with hold(exp):
            exp.stage_data()
        tok = exp.models.tokenizer()
        examples = exp.models.encode(tok, exp.split("train"))
        objective = exp.models.objective(tok, examples, cfg.gkd)
        assert isinstance(objective.sampler, MergedCopy) is merged
        assert exp.models.objective(tok, examples).sampler is None  # SLKD samples nothing


def test_gkd_selected_by_valid_chrf_loads_one_merged_copy(tmp_path, pretrained_folder, monkeypatch):
    """A LoRA GKD row that keeps its best validation chrF samples and validates from the same merged copy: one copy
    of the base model serves both (two would double the extra memory of a real student)."""
    from distillmt.pipeline import Experiment, Models, hold

    loads = []
    real = Models.base_model
    monkeypatch.setattr(Models, "base_model", lambda self, m: loads.append(m) or real(self, m))
    lora = "student.lora={enabled: true, r: 4, alpha: 8, dropout: 0.0, target_modules: [q_proj, v_proj]}"
    cfg = micro_cfg(tmp_path, f"teacher.model={pretrained_folder}", f"student.model={pretrained_folder}",
                    "teacher.dtype=float32", "student.dtype=float32", "soft_kd.teacher=base", lora, "systems=[GKD]",
                    "gkd.lmbda=1.0", "train_student.max_steps=2", "train_student.eval_every=1",
                    "train_student.keep_best=true", "train_student.select_by=valid_chrf")  # fmt: skip
    exp = Experiment(cfg, progress=False)
    with hold(exp):
        exp.stage_data()
        result = exp.stage_train_gkd()
    assert result["best_step"] in (0, 1, 2)  # validated by chrF at the start and after each step
    # the student's base model: once for the model in training, once for the copy GKD and validation share (the
    # teacher, soft_kd.teacher=base, is the teacher section's)
    assert sum(m.lora.enabled for m in loads) == 2
