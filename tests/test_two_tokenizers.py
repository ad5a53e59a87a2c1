"""Soft-label KD between a teacher and a student whose tokenizers differ: Universal Logit Distillation
(``soft_kd.cross_tokenizer=uld``), each model reading the examples in its own tokenizer and prompt template."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny_qwen

from distillmt.forward import PrefixCache, shared_prefix, target_positions
from distillmt.losses import uld_loss
from distillmt.models import train_bpe_tokenizer
from distillmt.prompts import encode_example, pad_batch
from distillmt.sections import GKDConfig, SoftKDConfig, TrainConfig
from distillmt.train import Objective, TeacherExamples, loss_step, train

NOUNS = [("tea", "茶"), ("rice", "米饭"), ("music", "音乐"), ("the sea", "大海"), ("books", "书"), ("cats", "猫"),
         ("rain", "雨"), ("noodles", "面条"), ("the moon", "月亮"), ("flowers", "花"), ("winter", "冬天"),
         ("coffee", "咖啡")]  # fmt: skip
PAIRS = [(f"I like {en}.", f"我喜欢{zh}。") for en, zh in NOUNS] + [
    (f"{en} is good.", f"{zh}很好。") for en, zh in NOUNS
]
# The teacher's own prompt: a chat template (its answer ends with </s>), unlike the student's plain template
CHAT = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant\n{% endif %}")  # fmt: skip
LIMITS = {"max_source_tokens": 48, "max_target_tokens": 24}


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """Two byte-level BPE tokenizers trained on different text with different sizes: different vocabularies."""
    root = tmp_path_factory.mktemp("tokenizers")
    texts = [t for pair in PAIRS for t in pair]
    student = train_bpe_tokenizer(texts, 300, root / "student")
    teacher = train_bpe_tokenizer(texts[::-1] + ["Translate the following English text into Chinese."] * 3, 360,
                                  root / "teacher")  # fmt: skip
    teacher.chat_template = CHAT
    return student, teacher


def encode(tokenizer) -> list[dict]:
    return [encode_example(tokenizer, src, tgt, **LIMITS) for src, tgt in PAIRS]


def model_for(tokenizer, hidden: int, seed: int, layers: int = 1):
    return build_tiny_qwen(len(tokenizer), hidden_size=hidden, num_layers=layers, seed=seed, max_positions=96,
                           pad_token_id=tokenizer.pad_token_id)  # fmt: skip


def uld_objective(student_tok, teacher_tok, teacher, s_ex, t_ex, **kd) -> Objective:
    side = TeacherExamples(s_ex, t_ex, vocab_size=len(teacher_tok), pad_token_id=teacher_tok.pad_token_id)
    cfg = SoftKDConfig(cross_tokenizer="uld", **{"temperature": 1.0, **kd})
    return Objective(cfg, len(student_tok), teacher=teacher, teacher_examples=side,
                     teacher_prefix=PrefixCache(shared_prefix(t_ex)))  # fmt: skip


BUDGET = dict(lr=1e-2, warmup_ratio=0.0, schedule="constant", save_every=0, weight_decay=0.0, log_every=1)


def fit(model, ex, out, tokenizer, objective=None, **budget):
    cfg = TrainConfig(**{**BUDGET, **budget})
    return train(model, ex, [], out, cfg, objective, pad_token_id=tokenizer.pad_token_id, progress=False,
                 device="cpu", seed=3)  # fmt: skip


@pytest.fixture(scope="module")
def trained_teacher(tokenizers, tmp_path_factory):
    """A teacher fine-tuned on its own encoding of the pairs: sure of its targets, unlike a fresh student."""
    _, teacher_tok = tokenizers
    teacher = model_for(teacher_tok, 32, seed=1, layers=2)
    fit(teacher, encode(teacher_tok), tmp_path_factory.mktemp("teacher"), teacher_tok, max_steps=40, batch_size=8,
        lr=2e-2)  # fmt: skip
    return teacher.eval().requires_grad_(False)


@pytest.mark.unit
def test_the_two_tokenizers_differ_and_so_do_the_encodings(tokenizers):
    student_tok, teacher_tok = tokenizers
    assert student_tok.get_vocab() != teacher_tok.get_vocab() and len(student_tok) != len(teacher_tok)
    s_ex, t_ex = encode(student_tok), encode(teacher_tok)
    assert any(len(a["input_ids"]) != len(b["input_ids"]) for a, b in zip(s_ex, t_ex, strict=True))
    assert sum(1 for a, b in zip(s_ex, t_ex, strict=True) if a["input_ids"] != b["input_ids"]) == len(PAIRS)


@pytest.mark.unit
def test_loss_step_is_ce_plus_weighted_uld_of_each_models_own_encoding(tokenizers):
    student_tok, teacher_tok = tokenizers
    s_ex, t_ex = encode(student_tok), encode(teacher_tok)
    student, teacher = model_for(student_tok, 16, seed=0), model_for(teacher_tok, 24, seed=1).eval()
    objective = uld_objective(student_tok, teacher_tok, teacher, s_ex, t_ex, uld_weight=0.7, temperature=2.0)
    picked = [s_ex[i] for i in (5, 0, 17, 9)]  # any examples, in any order, find their own teacher rows
    batch = pad_batch(picked, student_tok.pad_token_id)
    loss_sum, parts = loss_step(student, batch, picked, objective)
    assert torch.isfinite(loss_sum)

    # the same terms written out: the teacher on its own ids of the same four pairs
    t_batch = pad_batch([t_ex[i] for i in (5, 0, 17, 9)], teacher_tok.pad_token_id)
    s_mask, t_mask = target_positions(batch["labels"]), target_positions(t_batch["labels"])
    with torch.no_grad():
        s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        t_logits = teacher(input_ids=t_batch["input_ids"], attention_mask=t_batch["attention_mask"]).logits
    ref = uld_loss(s_logits, t_logits, s_mask, t_mask, temperature=2.0)
    n = int(s_mask.sum())
    ce = torch.nn.functional.cross_entropy(s_logits[s_mask], batch["labels"][:, 1:][batch["labels"][:, 1:] != -100])
    assert parts["kd"] == pytest.approx(float(ref["uld"]), abs=1e-5)
    assert parts["ce"] == pytest.approx(float(ce), abs=1e-5)
    assert float(loss_sum.detach()) == pytest.approx(float(ce) * n + 0.7 * float(ref["uld"]) * ref["aligned"], rel=1e-5)
    loss_sum.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)


@pytest.mark.unit
def test_uld_objective_needs_its_teacher_side(tokenizers):
    student_tok, teacher_tok = tokenizers
    s_ex, t_ex = encode(student_tok), encode(teacher_tok)
    with pytest.raises(ValueError, match="cross_tokenizer=uld needs"):
        Objective(SoftKDConfig(cross_tokenizer="uld"), len(student_tok), teacher=object())
    with pytest.raises(ValueError, match="cross_tokenizer=uld needs"):
        side = TeacherExamples(s_ex, t_ex, vocab_size=len(teacher_tok), pad_token_id=0)
        Objective(SoftKDConfig(cross_tokenizer="uld"), 300, teacher=object(), teacher_examples=side, gkd=GKDConfig())
    with pytest.raises(ValueError, match="pair them 1:1"):
        TeacherExamples(s_ex, t_ex[:-1], vocab_size=len(teacher_tok), pad_token_id=0)
    side = TeacherExamples(s_ex[:3], t_ex[:3], vocab_size=len(teacher_tok), pad_token_id=0)
    with pytest.raises(ValueError, match="no teacher encoding"):
        side.batch([s_ex[4]])


def mean_uld(student, objective, s_ex, pad) -> float:
    with torch.no_grad():
        return loss_step(student.eval(), pad_batch(s_ex, pad), s_ex, objective)[1]["kd"]


def test_training_lowers_the_uld_term_deterministically(tokenizers, trained_teacher, tmp_path):
    student_tok, teacher_tok = tokenizers
    s_ex, t_ex = encode(student_tok), encode(teacher_tok)
    teacher_before = [p.clone() for p in trained_teacher.parameters()]
    runs = []
    for name, weight in (("a", 2.0), ("b", 2.0), ("ce", 0.0)):
        student = model_for(student_tok, 16, seed=0)
        objective = uld_objective(student_tok, teacher_tok, trained_teacher, s_ex, t_ex, uld_weight=weight)
        before = mean_uld(student, objective, s_ex, student_tok.pad_token_id)
        fit(student.train(), s_ex, tmp_path / name, student_tok, objective, max_steps=12, batch_size=8)
        after = mean_uld(student, objective, s_ex, student_tok.pad_token_id)
        lines = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        lines = [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in lines]  # a timing
        runs.append((before, after, lines, [p.detach().clone() for p in student.parameters()]))
    (before, after, lines, weights), again, ce_only = runs
    assert after < 0.85 * before, (before, after)
    assert after < ce_only[1], (after, ce_only[1])  # lower than the references alone bring it
    logged = [r for r in lines if "kd" in r]
    assert len(logged) == 12 and all(0.0 <= r["kd"] <= 2.0 and r["loss"] == r["loss"] for r in logged)
    # the same seed gives the same run, to the bit
    assert lines == again[2] and all(torch.equal(a, b) for a, b in zip(weights, again[3], strict=True))
    # the teacher only ever ran forward
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, trained_teacher.parameters(), strict=True))


@pytest.mark.unit
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["systems=[STUDENT,GKD]"], "does not do GKD"),
        (["systems=[STUDENT,SLKD]", "soft_kd.cache=true"], "soft_kd.cache=false"),
        (["systems=[STUDENT,HLKD+SLKD]", "soft_kd.fused=true"], "soft_kd.fused=false"),
    ],
)
def test_uld_refuses_the_rows_it_cannot_serve(overrides, message):
    from distillmt.config import load_config
    from distillmt.errors import DistillmtError

    with pytest.raises(DistillmtError, match=message):
        load_config(None, ["soft_kd.cross_tokenizer=uld", *overrides])
    load_config(None, ["soft_kd.cross_tokenizer=uld", "systems=[STUDENT,HLKD,SLKD,HLKD+SLKD]"])  # these run
    load_config(None, ["soft_kd.cross_tokenizer=uld", "systems=[STUDENT,HLKD]", "soft_kd.cache=true"])  # no SLKD row


@pytest.mark.unit
def test_the_uld_settings_key_a_stage_only_when_chosen():
    default = SoftKDConfig().objective_settings()
    assert "cross_tokenizer" not in default and "uld_weight" not in default
    assert SoftKDConfig(uld_weight=3.0).objective_settings() == default  # unused without uld
    uld = SoftKDConfig(cross_tokenizer="uld").objective_settings()
    assert uld["cross_tokenizer"] == "uld" and uld["uld_weight"] == 1.5
    assert SoftKDConfig(cross_tokenizer="uld", alpha=0.7).objective_settings() == uld  # alpha plays no part in ULD
    assert SoftKDConfig(cross_tokenizer="uld", uld_weight=0.5).objective_settings() != uld


# --- the pipeline between two pretrained-style models (local folders) with different tokenizers ----------------------


def save_pretrained_style(folder, tokenizer, *, hidden: int, layers: int, padded_rows: int = 0) -> str:
    """A tiny Qwen2 model saved beside its tokenizer, as a pretrained model's folder is (``padded_rows``: extra
    embedding rows no token uses, as Qwen2.5 has)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer) + padded_rows, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    Qwen2ForCausalLM(config).save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def model_folders(tokenizers, tmp_path_factory):
    student_tok, teacher_tok = tokenizers
    root = tmp_path_factory.mktemp("models")
    student = save_pretrained_style(root / "student", student_tok, hidden=16, layers=1)
    teacher = save_pretrained_style(root / "teacher", teacher_tok, hidden=32, layers=2)
    return student, teacher


