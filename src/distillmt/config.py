"""The experiment's config: YAML files in configs/ mapped onto :class:`ExperimentConfig`, with range checks and
key=value overrides.

:class:`ExperimentConfig` composes the sections of :mod:`distillmt.sections` (the ones library functions take
whole) with the experiment's own (:class:`EvalConfig`, the rows of the table). Every field carries a help string
and, where it matters, a range or a set of allowed values; one validator walks the tree so an error names the full
dotted key (``train_student.lr``) and what is allowed. Library functions never take the whole config: a stage hands
each its own section.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import types
import typing
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from distillmt import languages
from distillmt import systems as systems_mod
from distillmt.data import check_config as check_data_config
from distillmt.errors import DistillmtError
from distillmt.sections import (
    QWEN_LORA_TARGETS,
    DataConfig,
    GenerateConfig,
    GKDConfig,
    HardKDConfig,
    LoraConfig,
    ModelConfig,
    PromptConfig,
    ScratchConfig,
    SoftKDConfig,
    TrainConfig,
    check_section,
    setting,
)
from distillmt.tracking import TRACKERS

__all__ = [
    "QWEN_LORA_TARGETS", "DataConfig", "EvalConfig", "ExperimentConfig", "GenerateConfig", "GKDConfig",
    "HardKDConfig", "LoraConfig", "ModelConfig", "PromptConfig", "ScratchConfig", "SoftKDConfig", "TrainConfig", "load_config",
]  # fmt: skip

BLEU_TOKENIZERS = ["auto", "zh", "13a", "intl", "char", "none", "ja-mecab", "ko-mecab", "spm", "flores101", "flores200"]
SYSTEMS = systems_mod.NAMES


@dataclass
class EvalConfig:
    bertscore: bool = setting(True, "compute BERTScore (reported as unavailable when its model cannot be loaded)")
    # multilingual-e5 covers the ~100 languages of XLM-R and is built offline from a PyPI package on first use (the
    # study's bert-base-chinese needs the hub, and covers Chinese alone)
    bertscore_model: str = setting(
        "store:multilingual-e5-small", "BERTScore encoder: hub id, local folder or store:NAME"
    )
    bertscore_layer: int = setting(9, "encoder layer used by BERTScore", range=(1, 64))
    bertscore_batch_size: int = setting(64, "BERTScore batch size", range=(1, None))
    bleu_tokenize: str = setting(
        "auto",
        "sacrebleu tokenizer for BLEU; auto = the one sacrebleu picks for data.tgt_lang (zh for Chinese, ja-mecab, "
        "ko-mecab, else 13a, which gives ~0 on unspaced text such as Chinese)",
        choices=BLEU_TOKENIZERS,
    )
    baseline: str = setting(
        "auto",
        "row every other row is tested against (paired bootstrap; CI and p-value per metric): auto = STUDENT_PEFT "
        "when it is a row, else STUDENT; none = no significance test",
        choices=["auto", "none", *SYSTEMS],
    )
    bootstrap_samples: int = setting(
        1000, "bootstrap resamples for the CIs and the significance test", range=(100, None)
    )
    comet_model: str | None = setting(
        None,
        "COMET checkpoint: a local folder (hparams.yaml, checkpoints/model.ckpt) or a hub id such as "
        "Unbabel/wmt22-comet-da; unset = no COMET. Needs pip install 'distillmt[comet]'",
    )
    comet_batch_size: int = setting(16, "COMET batch size", range=(1, None))


def _default_teacher() -> ModelConfig:
    # Loaded in bf16 after training (labels, live teacher, translation): faster on CPUs with native bf16 and GPUs,
    # and no worse in the default table (docs/results/bf16-teacher)
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
    # At 2e-3 this 4-layer teacher stalls on Tatoeba; bf16 autocast: its step is mostly matmul, which bf16 speeds up
    # on CPUs with native bf16, at the same validation loss.
    return TrainConfig(epochs=2.0, batch_size=16, lr=1e-3, mixed_precision="bf16")


def _default_train_student() -> TrainConfig:
    return TrainConfig(epochs=1.0, batch_size=16, lr=3e-3)


@dataclass
class ExperimentConfig:
    """The default values are the default experiment: small Qwen2-architecture teacher and student trained from
    scratch on Tatoeba EN-ZH, with a BPE tokenizer trained on the training split; minutes on 2 CPU cores."""

    name: str = setting("default", "run name: outputs go to <output_dir>/<name>/")
    output_dir: str = setting("runs", "folder that holds run folders")
    seed: int = setting(0, "seed for data split, initialisation, data order and sampling", range=(0, None))
    device: str = setting("auto", "auto | cpu | cuda | cuda:N | mps")
    threads: int = setting(
        0,
        "PyTorch CPU threads (0 = the cores this process may use); on a machine shared with another busy process, "
        "fewer threads than cores is much faster than oversubscribing them",
        range=(0, 1024),
    )
    report_to: list[str] = setting(
        [],
        f"experiment trackers that also get the training losses and the final scores, from {list(TRACKERS)} (each "
        "needs pip install 'distillmt[<name>]'); metrics.jsonl and results.json always have them",
    )
    systems: list[str] = setting(["TEACHER", "STUDENT", "HLKD", "SLKD"], f"rows of the results table, from {SYSTEMS}")
    tokenizer_vocab_size: int = setting(
        4000, "BPE vocabulary trained on the training split when models are scratch", range=(100, None)
    )
    data: DataConfig = setting(DataConfig, "language pair, corpus and splits")
    prompt: PromptConfig = setting(PromptConfig, "the words around each source (chat instruction, plain template)")
    teacher: ModelConfig = setting(_default_teacher, "teacher model")
    student: ModelConfig = setting(_default_student, "student model")
    train_teacher: TrainConfig = setting(_default_train_teacher, "teacher fine-tuning (TEACHER / TEACHER_PEFT)")
    train_student: TrainConfig = setting(
        _default_train_student,
        "student training: one budget for STUDENT(_PEFT), HLKD, SLKD, GKD, SFT_MORE (phase2_max_steps: the steps of "
        "the rows that continue train_student's model)",
    )
    generate: GenerateConfig = setting(GenerateConfig, "decoding of the test set")
    eval: EvalConfig = setting(EvalConfig, "metrics")
    hard_kd: HardKDConfig = setting(HardKDConfig, "sequence-level KD (HLKD)")
    soft_kd: SoftKDConfig = setting(SoftKDConfig, "logit KD (SLKD, GKD)")
    gkd: GKDConfig = setting(GKDConfig, "on-policy KD (GKD)")


# ---------------------------------------------------------------------------------------------------------------------
# Building a config from dicts, files and overrides


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, key: str, word: str | None = None, choices: list[str] | None = None) -> Any:
    """``value`` as type ``tp``; ``word`` is how YAML saw it written where it read a non-string scalar (``no``,
    ``007``), which a str key takes as is."""
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
        if isinstance(value, bool):
            return _bool_word(value, word, choices)
        return value if isinstance(value, str) else word if word is not None else str(value)
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
    words = getattr(data, "words", {})
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
            choices = fields[name].metadata.get("choices")
            kwargs[name] = _coerce(value, hints[name], key, word=words.get(name), choices=choices)
    return cls(**kwargs)


_YAML_TRUE, _YAML_FALSE = ("yes", "on", "true"), ("no", "off", "false")


def _bool_word(value: bool, word: str | None, choices: list[str] | None) -> str:
    """What a str key given a YAML 1.1 boolean means: the word as written (``name=no`` is "no", not "False"), or,
    where that word is not one of the key's choices, the choice that says the same (``mixed_precision: false`` is
    "no"). A boolean with no written word (a dict built in code) reads as "true" / "false"."""
    word = word if word is not None else str(value).lower()
    if choices and word not in choices:
        same = _YAML_TRUE if value else _YAML_FALSE
        return next((c for c in choices if c.lower() in same), word)
    return word


class _Mapping(dict):
    """A config mapping that remembers how its unquoted non-string scalars were written (``words``): YAML 1.1 reads
    ``no``, ``off`` and ``007`` as false, false and 7, and a key whose type is str must get the word itself."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.words: dict[Any, str] = {}


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` written over ``base`` (sections merged key by key), each key keeping how YAML wrote it."""
    out = _Mapping(base)
    out.words.update({k: w for k, w in getattr(base, "words", {}).items() if k not in update})
    out.words.update(getattr(update, "words", {}))
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def validate(cfg: ExperimentConfig) -> None:
    """Check every key against its range/choices (the error names the dotted key and what is allowed), then what
    involves several keys."""
    check_section(cfg)
    _validate_languages(cfg)
    check_data_config(cfg.data)
    _validate_experiment(cfg)
    _validate_paths(cfg)


def _validate_languages(cfg: ExperimentConfig) -> None:
    from distillmt.prompts import make_prompt

    languages.check_code(cfg.data.src_lang, "data.src_lang")
    languages.check_code(cfg.data.tgt_lang, "data.tgt_lang")
    make_prompt(cfg.prompt, cfg.data.src_lang, cfg.data.tgt_lang)  # placeholders, and a name for each language


def resolved(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with the settings that follow the language pair made concrete (``eval.bleu_tokenize: auto``), so the
    run's config.json and stage keys hold what ran; a missing optional BLEU tokenizer is an error now. The data
    section's fields and ``simplified`` too (:meth:`DataConfig.resolved`)."""
    cfg = dataclasses.replace(cfg, data=cfg.data.resolved())
    if cfg.eval.bleu_tokenize != "auto":
        return cfg
    bleu = languages.bleu_tokenizer(cfg.data.tgt_lang)
    return dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, bleu_tokenize=bleu))


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


def check_run_folder(cfg: ExperimentConfig) -> None:
    """Refuse now, naming it, an ``output_dir`` where the run folder cannot be made or written (a read-only folder,
    /proc): found later, the first stage that writes fails with a bare "missing file" or "permission denied". Not
    part of :func:`validate`, which also reads the configs of finished runs, from wherever they are."""
    run = Path(cfg.output_dir) / cfg.name
    existing = next((p for p in (run, *run.parents) if p.exists()), None)
    if existing is None or not existing.is_dir():  # a file in the way: validate() names it
        return
    problem = None
    if not os.access(existing, os.W_OK | os.X_OK):
        problem = "permission denied"
    else:
        # os.access says yes to root even where no folder can be made (/proc, /sys): only making one tells
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".distillmt-check-", dir=existing))
        except OSError as e:
            problem = e.strerror or type(e).__name__
    if problem is not None:
        why = "cannot be written" if existing == run else f"cannot be created: {existing} is not a writable folder"
        raise DistillmtError(f"config key 'output_dir' = {cfg.output_dir!r}: the run folder {run} {why} ({problem})")


def _validate_experiment(cfg: ExperimentConfig) -> None:
    for name in cfg.report_to:  # (whether each is installed is checked before a run, not on every config read)
        if name not in TRACKERS:
            raise DistillmtError(
                f"config key 'report_to' has unknown tracker {name!r}; choose from: {', '.join(TRACKERS)}"
            )
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
    _validate_uld(cfg)
    _validate_phases(cfg)


def _validate_phases(cfg: ExperimentConfig) -> None:
    """What ``keep_best``, ``init_from`` (KD after fine-tuning) and the SFT_MORE row need from the other keys."""
    for section in ("train_teacher", "train_student"):
        t = getattr(cfg, section)
        if t.keep_best and not t.eval_every:
            raise DistillmtError(
                f"config key '{section}.keep_best' = true needs {section}.eval_every > 0: the best weights are picked "
                "among the validations every eval_every steps"
            )
        for key, value, default in (("select_by", t.select_by, "valid_ce"), ("patience", t.patience, 0)):
            if value != default and not t.keep_best:
                raise DistillmtError(
                    f"config key '{section}.{key}' = {value} needs {section}.keep_best=true (it decides which "
                    "validation is the best one)"
                )
    scratch = cfg.teacher.model == "scratch"
    for section in ("hard_kd", "soft_kd", "gkd"):
        init = getattr(cfg, section).init_from
        if init == "STUDENT_PEFT" and scratch:
            raise DistillmtError(
                f"config key '{section}.init_from' = STUDENT_PEFT needs pretrained models; with model=scratch use "
                "STUDENT (train_student's weights)"
            )
        if init == "STUDENT" and not scratch:
            raise DistillmtError(
                f"config key '{section}.init_from' = STUDENT: with pretrained models STUDENT is the base model used "
                "zero-shot; use STUDENT_PEFT (what train_student saved) or none (a fresh student)"
            )
    if cfg.train_teacher.phase2_max_steps:
        raise DistillmtError(
            "config key 'train_teacher.phase2_max_steps' is for train_student: no row continues the teacher's model"
        )
    if "SFT_MORE" in cfg.systems and not cfg.train_student.phase2().max_steps:
        raise DistillmtError(
            "system SFT_MORE needs train_student.max_steps > 0: it takes as many optimizer steps as a KD phase, and "
            "with epochs a KD row's steps would follow the size of its data (labels, extra sources)"
        )


def _validate_uld(cfg: ExperimentConfig) -> None:
    """ULD (``soft_kd.cross_tokenizer=uld``) pairs the teacher's own encoding of a reference or label with the
    student's: the rows it cannot serve are refused before any work."""
    s = cfg.soft_kd
    if s.cross_tokenizer != "uld":
        return
    if "GKD" in cfg.systems:
        raise DistillmtError(
            "soft_kd.cross_tokenizer=uld does not do GKD (the student's on-policy samples have no teacher encoding): "
            "drop GKD from systems, or set soft_kd.cross_tokenizer=refuse"
        )
    if "SLKD" in cfg.systems and s.cache:
        raise DistillmtError(
            "soft_kd.cross_tokenizer=uld runs the teacher live (the logit cache holds its top-k over its own tokens, "
            "position by position): set soft_kd.cache=false"
        )
    if s.fused and {"SLKD", "HLKD+SLKD"} & set(cfg.systems):
        raise DistillmtError("soft_kd.fused has no ULD form: set soft_kd.fused=false with soft_kd.cross_tokenizer=uld")


def parse_override(text: str) -> tuple[list[str], Any, str | None]:
    """``key.path=value`` as (the key's parts, the value as YAML reads it, the word as written where YAML read a
    non-string scalar: ``no`` for ``name=no``, so a str key gets "no", not False)."""
    if "=" not in text:
        raise DistillmtError(f"override {text!r} is not key=value (example: train_student.lr=3e-4)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.load(raw, Loader=_ConfigLoader) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    word = raw.strip() if value is not None and not isinstance(value, (str, dict, list)) else None
    return key.strip().split("."), value, word


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = data if isinstance(data, _Mapping) else _Mapping(data)
    for text in overrides:
        path, value, word = parse_override(text)
        node = data
        for part in path[:-1]:
            if node.get(part) is None:  # also a YAML section whose keys are all commented out
                node[part] = _Mapping()
            elif isinstance(node[part], dict) and not isinstance(node[part], _Mapping):
                node[part] = _Mapping(node[part])
            node = node[part]
            if not isinstance(node, dict):
                raise DistillmtError(f"override {text!r}: '{part}' is not a section")
        node[path[-1]] = value
        node.words.pop(path[-1], None)
        if word is not None:
            node.words[path[-1]] = word
    return data


class _ConfigLoader(yaml.SafeLoader):
    """SafeLoader whose mappings refuse a key given twice (plain YAML keeps the last, silently) and remember how
    their unquoted non-string scalars were written (:class:`_Mapping`)."""


class _DuplicateKey(yaml.constructor.ConstructorError):
    pass


def _construct_mapping(loader: _ConfigLoader, node: yaml.MappingNode) -> _Mapping:
    first_line: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` and then a key of its own is meant to override
            continue
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, Hashable):  # the SafeLoader refuses it below, in its own words
            continue
        if key in first_line:
            raise _DuplicateKey(
                None, None, f"duplicate key {key!r} (first given at line {first_line[key]})", key_node.start_mark
            )
        first_line[key] = key_node.start_mark.line + 1
    out = _Mapping(loader.construct_mapping(node, deep=True))
    for key_node, value_node in node.value:  # merged keys come first here, so a key's own value has the last word
        key = loader.construct_object(key_node, deep=True)
        value = loader.construct_object(value_node, deep=True)
        if isinstance(value_node, yaml.ScalarNode) and value_node.style is None and value is not None:
            if not isinstance(value, str):
                out.words[key] = value_node.value
                continue
        out.words.pop(key, None)
    return out


