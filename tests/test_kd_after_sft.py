"""KD as a second phase after fine-tuning (issue #25): a KD row's student can start from what train_student saved
(``init_from``), every training stage can keep the weights of its best validation CE (``keep_best``, across a
resume), SFT_MORE continues train_student's model on the references for as many steps as a KD phase takes, and the
teacher_labels stage measures its labels' length against the references'."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_qwen, micro_cfg, random_examples

import distillmt.train as train_mod
from distillmt.config import load_config
from distillmt.errors import DistillmtError
from distillmt.io import read_json, write_jsonl
from distillmt.pipeline import Experiment, hold, label_length, run_experiment
from distillmt.sections import GKDConfig, SoftKDConfig, TrainConfig
from distillmt.train import Objective, evaluate_loss, train

VOCAB = 40


TRAIN, VALID = random_examples(12, 0), random_examples(4, 1)
# lr 0.1 on random targets: the validation CE falls for three steps, then rises well above its best
OVERSHOOT = dict(lr=0.1, warmup_ratio=0.0, schedule="constant", weight_decay=0.0, max_grad_norm=0.0, max_steps=8,
                 batch_size=4, eval_every=1, keep_best=True, save_every=0)  # fmt: skip


def fit(model, out: Path, **budget):
    cfg = TrainConfig(**{**OVERSHOOT, **budget})
    return train(model, TRAIN, VALID, out, cfg, pad_token_id=0, progress=False, device="cpu")


def valid_ces(folder: Path) -> list[tuple[int, float]]:
    """(step, validation CE) of every validation a training stage logged, in order."""
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["valid_ce"]) for r in rows if r.get("valid_ce") is not None]


def params(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# --- keep_best ---------------------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_keep_best_keeps_the_weights_of_the_lowest_validation_ce(tmp_path):
    model = build_tiny_qwen(VOCAB, seed=0, pad_token_id=0)
    summary = fit(model, tmp_path / "run")
    logged = valid_ces(tmp_path / "run")
    assert [s for s, _ in logged] == list(range(9)) + [8]  # the start, every step, the end
    best_step, best_ce = min(logged, key=lambda r: r[1])
    assert 0 < best_step < 8 and logged[-1][1] > best_ce + 0.3  # the case: the last step is clearly worse
    assert summary["best_step"] == best_step and summary["best_valid_ce"] == pytest.approx(best_ce)
    assert summary["final_valid_ce"] == pytest.approx(logged[-1][1])
    assert summary["valid_ce"] == summary["best_valid_ce"]  # the saved model's
    # the model handed back (what a stage saves) is the best one, not the last
    now = evaluate_loss(model, VALID, pad_token_id=0, batch_size=4, device="cpu")
    assert now == pytest.approx(best_ce, abs=1e-6)
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["best_step"] == best_step and last["best_valid_ce"] == pytest.approx(best_ce)


@pytest.mark.unit
def test_without_keep_best_the_last_weights_stay_and_the_summary_is_as_before(tmp_path):
    model = build_tiny_qwen(VOCAB, seed=0, pad_token_id=0)
    summary = fit(model, tmp_path / "run", keep_best=False)
    assert "best_step" not in summary and "final_valid_ce" not in summary
    assert valid_ces(tmp_path / "run")[0][0] == 1  # no validation of the start
    now = evaluate_loss(model, VALID, pad_token_id=0, batch_size=4, device="cpu")
    assert now == pytest.approx(summary["valid_ce"], abs=1e-6)


def test_keep_best_survives_a_kill_and_resume(tmp_path, monkeypatch):
    """Killed after the step-4 checkpoint, when the best (step 3) is behind it: the resumed run still ends with the
    step-3 weights, as the uninterrupted one does."""
    straight = build_tiny_qwen(VOCAB, seed=0, pad_token_id=0)
    expected = fit(straight, tmp_path / "straight", save_every=2)
    assert expected["best_step"] == 3

    real_save, calls = train_mod.save_checkpoint, {"n": 0}

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:  # the checkpoint of step 4
            raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        fit(build_tiny_qwen(VOCAB, seed=0, pad_token_id=0), tmp_path / "resumed", save_every=2)
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    ckpt = tmp_path / "resumed" / "checkpoints" / "step-0000004"
    state = read_json(ckpt / "state.json")
    assert state["best_step"] == 3 and (ckpt / "best.safetensors").is_file()

    resumed = build_tiny_qwen(VOCAB, seed=7, pad_token_id=0)  # other weights: the checkpoint must win
    summary = fit(resumed, tmp_path / "resumed", save_every=2)
    assert summary["resumed_from"] == "step-0000004"
    assert summary["best_step"] == 3 and summary["best_valid_ce"] == pytest.approx(expected["best_valid_ce"])
    assert torch.allclose(params(resumed), params(straight), atol=1e-6)
    assert [s for s, _ in valid_ces(tmp_path / "resumed")] == [s for s, _ in valid_ces(tmp_path / "straight")]


@pytest.mark.unit
def test_keep_best_needs_validations(tmp_path):
    with pytest.raises(DistillmtError, match="keep_best needs eval_every > 0"):
        train(build_tiny_qwen(VOCAB), TRAIN, VALID, tmp_path, TrainConfig(keep_best=True), pad_token_id=0)
    assert not (tmp_path / "checkpoints").exists()  # refused before anything is written
    with pytest.raises(DistillmtError, match=r"'train_student.keep_best' = true needs train_student.eval_every > 0"):
        load_config(None, ["train_student.keep_best=true"])
    with pytest.raises(DistillmtError, match=r"'train_teacher.keep_best'"):
        load_config(None, ["train_teacher.keep_best=true"])
    load_config(None, ["train_student.keep_best=true", "train_student.eval_every=10"])


# --- config and stage keys -----------------------------------------------------------------------------------------


def keys_of(cfg, *stages: str) -> dict[str, str]:
    """The keys of these stages (after data, tokenizer, train_teacher, train_student), nothing computed."""
    exp = Experiment(cfg, progress=False)
    exp.run.stage = lambda *args, **kwargs: {}
    for stage in ("data", "tokenizer", "train_teacher", "train_student", *stages):
        getattr(exp, f"stage_{stage}")()
    return dict(exp.keys)


KD_STAGES = ("teacher_labels", "train_hlkd", "train_slkd", "train_gkd", "train_hlkd_slkd")


@pytest.mark.unit
def test_the_new_settings_key_stages_only_when_set(tmp_path):
    default = keys_of(micro_cfg(tmp_path), *KD_STAGES)
    explicit = ["hard_kd.init_from=none", "soft_kd.init_from=none", "gkd.init_from=none", "gkd.divergence=soft_kd",
                "train_student.keep_best=false", "train_teacher.keep_best=false"]  # fmt: skip
    assert keys_of(micro_cfg(tmp_path, *explicit), *KD_STAGES) == default

    started = keys_of(micro_cfg(tmp_path, "hard_kd.init_from=STUDENT"), *KD_STAGES)
    assert {k for k in default if started[k] != default[k]} == {"train_hlkd"}
    started = keys_of(micro_cfg(tmp_path, "soft_kd.init_from=STUDENT", "gkd.init_from=STUDENT"), *KD_STAGES)
    assert {k for k in default if started[k] != default[k]} == {"train_slkd", "train_gkd", "train_hlkd_slkd"}

    best = keys_of(micro_cfg(tmp_path, "train_student.keep_best=true", "train_student.eval_every=1"), *KD_STAGES)
    assert best["train_teacher"] == default["train_teacher"] and best["train_student"] != default["train_student"]

    # GKD's own divergence keys its objective as the same divergence in soft_kd would
    own = keys_of(micro_cfg(tmp_path, "gkd.divergence=jsd", "gkd.beta=0.1"), "train_gkd")["train_gkd"]
    shared = keys_of(micro_cfg(tmp_path, "soft_kd.divergence=jsd", "soft_kd.beta=0.1"), "train_gkd")["train_gkd"]
    assert own == shared != default["train_gkd"]


@pytest.mark.unit
def test_gkd_trains_with_its_own_divergence_where_set():
    kd = SoftKDConfig(divergence="forward_kl", beta=0.5)
    assert Objective(kd, VOCAB, teacher=object()).divergence_args()["divergence"] == "forward_kl"
    own = Objective(kd, VOCAB, teacher=object(), gkd=GKDConfig(divergence="jsd", beta=0.1)).divergence_args()
    assert (own["divergence"], own["beta"]) == ("jsd", 0.1)
    assert Objective(kd, VOCAB, teacher=object(), gkd=GKDConfig()).divergence_args()["divergence"] == "forward_kl"
    rkl = Objective(kd, VOCAB, teacher=object(), gkd=GKDConfig(divergence="reverse_kl")).divergence_args()
    assert (rkl["divergence"], rkl["beta"]) == ("reverse_kl", 0.5)
    hot = SoftKDConfig(temperature=2.0)
    assert Objective(hot, VOCAB, teacher=object(), gkd=GKDConfig()).divergence_args()["temperature"] == 2.0
    own_t = Objective(hot, VOCAB, teacher=object(), gkd=GKDConfig(kd_temperature=1.0))
    assert own_t.divergence_args()["temperature"] == 1.0 and own_t.weights(on_policy=True) == (0.0, 1.0)


@pytest.mark.unit
def test_gkds_own_kd_temperature_keys_only_gkd(tmp_path):
    default = keys_of(micro_cfg(tmp_path), *KD_STAGES)
    assert keys_of(micro_cfg(tmp_path, "gkd.kd_temperature=null"), *KD_STAGES) == default
    own = keys_of(micro_cfg(tmp_path, "gkd.kd_temperature=1.0"), *KD_STAGES)
    assert {k for k in default if own[k] != default[k]} == {"train_gkd"}


@pytest.mark.unit
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["hard_kd.init_from=STUDENT_PEFT"], r"'hard_kd.init_from' = STUDENT_PEFT needs pretrained models"),
        (["teacher.model=a/b", "student.model=c/d", "gkd.init_from=STUDENT"], r"'gkd.init_from' = STUDENT: with pre"),
        (["systems=[STUDENT,SFT_MORE]", "train_student.max_steps=0"], r"SFT_MORE needs train_student.max_steps > 0"),
        (["soft_kd.init_from=STUDENT_PEFT_MORE"], r"'soft_kd.init_from' = 'STUDENT_PEFT_MORE' is not allowed"),
    ],
)
def test_bad_phase_settings_are_refused_naming_the_key(overrides, message):
    with pytest.raises(DistillmtError, match=message):
        load_config(None, overrides)


# --- the pipeline: KD after fine-tuning and the equal-compute row ----------------------------------------------------

BEST_EVERY_STEP = (
    "train_student={max_steps: 3, batch_size: 8, save_every: 2, log_every: 1, eval_every: 1, keep_best: true}"
)


def test_kd_and_sft_more_start_from_train_students_model_scratch(tmp_path):
    """Scratch models: HLKD with hard_kd.init_from=STUDENT and SFT_MORE both start from the weights train_student saved
    (their validation CE before the first step is train_student's saved model's), run even though STUDENT is not a
    row, and take as many steps as train_student's budget; the stage keys carry train_student's key."""
    cfg = micro_cfg(tmp_path, "systems=[HLKD,SFT_MORE]", "hard_kd.init_from=STUDENT", BEST_EVERY_STEP)
    report = run_experiment(cfg, progress=False)
    root = tmp_path / "micro"
    student = read_json(root / "train_student" / "stage.json")
    saved_ce = student["result"]["valid_ce"]
    assert student["result"]["best_step"] is not None and saved_ce == student["result"]["best_valid_ce"]
    for stage in ("train_hlkd", "train_sft_more"):
        record = read_json(root / stage / "stage.json")
        assert record["settings"]["init_from"] == {"row": "STUDENT", "train_student": student["key"]}
        assert valid_ces(root / stage)[0] == (0, pytest.approx(saved_ce, abs=1e-5))  # train_student's weights
        assert record["result"]["steps"] == 3 == student["result"]["steps"]  # equal compute
    assert "init_from" not in read_json(root / "train_teacher" / "stage.json")["settings"]
    rows = report["systems"]
    assert rows["SFT_MORE"]["settings"].startswith("STUDENT (train_student's model) fine-tuned on the references for 3")
    assert rows["HLKD"]["settings"].endswith(
        "starting from STUDENT (train_student's model), a fresh optimizer and schedule"
    )
    # the labels' length against the references', on the 40 training sources (all have one)
    length = read_json(root / "teacher_labels" / "stage.json")["result"]["label_length"]
    assert length["sources"] == 40 and length["ratio"] == pytest.approx(
        length["label_chars"] / length["reference_chars"]
    )


@pytest.mark.unit
def test_label_length_counts_only_sources_with_a_reference(tmp_path):
    write_jsonl(tmp_path / "shard-0.jsonl", [{"src": "a", "ref": "1234", "label": "12"},
                                             {"src": "b", "ref": None, "label": "1234567890"}])  # fmt: skip
    write_jsonl(tmp_path / "shard-1.jsonl", [{"src": "c", "ref": "123456", "label": "1234"}])
    length = label_length(tmp_path, ["shard-0.jsonl", "shard-1.jsonl"])
    assert length == {"sources": 2, "label_chars": 3.0, "reference_chars": 5.0, "ratio": pytest.approx(0.6)}
    write_jsonl(tmp_path / "extra.jsonl", [{"src": "d", "ref": None, "label": "x"}])
    assert label_length(tmp_path, ["extra.jsonl"])["ratio"] is None


def test_a_lora_student_continues_train_students_adapter(tmp_path, pretrained_folder):
    """Pretrained models with LoRA: SLKD with soft_kd.init_from=STUDENT_PEFT loads the adapter train_student saved
    as a trainable adapter (not merged), starts at its validation CE and saves an adapter again."""
    from safetensors.torch import load_file

    lora = "student.lora={enabled: true, r: 4, alpha: 8, dropout: 0.0, target_modules: [q_proj, v_proj]}"
    models = [f"teacher.model={pretrained_folder}", f"student.model={pretrained_folder}", "teacher.dtype=float32",
              "student.dtype=float32", lora, "soft_kd.teacher=base"]  # fmt: skip
    cfg = micro_cfg(tmp_path, *models, "systems=[STUDENT_PEFT,SLKD]", "soft_kd.init_from=STUDENT_PEFT", BEST_EVERY_STEP)
    exp = Experiment(cfg, progress=False)
    with hold(exp):
        exp.stage_data()
        student, slkd = exp.stage_train_student(), exp.stage_train_slkd()
    root = tmp_path / "micro"
    assert (root / "train_slkd" / "model" / "adapter_config.json").is_file()
    assert valid_ces(root / "train_slkd")[0] == (0, pytest.approx(student["valid_ce"], abs=1e-5))
    assert slkd["steps"] == student["steps"] == 3

    # the starting model: the base weights frozen, the adapter's values trainable, nothing merged
    saved = load_file(str(root / "train_student" / "model" / "adapter_model.safetensors"))
    model = exp.models.new_trainable(cfg.student, exp.models.tokenizer(), root / "train_student" / "model")
    trainable = {n.replace(".default", ""): p for n, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) == set(saved) and all("lora_" in n for n in trainable)
    assert all(torch.equal(trainable[n].detach(), value) for n, value in saved.items())
    fresh = exp.models.new_trainable(cfg.student, exp.models.tokenizer())
    lora_b = [p for n, p in fresh.named_parameters() if "lora_B" in n]
    # a fresh adapter starts at zero; the loaded one does not
    assert all(float(p.detach().abs().sum()) == 0.0 for p in lora_b)
    assert any(float(p.detach().abs().sum()) > 0.0 for n, p in trainable.items() if "lora_B" in n)


def test_a_second_phase_takes_its_own_steps(tmp_path):
    """train_student.phase2_max_steps: SFT_MORE and a KD row that continues train_student's model take that many
    steps, train_student its own; the setting keys only the second-phase stages."""
    default = keys_of(micro_cfg(tmp_path, "hard_kd.init_from=STUDENT"), *KD_STAGES)
    two = keys_of(micro_cfg(tmp_path, "hard_kd.init_from=STUDENT", "train_student.phase2_max_steps=2"), *KD_STAGES)
    assert {k for k in default if two[k] != default[k]} == {"train_hlkd"}  # SLKD, GKD start fresh here
    cfg = micro_cfg(tmp_path, "systems=[HLKD,SFT_MORE]", "hard_kd.init_from=STUDENT", BEST_EVERY_STEP,
                    "train_student.phase2_max_steps=2", "name=p2")  # fmt: skip
    report = run_experiment(cfg, progress=False)
    root = tmp_path / "p2"
    assert read_json(root / "train_student" / "stage.json")["result"]["steps"] == 3
    for stage in ("train_hlkd", "train_sft_more"):
        assert read_json(root / stage / "stage.json")["result"]["steps"] == 2
    assert "for 2 more steps" in report["systems"]["SFT_MORE"]["settings"]
    with pytest.raises(DistillmtError, match="'train_teacher.phase2_max_steps' is for train_student"):
        load_config(None, ["train_teacher.phase2_max_steps=5"])