def pretrained_cfg(tmp_path, folders, *extra: str):
    from conftest import micro_cfg

    student, teacher = folders
    models = [f"teacher.model={teacher}", f"student.model={student}", "teacher.dtype=float32", "student.dtype=float32"]
    return micro_cfg(tmp_path, *models, "train_teacher={max_steps: 3, batch_size: 8}", *extra)


@pytest.mark.unit
@pytest.mark.parametrize("rows", ["[TEACHER_PEFT,SLKD]", "[STUDENT,HLKD+SLKD]", "[HLKD,GKD]"])
def test_soft_labels_between_different_tokenizers_are_refused_before_any_work(tmp_path, model_folders, rows):
    from distillmt.errors import DistillmtError
    from distillmt.pipeline import run_experiment

    cfg = pretrained_cfg(tmp_path, model_folders, f"systems={rows}")
    with pytest.raises(DistillmtError) as err:
        run_experiment(cfg, progress=False)
    message = str(err.value)
    assert "different tokenizers" in message and "soft_kd.cross_tokenizer=uld" in message
    assert "TEACHER, TEACHER_PEFT, STUDENT, STUDENT_PEFT and HLKD work" in message
    assert not (tmp_path / "micro" / "data").exists()


@pytest.mark.unit
def test_the_refusal_reads_tokenizers_only_and_compares_them_not_the_embeddings(tmp_path, tokenizers):
    from distillmt.config import load_config
    from distillmt.errors import DistillmtError
    from distillmt.pipeline import check_soft_label_tokenizers

    student_tok, teacher_tok = tokenizers
    folders = {}
    for name, tok in (("s", student_tok), ("t", teacher_tok), ("s2", student_tok)):
        tok.save_pretrained(str(tmp_path / name))  # no weights at all: loading a model would fail
        folders[name] = str(tmp_path / name)

    def cfg(teacher: str, *extra: str):
        return load_config(None, [f"teacher.model={teacher}", f"student.model={folders['s']}", *extra])

    with pytest.raises(DistillmtError, match="different tokenizers"):
        check_soft_label_tokenizers(cfg(folders["t"], "systems=[SLKD]"))
    check_soft_label_tokenizers(cfg(folders["t"], "systems=[TEACHER_PEFT,STUDENT_PEFT,HLKD]"))  # text only
    check_soft_label_tokenizers(cfg(folders["t"], "systems=[SLKD]", "soft_kd.cross_tokenizer=uld"))
    check_soft_label_tokenizers(cfg(folders["s2"], "systems=[SLKD,GKD]"))  # one tokenizer in two folders


