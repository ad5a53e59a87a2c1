"""Experiment configuration: YAML files in configs/ mapped onto dataclasses, with range checks and key=value overrides.

Every field carries a help string and, where it matters, a range or a set of allowed values in its metadata; one
validator walks the tree so an error names the full dotted key (``train_student.lr``) and what is allowed.
Library functions never take the whole config: the pipeline unpacks the fields each stage needs.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from distillmt import systems as systems_mod
from distillmt.errors import DistillmtError


def _f(default: Any, help: str, *, range: tuple[float | None, float | None] | None = None, choices: Any = None) -> Any:
    """A dataclass field with its help text and checks; a class or function default is used as a factory."""
    meta = {"help": help, "range": range, "choices": choices}
    if callable(default):
        return field(default_factory=default, metadata=meta)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


QWEN_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd"]
BLEU_TOKENIZERS = ["zh", "13a", "intl", "char", "none", "ja-mecab", "ko-mecab", "spm", "flores101", "flores200"]
SYSTEMS = systems_mod.NAMES


@dataclass
class DataConfig:
    source: str = _f(
        "tatoeba", "corpus: tatoeba | hsk | jsonl | tsv | hf", choices=["tatoeba", "hsk", "jsonl", "tsv", "hf"]
    )
    path: str | None = _f(None, "file for jsonl/tsv, dataset name for hf")
    src_field: str = _f("en", "source field (JSONL key, TSV column index, or HF field)")
    tgt_field: str = _f("zh", "target field")
    hf_split: str = _f("train", "split name for source=hf")
    simplified: bool = _f(True, "convert Traditional Chinese targets to Simplified (OpenCC t2s)")
    max_chars: int = _f(200, "skip pairs whose source or target is longer (characters)", range=(1, None))
    train_size: int = _f(40000, "training pairs (upper bound; 0 = all that are left)", range=(0, None))
    valid_size: int = _f(200, "validation pairs", range=(1, None))
    test_size: int = _f(300, "test pairs", range=(1, None))
    max_source_tokens: int = _f(96, "prompt tokens kept per example", range=(8, None))
    max_target_tokens: int = _f(96, "target tokens kept per example (EOS included)", range=(2, None))


@dataclass
class ScratchConfig:
    hidden_size: int = _f(256, "hidden size", range=(8, None))
    num_layers: int = _f(4, "transformer layers", range=(1, None))
    num_heads: int = _f(4, "attention heads", range=(1, None))
    num_kv_heads: int = _f(2, "key/value heads (GQA)", range=(1, None))
    intermediate_size: int = _f(768, "MLP size", range=(8, None))


@dataclass
class LoraConfig:
    enabled: bool = _f(False, "train a LoRA adapter instead of all weights")
    r: int = _f(16, "LoRA rank", range=(1, 4096))
    alpha: int = _f(32, "LoRA alpha (scale = alpha / r)", range=(1, None))
    dropout: float = _f(0.05, "LoRA dropout", range=(0.0, 0.99))
    target_modules: list[str] = _f(list(QWEN_LORA_TARGETS), "module names that get adapters")


@dataclass
class ModelConfig:
    model: str = _f(
        "scratch", "'scratch' (built from `scratch` and trained from zero), a hub id, a local folder, or store:NAME"
    )
    dtype: str = _f(
        "auto",
        "dtype the model is loaded in: auto (fp32 for scratch models; bf16 for pretrained ones, fp16 on GPUs "
        "without bf16) | float32 | bfloat16 | float16. A scratch model trains in fp32 whatever this says "
        "(see mixed_precision) and is loaded in this dtype afterwards (labels, live teacher, translation)",
        choices=["auto", "float32", "bfloat16", "float16"],
    )
    scratch: ScratchConfig = _f(ScratchConfig, "architecture when model=scratch")
    lora: LoraConfig = _f(LoraConfig, "LoRA settings")


@dataclass
class TrainConfig:
    epochs: float = _f(1.0, "passes over the training data (ignored when max_steps > 0)", range=(0.0, None))
    max_steps: int = _f(0, "optimizer steps; 0 = derive from epochs", range=(0, None))
    batch_size: int = _f(32, "examples per micro-batch", range=(1, None))
    grad_accum: int = _f(1, "micro-batches per optimizer step", range=(1, None))
    lr: float = _f(1e-3, "peak learning rate", range=(0.0, 10.0))
    weight_decay: float = _f(0.01, "AdamW weight decay", range=(0.0, 1.0))
    warmup_ratio: float = _f(0.05, "fraction of steps with linear warmup", range=(0.0, 1.0))
    schedule: str = _f("cosine", "decay after warmup", choices=["cosine", "linear", "constant"])
    max_grad_norm: float = _f(1.0, "gradient clipping (0 = off)", range=(0.0, None))
    mixed_precision: str = _f(
        "auto", "auto (bf16 where the GPU supports it) | no | bf16 | fp16", choices=["auto", "no", "bf16", "fp16"]
    )
    eval_every: int = _f(0, "validation every N steps (0 = at the end only)", range=(0, None))
    save_every: int = _f(100, "checkpoint every N steps (0 = only at the end)", range=(0, None))
    log_every: int = _f(10, "log metrics every N steps", range=(1, None))


@dataclass
class GenerateConfig:
    batch_size: int = _f(32, "sources per generation batch", range=(1, None))
    max_new_tokens: int = _f(64, "longest translation in tokens", range=(1, None))
    num_beams: int = _f(1, "beam size (1 = greedy or sampling)", range=(1, 64))
    length_penalty: float = _f(1.0, "beam-search length penalty", range=(-10.0, 10.0))
    do_sample: bool = _f(False, "sample instead of greedy/beam")
    temperature: float = _f(
        1.0, "decoding: sampling temperature (only with do_sample=true; not the KD softmax T)", range=(1e-4, 100.0)
    )
    top_k: int = _f(0, "sampling top-k (0 = off)", range=(0, None))
    top_p: float = _f(1.0, "sampling nucleus (1 = off)", range=(1e-6, 1.0))
    max_batch_tokens: int = _f(
        0,
        "also cap a batch at this many tokens (rows x (longest prompt + max_new_tokens) x beams), so short sentences "
        "go in larger batches; 0 = batches of batch_size sources",
        range=(0, None),
    )
    engine: str = _f(
        "hf",
        "hf (transformers generate, the reference) | ct2 (CTranslate2: the model is converted once per stage; "
        "pip install 'distillmt[ct2]') | vllm (GPU only, greedy or sampling: pip install vllm)",
        choices=["hf", "ct2", "vllm"],
    )
    quantization: str = _f(
        "int8",
        "ct2 only: weights of the converted model",
        choices=["float32", "int8", "int8_float32", "int8_float16", "int8_bfloat16", "int16", "float16", "bfloat16"],
    )


@dataclass
class EvalConfig:
    bertscore: bool = _f(True, "compute BERTScore (reported as unavailable when its model cannot be loaded)")
    bertscore_model: str = _f("bert-base-chinese", "BERTScore encoder: hub id, local folder or store:NAME")
    bertscore_layer: int = _f(8, "encoder layer used by BERTScore", range=(1, 64))
    bertscore_batch_size: int = _f(64, "BERTScore batch size", range=(1, None))
    bleu_tokenize: str = _f(
        "zh",
        "sacrebleu tokenizer for BLEU ('zh' for Chinese; 13a gives ~0 on unspaced text)",
        choices=BLEU_TOKENIZERS,
    )
    baseline: str = _f(
        "auto",
        "row every other row is tested against (paired bootstrap; CI and p-value per metric): auto = STUDENT_PEFT "
        "when it is a row, else STUDENT; none = no significance test",
        choices=["auto", "none", *SYSTEMS],
    )
    bootstrap_samples: int = _f(1000, "bootstrap resamples for the CIs and the significance test", range=(100, None))


@dataclass
class HardKDConfig:
    teacher: str = _f("finetuned", "which teacher writes the labels", choices=["finetuned", "base"])
    mix_references: float = _f(
        0.0, "fraction of training pairs that keep the human reference instead", range=(0.0, 1.0)
    )
    num_candidates: int = _f(1, "teacher translations per source", range=(1, 64))
    selection: str = _f(
        "score",
        "pick among candidates by the teacher's own score, by MBR with chrF, or by sentence chrF against the source's "
        "reference (Kim & Rush's Seq-Inter; sources without one fall back to the score)",
        choices=["score", "mbr", "reference"],
    )
    decoding: GenerateConfig = _f(GenerateConfig, "decoding settings for the labels")
    shard_size: int = _f(256, "sources per label shard (the resume unit)", range=(1, None))
    extra_sources: int = _f(
        0,
        "extra source sentences the teacher also translates for HLKD (no references needed): taken from the corpus "
        "pairs left out of every split, never sharing a source or target with a split; 0 = none",
        range=(0, None),
    )
    extra_sources_file: str | None = _f(
        None,
        "instead of the corpus: a plain text file of source sentences, one per line (with extra_sources > 0 "
        "its first N)",
    )


@dataclass
class SoftKDConfig:
    teacher: str = _f("finetuned", "which teacher gives the logits", choices=["finetuned", "base"])
    alpha: float = _f(
        0.1,
        "weight of the CE (reference) term: loss = alpha*CE + (1-alpha)*T^2*D, so alpha=1 is plain fine-tuning "
        "(torchtune's kd_ratio is the weight of the KD term, i.e. 1-alpha)",
        range=(0.0, 1.0),
    )
    temperature: float = _f(
        2.0,
        "KD softmax temperature T: teacher and student logits are divided by T inside D (not a sampling temperature)",
        range=(0.05, 100.0),
    )
    divergence: str = _f("forward_kl", " | ".join(DIVERGENCES), choices=DIVERGENCES)
    beta: float = _f(0.5, "jsd interpolation / skew_kl coefficient", range=(0.0, 1.0))
    chunk_size: int = _f(1024, "target tokens per fp32 chunk of the loss (bounds memory)", range=(1, None))
    cache: bool = _f(False, "precompute top-k teacher log-probs once and train without the teacher in memory")
    cache_k: int = _f(64, "teacher log-probs kept per token in the cache", range=(1, None))
    cache_shard_size: int = _f(256, "training examples per cache shard (a killed build resumes shard by shard)",
                               range=(1, None))  # fmt: skip
    fused: bool = _f(
        False,
        "online teacher: compute the loss's gradient in closed form in the same chunked pass (no autograd through the "
        "softmaxes, nothing recomputed) and, when both output layers are plain linear layers, both models' logits "
        "chunk by chunk from their last hidden states (never held whole); same values up to rounding. Pays for LoRA "
        "students (frozen output layer)",
    )


@dataclass
class GKDConfig:
    lmbda: float = _f(
        0.5, "probability that a batch's targets are generated by the student (on-policy)", range=(0.0, 1.0)
    )
    temperature: float = _f(
        1.0,
        "sampling temperature of the student's on-policy targets (not the KD softmax T, which is soft_kd.temperature)",
        range=(1e-4, 100.0),
    )
    max_new_tokens: int = _f(48, "longest on-policy target", range=(1, None))


def _default_teacher() -> ModelConfig:
    # Loaded in bf16 after training (labels, live teacher, translation): 0.8x the label stage's time and 0.9x SLKD's
    # on this CPU (avx512_bf16), every score of the default table up (measured end to end; see configs/default.yaml)
    return ModelConfig(
        dtype="bfloat16",
        scratch=ScratchConfig(hidden_size=224, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=640),
    )


def _default_student() -> ModelConfig:
    # ~0.1x the teacher's parameters with the default 4,000-token vocabulary
    return ModelConfig(
        scratch=ScratchConfig(hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=192)
    )


def _default_train_teacher() -> TrainConfig:
    # Measured on Tatoeba: at 2e-3 this 4-layer teacher stalls (valid CE 5.1 after 3 epochs); 1e-3 reaches 4.5.
    # bf16 autocast: 0.85x the fp32 time (the step is 70% matmul), valid CE 3.81 against 3.87 in fp32.
    return TrainConfig(epochs=2.0, batch_size=16, lr=1e-3, mixed_precision="bf16")


def _default_train_student() -> TrainConfig:
    return TrainConfig(epochs=1.0, batch_size=16, lr=3e-3)


def _default_eval() -> EvalConfig:
    # The study's bert-base-chinese needs the hub; the multilingual-e5 encoder is built from a PyPI package on first use.
    return EvalConfig(bertscore_model="store:multilingual-e5-small", bertscore_layer=9)


@dataclass
class ExperimentConfig:
    """The default values are the default experiment: small Qwen2-architecture teacher and student trained from
    scratch on Tatoeba EN-ZH, with a BPE tokenizer trained on the training split; about 9 minutes on 2 CPU cores."""

    name: str = _f("default", "run name: outputs go to <output_dir>/<name>/")
    output_dir: str = _f("runs", "folder that holds run folders")
    seed: int = _f(0, "seed for data split, initialisation, data order and sampling", range=(0, None))
    device: str = _f("auto", "auto | cpu | cuda | cuda:N | mps")
    threads: int = _f(
        0,
        "PyTorch CPU threads (0 = the cores this process may use); on a machine shared with another busy process, "
        "fewer threads than cores is much faster than oversubscribing them",
        range=(0, 1024),
    )
    systems: list[str] = _f(["TEACHER", "STUDENT", "HLKD", "SLKD"], f"rows of the results table, from {SYSTEMS}")
    tokenizer_vocab_size: int = _f(
        4000, "BPE vocabulary trained on the training split when models are scratch", range=(100, None)
    )
    data: DataConfig = _f(DataConfig, "corpus and splits")
    teacher: ModelConfig = _f(_default_teacher, "teacher model")
    student: ModelConfig = _f(_default_student, "student model")
    train_teacher: TrainConfig = _f(_default_train_teacher, "teacher fine-tuning (TEACHER / TEACHER_PEFT)")
    train_student: TrainConfig = _f(
        _default_train_student, "student training: one budget for STUDENT(_PEFT), HLKD, SLKD, GKD"
    )
    generate: GenerateConfig = _f(GenerateConfig, "decoding of the test set")
    eval: EvalConfig = _f(_default_eval, "metrics")
    hard_kd: HardKDConfig = _f(HardKDConfig, "sequence-level KD (HLKD)")
    soft_kd: SoftKDConfig = _f(SoftKDConfig, "logit KD (SLKD, GKD)")
    gkd: GKDConfig = _f(GKDConfig, "on-policy KD (GKD)")


# ---------------------------------------------------------------------------------------------------------------------
# Building a config from dicts, files and overrides


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, key: str) -> Any:
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise DistillmtError(f"config key '{key}' must not be empty")
    origin = typing.get_origin(tp)
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise DistillmtError(f"config key '{key}' must be a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise DistillmtError(f"config key '{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise DistillmtError(f"config key '{key}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            try:  # YAML 1.1 reads "3e-4" (no dot) as a string
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DistillmtError(f"config key '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list)):
            raise DistillmtError(f"config key '{key}' must be a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict; unknown keys are errors (a typo must not be silently ignored)."""
    if not isinstance(data, dict):
        raise DistillmtError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise DistillmtError(
            f"unknown config key '{prefix}{unknown[0]}' (known keys here: {', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, value in data.items():
        tp, _ = _unwrap_optional(hints[name])
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            value = {} if value is None else value
            if isinstance(value, dict) and fields[name].default_factory is not dataclasses.MISSING:
                # A section starts from this field's own default (the experiment's teacher is not a bare
                # ModelConfig()), so overriding one key keeps the other keys of the default experiment.
                value = _merge(dataclasses.asdict(fields[name].default_factory()), value)
            kwargs[name] = from_dict(tp, value, prefix=f"{key}.")
        else:
            kwargs[name] = _coerce(_yaml_word(value, fields[name].metadata.get("choices")), hints[name], key)
    return cls(**kwargs)


def _yaml_word(value: Any, choices: list[str] | None) -> Any:
    """The choice a YAML boolean was written as: YAML 1.1 reads ``no`` (``mixed_precision=no``) as false."""
    if not isinstance(value, bool) or not choices:
        return value
    words = ("yes", "on", "true") if value else ("no", "off", "false")
    return next((c for c in choices if c.lower() in words), value)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def validate(cfg: Any, prefix: str = "") -> None:
    """Check every field against its range/choices; the error names the dotted key and what is allowed."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            validate(value, prefix=f"{key}.")
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
    if isinstance(cfg, ExperimentConfig):
        _validate_experiment(cfg)
        _validate_paths(cfg)


def _validate_paths(cfg: ExperimentConfig) -> None:
    """``name`` is one folder inside ``output_dir`` (never `..`, `.` or a path), and ``output_dir`` can be a folder."""
    name = cfg.name
    if not name.strip():
        raise DistillmtError("config key 'name' is empty; it names the run folder <output_dir>/<name>/")
    if name in (".", "..") or any(c in name for c in "/\\\0"):
        raise DistillmtError(
            f"config key 'name' = {name!r} is not allowed; it must be a plain folder name (not '.' or '..', "
            "no '/' or '\\'): runs go to <output_dir>/<name>/"
        )
    if not cfg.output_dir.strip():
        raise DistillmtError("config key 'output_dir' is empty; use '.' for the current folder")
    out = Path(cfg.output_dir)
    for existing in (out / name, out, *out.parents):  # the nearest part of the path that exists must be a folder
        if existing.exists():
            if not existing.is_dir():
                what = "run folder" if existing == out / name else "folder"
                raise DistillmtError(
                    f"config key 'output_dir' = {cfg.output_dir!r}: {existing} exists and is a file, not a {what}"
                )
            break


def _validate_experiment(cfg: ExperimentConfig) -> None:
    if not cfg.systems:
        raise DistillmtError("config key 'systems' is empty; name at least one of: " + ", ".join(SYSTEMS))
    for s in cfg.systems:
        if s not in SYSTEMS:
            raise DistillmtError(f"config key 'systems' has unknown system {s!r}; choose from: {', '.join(SYSTEMS)}")
    scratch = cfg.teacher.model == "scratch"
    if scratch != (cfg.student.model == "scratch"):
        raise DistillmtError("teacher.model and student.model must both be 'scratch' or both be pretrained models")
    if scratch:
        for system in map(systems_mod.get, cfg.systems):
            if system.pretrained_only:
                raise DistillmtError(
                    f"system {system.name} needs pretrained models; with model=scratch, TEACHER and STUDENT are "
                    "already trained"
                )
            for section in system.teacher_from:
                if getattr(cfg, section).teacher == "base":
                    raise DistillmtError(
                        f"{section}.teacher=base needs a pretrained teacher (teacher.model is 'scratch')"
                    )
    for side in ("teacher", "student"):
        m = getattr(cfg, side).scratch
        if m.hidden_size % m.num_heads or m.num_heads % m.num_kv_heads:
            raise DistillmtError(
                f"config key '{side}.scratch': hidden_size must be divisible by num_heads and num_heads by num_kv_heads"
            )
    if cfg.eval.baseline not in ("auto", "none") and cfg.eval.baseline not in cfg.systems:
        raise DistillmtError(
            f"config key 'eval.baseline' = {cfg.eval.baseline!r} is not a row of the table; choose one of: "
            + ", ".join(["auto", "none", *cfg.systems])
        )
    engine = cfg.hard_kd.decoding.engine
    if engine != "hf" and cfg.hard_kd.num_candidates > 1:
        raise DistillmtError(
            f"hard_kd.decoding.engine={engine} gives one label per source: set hard_kd.num_candidates=1"
        )
    for section in ("generate", "hard_kd.decoding"):
        g = cfg.generate if section == "generate" else cfg.hard_kd.decoding
        if g.engine == "vllm" and g.num_beams > 1:
            raise DistillmtError(f"{section}.engine=vllm does not do beam search: set {section}.num_beams=1")
    if cfg.hard_kd.selection != "score" and cfg.hard_kd.num_candidates < 2:
        raise DistillmtError(f"hard_kd.selection={cfg.hard_kd.selection} needs hard_kd.num_candidates >= 2")


# Keys added after runs were made with the behaviour of their default: they count in a stage's key only when they are
# set off that default, so finished stages of earlier runs keep their keys and are reused.
ADDED_LATER = {
    "GenerateConfig": ("max_batch_tokens", "engine", "quantization"),
    "SoftKDConfig": ("fused", "cache_shard_size"),
}


def keyed_settings(section: Any) -> dict[str, Any]:
    """A config section as a stage's key sees it: every field, except those of :data:`ADDED_LATER` at their default."""
    settings = dataclasses.asdict(section)
    default = type(section)()
    for name in ADDED_LATER.get(type(section).__name__, ()):
        if getattr(section, name) == getattr(default, name):
            del settings[name]
    return settings


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise DistillmtError(f"override {text!r} is not key=value (example: train_student.lr=3e-4)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            if node.get(part) is None:  # also a YAML section whose keys are all commented out
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise DistillmtError(f"override {text!r}: '{part}' is not a section")
        node[path[-1]] = value
    return data


def read_yaml(path: str | Path, what: str = "config") -> dict[str, Any]:
    """A YAML mapping from a file, with one-line errors naming the file (and line) for every way it can be bad."""
    path = Path(path)
    if path.is_dir():
        raise DistillmtError(f"{what} file {path} is a folder, not a YAML file")
    if not path.is_file():
        raise DistillmtError(f"{what} file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise DistillmtError(f"{what} file {path}: not valid UTF-8 (byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise DistillmtError(f"cannot read {what} file {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = (str(getattr(e, "problem", None) or e).splitlines() or [""])[0]
        raise DistillmtError(f"{where}: invalid YAML ({problem})") from None
    if not isinstance(data, dict):
        raise DistillmtError(f"{path}: a {what} must be a mapping of keys to values")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML config (or the built-in defaults when ``path`` is None), apply overrides, validate."""
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    cfg = from_dict(ExperimentConfig, data)
    validate(cfg)
    return cfg


def describe(cls: type = ExperimentConfig, prefix: str = "") -> list[str]:
    """One line per key with default and help: the reference printed by `distillmt config`."""
    lines = []
    default = cls()
    for f in dataclasses.fields(cls):
        value = getattr(default, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            lines.append(f"{key}:  # {f.metadata.get('help', '')}")
            lines.extend(describe(type(value), prefix=f"{key}."))
        else:
            extra = ""
            if f.metadata.get("choices"):
                extra = f" [{'|'.join(f.metadata['choices'])}]"
            elif f.metadata.get("range"):
                lo, hi = f.metadata["range"]
                extra = f" [{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
            lines.append(f"{key} = {value!r}{extra}  # {f.metadata.get('help', '')}")
    return lines
