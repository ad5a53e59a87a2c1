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
    source: str = setting(
        "tatoeba", "corpus: tatoeba | hsk | jsonl | tsv | hf", choices=["tatoeba", "hsk", "jsonl", "tsv", "hf"]
    )
    path: str | None = setting(None, "file for jsonl/tsv, dataset name for hf")
    src_field: str = setting(
        "en", "source field: JSONL key, HF field, or TSV header name or 0-based column number (no header)"
    )
    tgt_field: str = setting("zh", "target field")
    hf_split: str = setting("train", "split name for source=hf")
    simplified: bool = setting(True, "convert Traditional Chinese targets to Simplified (OpenCC t2s)")
    max_chars: int = setting(200, "skip pairs whose source or target is longer (characters)", range=(1, None))
    train_size: int = setting(40000, "training pairs (upper bound; 0 = all that are left)", range=(0, None))
    valid_size: int = setting(200, "validation pairs", range=(1, None))
    test_size: int = setting(300, "test pairs", range=(1, None))
    max_source_tokens: int = setting(96, "prompt tokens kept per example", range=(8, None))
    max_target_tokens: int = setting(96, "target tokens kept per example (EOS included)", range=(2, None))


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
        "dtype the model is loaded in: auto (fp32 for scratch models; bf16 for pretrained ones, fp16 on GPUs "
        "without bf16) | float32 | bfloat16 | float16. A scratch model trains in fp32 whatever this says "
        "(see mixed_precision) and is loaded in this dtype afterwards (labels, live teacher, translation)",
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

    def objective_settings(self) -> dict[str, Any]:
        """The fields that decide a logit-KD objective (what keys a stage that trains with it); the cache's own
        settings key the cache's stage."""
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