def test_pipeline_with_different_tokenizers_runs_hlkd_and_slkd_with_uld(tmp_path, model_folders, tokenizers):
    from distillmt.io import read_json
    from distillmt.models import load_tokenizer
    from distillmt.pipeline import run_experiment

    student_tok, teacher_tok = tokenizers
    cfg = pretrained_cfg(tmp_path, model_folders, "systems=[TEACHER_PEFT,HLKD,SLKD,HLKD+SLKD]",
                         "soft_kd.cross_tokenizer=uld")  # fmt: skip
    report = run_experiment(cfg, progress=False)
    root = tmp_path / "micro"
    assert list(report["systems"]) == ["TEACHER_PEFT", "HLKD", "SLKD", "HLKD+SLKD"]
    # each model trained in its own tokenizer, and saved with it
    assert load_tokenizer(str(root / "train_teacher" / "model")).get_vocab() == teacher_tok.get_vocab()
    for stage in ("train_hlkd", "train_slkd", "train_hlkd_slkd"):
        assert load_tokenizer(str(root / stage / "model")).get_vocab() == student_tok.get_vocab()
    for stage in ("train_slkd", "train_hlkd_slkd"):
        logs = [json.loads(x) for x in (root / stage / "metrics.jsonl").read_text().splitlines()]
        kd = [r["kd"] for r in logs if "kd" in r]
        assert kd and all(0.0 <= v <= 2.0 for v in kd)  # the ULD term, in its range
        assert not any("forward_kl" in r for r in logs)  # no token-by-token term between these vocabularies
        assert read_json(root / stage / "stage.json")["settings"]["kd"]["cross_tokenizer"] == "uld"
    for name in report["systems"]:
        assert len((root / f"translate_{name}" / "translations.jsonl").read_text().splitlines()) == 6