_ConfigLoader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)


def read_yaml(path: str | Path, what: str = "config") -> dict[str, Any]:
    """A YAML mapping from a file, with one-line errors naming the file (and line) for every way it can be bad."""
    path = Path(path)
    if path.is_dir():
        raise DistillmtError(f"{what} file {path} is a folder, not a YAML file")
    if not path.is_file():
        raise DistillmtError(f"{what} file not found: {path}")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_ConfigLoader) or _Mapping()
    except UnicodeDecodeError as e:
        raise DistillmtError(f"{what} file {path}: not valid UTF-8 (byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise DistillmtError(f"cannot read {what} file {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = (str(getattr(e, "problem", None) or e).splitlines() or [""])[0]
        if isinstance(e, _DuplicateKey):
            raise DistillmtError(f"{where}: {problem}") from None
        raise DistillmtError(f"{where}: invalid YAML ({problem})") from None
    if not isinstance(data, dict):
        raise DistillmtError(f"{path}: a {what} must be a mapping of keys to values")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML config (or the built-in defaults when ``path`` is None), apply overrides, validate."""
    data = read_yaml(path) if path is not None else _Mapping()
    data = apply_overrides(data, overrides or [])
    cfg = from_dict(ExperimentConfig, data)
    cfg.data = cfg.data.resolved()  # config.json shows the fields and conversion the language pair implies
    validate(cfg)
    return resolved(cfg)


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
