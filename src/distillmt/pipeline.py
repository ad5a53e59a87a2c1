"""The experiment as named stages in ``<output_dir>/<name>/<stage>/`` (see :mod:`distillmt.stages` for how a stage
is keyed, skipped, resumed and replaced).

:func:`run_stages` is the table of contents: data → tokenizer → teacher and student fine-tuning → one stage
per KD method (with its teacher labels or teacher cache first) → translate and evaluate each system → significance
against the baseline row → report. Each ``stage_*`` method states the settings that key its output and a function
that makes it; the work itself lives in the library modules (``train``, ``teacher_labels``, ``logit_cache``,
``generate``, ``metrics``, ``stats``). :class:`Models` is the model side (tokenizer, loading, trainable models, the
teacher of logit KD). Adding a KD method: a row in :mod:`distillmt.systems`, a ``stage_train_*`` here and a line in
``run_stages``, a description in ``report.describe_system``.
"""

from __future__ import annotations

import glob
import json
import logging
import platform
import shutil
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import torch

from distillmt import data as data_mod
from distillmt import engines, systems
from distillmt.config import (
    DataConfig,
    EvalConfig,
    ExperimentConfig,
    GenerateConfig,
    GKDConfig,
    ModelConfig,
    TrainConfig,
    resolved,
    to_dict,
)
from distillmt.errors import DistillmtError
from distillmt.io import file_sha256, read_jsonl, write_json, write_jsonl
from distillmt.stages import ATTEMPT_CONFIG, RUN_CONFIG, RunFolder, run_folder_lock, stage_key

log = logging.getLogger("distillmt.pipeline")


def _load_label_teacher(models: Models, which: str, vllm: bool) -> tuple[Any, Any]:
    tokenizer, model = models.tokenizer("teacher"), None if vllm else models.load_teacher(which)
    models.seed()
    return model, tokenizer


class Models:
    """The model side of one experiment: its tokenizer, the base and trained models behind each row, fresh trainable
    models, and the teacher side of logit KD. Reads trained models from the run folder; runs no stage."""

    def __init__(self, cfg: ExperimentConfig, root: Path, device: torch.device, keys: dict[str, str]):
        from distillmt.prompts import make_prompt

        self.cfg, self.root, self.device, self.keys = cfg, root, device, keys
        self.scratch = cfg.teacher.model == "scratch"
        self.prompt = make_prompt(cfg.prompt, cfg.data.src_lang, cfg.data.tgt_lang)

    def seed(self) -> None:
        from transformers import set_seed

        set_seed(self.cfg.seed)

    def dtype(self, m: ModelConfig) -> torch.dtype:
        from distillmt.models import pick_dtype

        return pick_dtype(m.dtype, self.device, scratch=self.scratch)

    def base_model(self, m: ModelConfig) -> Any:
        """Model section ``m``'s pretrained model as it is (no adapter), in its dtype, on the device."""
        from distillmt.models import load_model

        return load_model(m.model, dtype=self.dtype(m), device=self.device)

    def tokenizer(self, side: str = "student") -> Any:
        """The tokenizer of ``side``'s model (``student`` or ``teacher``): each pretrained model's own, or the BPE
        tokenizer that models built from scratch share."""
        from distillmt.models import load_tokenizer

        return load_tokenizer(str(self.root / "tokenizer") if self.scratch else getattr(self.cfg, side).model)

    def encode(self, tokenizer: Any, pairs: list[data_mod.Pair]) -> list[dict]:
        """Training examples: prompt and target token ids, labels masked on the prompt, cut to the data limits."""
        from distillmt.prompts import encode_examples

        d = self.cfg.data
        limits = {"max_source_tokens": d.max_source_tokens, "max_target_tokens": d.max_target_tokens}
        return encode_examples(tokenizer, [(p.src, p.tgt) for p in pairs], **limits, prompt=self.prompt)

    def prompt_settings(self) -> dict[str, Any]:
        """What keys a stage that prompts a model: the prompt, unless it is the default (which keys nothing, as in 0.2)."""
        return {"prompt": self.prompt.settings()} if self.prompt.settings() else {}

    def new_trainable(self, m: ModelConfig, tokenizer: Any, start: Path | None = None) -> Any:
        """A model ready to train: built from scratch, or a pretrained one with LoRA (or all weights) trainable; with
        ``start``, the model a training stage saved there, to train further (:meth:`continued`)."""
        from distillmt.models import apply_lora, build_scratch_model

        self.seed()  # LoRA's random init must not depend on which stages ran before in this process
        if start is not None:
            return self.continued(m, start)
        if self.scratch:
            max_positions = self.cfg.data.max_source_tokens + self.cfg.data.max_target_tokens + 8
            model = build_scratch_model(tokenizer, **asdict(m.scratch), seed=self.cfg.seed, max_positions=max_positions)
        else:
            model = self.base_model(m)
        if m.lora.enabled:
            lora = m.lora
            model = apply_lora(
                model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.target_modules
            )
        return model.to(self.device)

    def continued(self, m: ModelConfig, saved: Path) -> Any:
        """What a training stage saved in ``saved``, ready to train further (KD after fine-tuning): its LoRA adapter
        on the base model, trainable and not merged, or its whole weights (in fp32 for models built from scratch,
        which train in fp32)."""
        from distillmt.models import check_adapter_dir, load_model

        if not (saved / "adapter_config.json").exists():
            return load_model(str(saved), dtype=torch.float32 if self.scratch else self.dtype(m), device=self.device)
        from peft import PeftModel

        check_adapter_dir(saved)
        base = self.base_model(m)
        return PeftModel.from_pretrained(base, str(saved), is_trainable=True).to(self.device)

    def model_settings(self, m: ModelConfig) -> dict[str, Any]:
        """What a training stage depends on from its model section (and the tokenizer built for scratch models)."""
        s = {"model": m.model, "dtype": m.dtype, "lora": asdict(m.lora) if m.lora.enabled else None}
        if self.scratch:
            s["scratch"] = asdict(m.scratch)
            s["tokenizer"] = self.keys["tokenizer"]
        return s

    def teacher_identity(self, which: str) -> dict[str, Any]:
        """What a KD stage depends on from its teacher: the fine-tuning stage's key, or the base model."""
        if which == "finetuned":
            return {"teacher": "finetuned", "train_teacher": self.keys["train_teacher"]}
        return {"teacher": "base", "model": self.cfg.teacher.model, "dtype": self.cfg.teacher.dtype}

    def teacher_id(self) -> str:
        """The soft-label teacher's identity as the logit cache records it."""
        return json.dumps(self.teacher_identity(self.cfg.soft_kd.teacher), sort_keys=True)

    def load_teacher(self, which: str) -> Any:
        from distillmt.models import load_model, load_trained

        t = self.cfg.teacher
        if which == "finetuned":
            path = self.root / "train_teacher" / "model"
            return load_trained(t.model, path, dtype=self.dtype(t), device=self.device, merge=True)
        return load_model(t.model, dtype=self.dtype(t), device=self.device)

    def label_teacher(self, which: str, engine: str) -> tuple[Callable[[], tuple[Any, Any]], Any]:
        """``(load, saved)`` for label generation: ``load()`` gives ``(teacher, tokenizer)`` and is called only when a
        label shard is missing; vLLM loads the weights itself from ``saved`` (see :meth:`saved`), so its ``load()``
        gives no model, and ``saved`` is None for the other engines."""

        vllm = engine == "vllm"
        load = partial(_load_label_teacher, self, which, vllm)  # a function of its arguments: label workers unpickle it
        return load, self.saved(self.cfg.teacher, next(iter(teacher_stage(which)), None)) if vllm else None

    def system_for(self, system: systems.System, engine: str) -> tuple[Any, Any]:
        """``(model, saved)`` to translate a row with: vLLM loads the weights itself (``saved``; no model loaded),
        the other engines take the loaded model."""
        if engine == "vllm":
            return None, self.saved(getattr(self.cfg, system.side), system.trained_stage(self.scratch))
        return self.load_system(system), None

    def saved(self, m: ModelConfig, stage: str | None) -> Any:
        """Where an engine that loads weights itself (vLLM) finds a model: the base model, or what training ``stage``
        saved (full weights, or a LoRA adapter that goes on the base model)."""
        from distillmt.generate import SavedModel
        from distillmt.models import resolve_ref

        dtype = str(self.dtype(m)).removeprefix("torch.")
        trained = None if stage is None else self.root / stage / "model"
        if trained is not None and not (trained / "adapter_config.json").exists():
            return SavedModel(str(trained), None, dtype)
        return SavedModel(resolve_ref(m.model), None if trained is None else str(trained), dtype)

    def load_system(self, system: systems.System) -> Any:
        """The model behind a results row: a base model, or what a training stage saved (adapter or full weights)."""
        from distillmt.models import load_trained

        m = getattr(self.cfg, system.side)
        stage = system.trained_stage(self.scratch)
        if stage is None:
            return self.base_model(m)
        return load_trained(m.model, self.root / stage / "model", dtype=self.dtype(m), device=self.device, merge=True)

    def objective(
        self,
        tokenizer: Any,
        examples: list[dict],
        gkd: GKDConfig | None = None,
        use_cache: bool = True,
        pairs: list[data_mod.Pair] | None = None,
    ) -> Any:
        """The objective of logit KD with the settings of ``soft_kd`` (and ``gkd`` for on-policy targets): the
        teacher live, or its top-k cache when ``soft_kd.cache`` and ``use_cache`` (never for on-policy targets);
        with ``soft_kd.cross_tokenizer=uld``, ULD against the teacher reading ``pairs`` (those ``examples`` encode)
        in its own tokenizer. A token-by-token objective has the teacher read the student's ``examples``."""
        from distillmt.forward import PrefixCache, shared_prefix
        from distillmt.logit_cache import TeacherCache
        from distillmt.models import MergedCopy, check_same_tokenizer
        from distillmt.prompts import end_token_id
        from distillmt.train import Objective

        s = self.cfg.soft_kd
        if s.cross_tokenizer == "uld":
            return self.uld_objective(tokenizer, examples, pairs)
        if not self.scratch:  # logit KD compares token by token: refuse mismatched vocabularies before training
            check_same_tokenizer(self.tokenizer("teacher"), tokenizer)
        if s.cache and use_cache and gkd is None:
            cache = TeacherCache(self.root / "teacher_cache")
            cache.check(teacher_id=self.teacher_id(), k=s.cache_k, temperature=s.temperature,
                        vocab_size=len(tokenizer), examples=examples)  # fmt: skip
            return Objective(s, len(tokenizer), cache=cache)
        lora = gkd is not None and not self.scratch and self.cfg.student.lora.enabled
        return Objective(
            s,
            len(tokenizer),
            teacher=self.load_teacher(s.teacher),
            gkd=gkd,
            end_token_id=end_token_id(tokenizer),
            teacher_prefix=PrefixCache(shared_prefix(examples)),
            sampler=MergedCopy(partial(self.base_model, self.cfg.student)) if lora else None,
        )

    def uld_objective(self, tokenizer: Any, examples: list[dict], pairs: list[data_mod.Pair] | None) -> Any:
        """ULD: the live teacher reads the same ``pairs`` in its own tokenizer and prompt template, example by
        example with the student's ``examples`` (:class:`distillmt.train.TeacherExamples`)."""
        from distillmt.forward import PrefixCache, shared_prefix
        from distillmt.train import Objective, TeacherExamples

        if pairs is None or len(pairs) != len(examples):
            raise ValueError("soft_kd.cross_tokenizer=uld needs the pairs the student's examples encode")
        s, teacher_tok = self.cfg.soft_kd, self.tokenizer("teacher")
        own = self.encode(teacher_tok, pairs)
        side = TeacherExamples(examples, own, vocab_size=len(teacher_tok), pad_token_id=teacher_tok.pad_token_id)
        return Objective(s, len(tokenizer), teacher=self.load_teacher(s.teacher), teacher_examples=side,
                         teacher_prefix=PrefixCache(shared_prefix(own)))  # fmt: skip


class Experiment:
    """The stages of one config. Heavy objects (models) are loaded inside stage functions and freed when they end."""

    def __init__(self, cfg: ExperimentConfig, *, progress: bool = True, store: Path | None = None):
        """``store``: a shared stage store (sweeps); stages whose key another run already computed are reused."""
        from distillmt.models import pick_device

        cfg = resolved(cfg)
        self.cfg, self.progress = cfg, progress
        self.processes = processes_state(cfg.device)  # None for one process
        self.run = RunFolder(Path(cfg.output_dir) / cfg.name, store=store, processes=self.processes)
        self.device = self.processes.device if self.processes and cfg.device == "auto" else pick_device(cfg.device)
        self.scratch, self.keys = cfg.teacher.model == "scratch", {}
        self.is_main = self.processes is None or self.processes.is_main_process
        self.models = Models(cfg, self.run.root, self.device, self.keys)

    # --- what stages share -----------------------------------------------------------------------------------------
    def _stage(self, name: str, settings: dict, fn: Callable, inputs: tuple = (), collective: bool = False) -> dict:
        inputs = tuple(i for i in inputs if i in self.keys)
        result = self.run.stage(name, settings, fn, inputs=inputs, collective=collective)
        self.keys[name] = stage_key(settings)
        return result

    def split(self, name: str) -> list[data_mod.Pair]:
        return data_mod.read_pairs(self.run.root / "data" / f"{name}.jsonl")

    def _train_stage(
        self,
        name: str,
        extra: dict[str, Any],
        data: Callable[[Any], tuple[list[dict], Any]],
        inputs: tuple[str, ...],
        m: ModelConfig | None = None,
        train_cfg: TrainConfig | None = None,
        init: str = "none",
    ) -> dict[str, Any]:
        """A training stage of model section ``m`` (default: the student, with the student budget): ``data(tokenizer)``
        gives its encoded examples and its KD objective (None: plain CE), in that model's own tokenizer. ``init``
        (an ``init_from`` value): none starts a fresh model, STUDENT_PEFT or STUDENT train_student's saved one, with
        an optimizer and schedule of its own."""
        m, train_cfg = m or self.cfg.student, train_cfg or self.cfg.train_student
        start = None if init == "none" else self.run.root / "train_student" / "model"
        if start is not None:  # a second phase
            train_cfg = train_cfg.phase2()

        def run(folder: Path) -> dict[str, Any]:
            tokenizer = self.models.tokenizer("teacher" if m is self.cfg.teacher else "student")
            model, (examples, objective) = self.models.new_trainable(m, tokenizer, start), data(tokenizer)
            self.models.seed()
            valid = self.models.encode(tokenizer, self.split("valid"))
            run = {"seed": self.cfg.seed, "device": self.cfg.device, "progress": self.progress, "desc": name}
            if train_cfg.select_by == "valid_chrf":
                from distillmt.models import MergedCopy

                # GKD's sampler is already a merged copy of this student: validation translates from it too
                merged = getattr(objective, "sampler", None) or MergedCopy(partial(self.models.base_model, m))
                run["score_valid"] = ValidChrF(tokenizer, self.split("valid"), self.cfg.generate, self.models.prompt,
                                               seed=self.cfg.seed, merged=merged)  # fmt: skip
            with open_trackers(self.cfg, name, settings, self.is_main) as trackers:
                return train_and_save(model, tokenizer, (examples, valid), folder, train_cfg, objective,
                                      processes=self.processes, trackers=trackers, **run)  # fmt: skip

        d = self.cfg.data
        settings = {"data": self.keys["data"], "model": self.models.model_settings(m)}
        settings["train"] = train_cfg.key_settings()
        settings.update(seed=self.cfg.seed, max_tokens=[d.max_source_tokens, d.max_target_tokens], **extra)
        settings.update(self.models.prompt_settings())
        if start is not None:  # (absent otherwise: the key of a stage that starts fresh is unchanged)
            settings["init_from"] = {"row": init, "train_student": self.keys["train_student"]}
            inputs = (*inputs, "train_student")
        return self._stage(name, settings, run, inputs=("data", "tokenizer", *inputs), collective=True)

    # --- stages ------------------------------------------------------------------------------------------------------
    def stage_data(self) -> dict[str, Any]:
        d = self.cfg.data

        def fn(folder: Path) -> dict[str, Any]:
            splits, result = data_mod.build_splits(d, self.cfg.seed)
            for name, split in splits.items():
                data_mod.write_pairs(folder / f"{name}.jsonl", split)
            return result

        return self._stage("data", data_settings(d, self.cfg.seed), fn)

    def stage_tokenizer(self) -> dict[str, Any]:
        from distillmt.models import train_bpe_tokenizer

        def fn(folder: Path) -> dict[str, Any]:
            texts = data_mod.tokenizer_training_texts(self.split("train"))
            return {"vocab_size": len(train_bpe_tokenizer(texts, self.cfg.tokenizer_vocab_size, folder))}

        settings = {"data": self.keys["data"], "vocab_size": self.cfg.tokenizer_vocab_size}
        return self._stage("tokenizer", settings, fn, inputs=("data",))

    def references(self, tokenizer: Any) -> tuple[list[dict], None]:
        """Training data of plain fine-tuning: the references, no KD."""
        return self.models.encode(tokenizer, self.split("train")), None

    def kd_data(self, tokenizer: Any, gkd: GKDConfig | None = None) -> tuple[list[dict], Any]:
        """Training data of logit KD: the references, and the objective (see ``Models.objective``)."""
        pairs = self.split("train")
        examples = self.models.encode(tokenizer, pairs)
        return examples, self.models.objective(tokenizer, examples, gkd, pairs=pairs)

    def stage_train_teacher(self) -> dict[str, Any]:
        """The fine-tuned teacher (TEACHER_PEFT; TEACHER itself when built from scratch), on the references."""
        return self._train_stage("train_teacher", {}, self.references, (), self.cfg.teacher, self.cfg.train_teacher)

    def stage_train_student(self) -> dict[str, Any]:
        """The student fine-tuned on the references (STUDENT_PEFT; STUDENT when built from scratch)."""
        return self._train_stage("train_student", {}, self.references, ())

    def stage_train_sft_more(self) -> dict[str, Any]:
        """SFT_MORE: train_student's model fine-tuned on the references for as many more steps as a KD phase that
        starts from it takes (the student budget; an optimizer and schedule of its own): KD after fine-tuning
        against fine-tuning alone, at equal compute."""
        init = "STUDENT" if self.scratch else "STUDENT_PEFT"
        return self._train_stage("train_sft_more", {}, self.references, (), init=init)

    def stage_teacher_labels(self) -> dict[str, Any]:
        """Sequence-level KD data: the teacher translates every training source, shard by shard."""
        from distillmt.teacher_labels import build_teacher_labels, label_workers

        h = self.cfg.hard_kd
        identity = self.models.teacher_identity(h.teacher)

        def fn(folder: Path) -> dict[str, Any]:
            load, saved = self.models.label_teacher(h.teacher, h.decoding.engine)
            sources = self.split("train") + [data_mod.Pair(src, "") for src in extra_label_sources(self.cfg)]
            run = {"identity": identity, "progress": self.progress, "processes": self.processes, "saved": saved}
            cpu, engine = self.device.type == "cpu", h.decoding.engine
            run.update(
                prompt=self.models.prompt,
                workers=label_workers(h.workers, cpu=cpu, scratch=self.scratch, engine=engine),
            )
            result = build_teacher_labels(load, sources, folder, h, seed=self.cfg.seed, **run)
            return {**result, "label_length": label_length(folder, result["shards"], log_it=self.is_main)}

        settings = {"data": self.keys["data"], "teacher": identity, "decoding": h.decoding.output_settings()}
        settings.update(num_candidates=h.num_candidates, selection=h.selection, seed=self.cfg.seed)
        settings.update(shard_size=h.shard_size, **self.models.prompt_settings())
        if h.extra_sources or h.extra_sources_file:  # (absent otherwise: the key of a run without them is unchanged)
            settings["extra_sources"] = {"n": h.extra_sources, "file": _sha256(h.extra_sources_file)}
        inputs = ("data", *teacher_stage(h.teacher))
        return self._stage("teacher_labels", settings, fn, inputs=inputs, collective=True)

    def label_pairs(self) -> list[data_mod.Pair]:
        """The pairs of sequence-level KD: the teacher's labels (a seeded share of references mixed in), as text."""
        from distillmt.teacher_labels import read_label_pairs

        h, shards = self.cfg.hard_kd, self.run.result("teacher_labels")["shards"]
        return read_label_pairs(self.run.root / "teacher_labels", shards, h.mix_references, seed=self.cfg.seed)

    def label_data(self, tokenizer: Any) -> tuple[list[dict], None]:
        """Training data of sequence-level KD: :meth:`label_pairs` in the student's tokenizer."""
        return self.models.encode(tokenizer, self.label_pairs()), None

    def stage_train_hlkd(self) -> dict[str, Any]:
        """HLKD: a student (fresh, or ``hard_kd.init_from``) trained with CE on the teacher's labels (sequence-level
        KD)."""
        extra = {"labels": self.keys["teacher_labels"], "mix_references": self.cfg.hard_kd.mix_references}
        init = start_of(self.cfg, "HLKD")
        return self._train_stage("train_hlkd", extra, self.label_data, ("teacher_labels",), init=init)

    def stage_train_hlkd_slkd(self) -> dict[str, Any]:
        """HLKD+SLKD (sequence- plus word-level KD, Kim & Rush 2016): a student (fresh, or ``soft_kd.init_from``)
        trained on the teacher's labels with the soft-label objective. The teacher runs live: a logit cache holds the
        references' positions."""
        s = self.cfg.soft_kd

        def data(tokenizer: Any) -> tuple[list[dict], Any]:
            pairs = self.label_pairs()
            examples = self.models.encode(tokenizer, pairs)
            return examples, self.models.objective(tokenizer, examples, use_cache=False, pairs=pairs)

        extra = {"labels": self.keys["teacher_labels"], "mix_references": self.cfg.hard_kd.mix_references}
        extra.update(kd=s.objective_settings(), teacher=self.models.teacher_identity(s.teacher))
        inputs, init = ("teacher_labels", *teacher_stage(s.teacher)), start_of(self.cfg, "HLKD+SLKD")
        return self._train_stage("train_hlkd_slkd", extra, data, inputs, init=init)

    def stage_teacher_cache(self) -> dict[str, Any]:
        """Soft-label KD data: the teacher's top-k log-probs per target token, so SLKD trains without the teacher."""
        from distillmt.logit_cache import build_teacher_cache

        s = self.cfg.soft_kd

        def fn(folder: Path) -> dict[str, Any]:
            # top-k by token id, position by position of the student's examples: one vocabulary (see preflight)
            tokenizer, teacher = self.models.tokenizer(), self.models.load_teacher(s.teacher)
            args = {"teacher_id": self.models.teacher_id(), "k": s.cache_k, "temperature": s.temperature}
            args.update(vocab_size=len(tokenizer), batch_size=self.cfg.train_student.batch_size, device=self.device)
            args.update(pad_token_id=tokenizer.pad_token_id, progress=self.progress, processes=self.processes)
            args["shard_size"] = s.cache_shard_size
            examples = self.models.encode(tokenizer, self.split("train"))
            return {"entries": len(build_teacher_cache(teacher, examples, folder, **args))}

        d = self.cfg.data
        settings = {"data": self.keys["data"], "teacher": self.models.teacher_identity(s.teacher), "k": s.cache_k}
        settings.update(temperature=s.temperature, max_tokens=[d.max_source_tokens, d.max_target_tokens])
        settings.update(shard_size=s.cache_shard_size, **self.models.prompt_settings())
        if self.scratch:
            settings["tokenizer"] = self.keys["tokenizer"]
        inputs = ("data", "tokenizer", *teacher_stage(s.teacher))
        return self._stage("teacher_cache", settings, fn, inputs=inputs, collective=True)

    def stage_train_slkd(self) -> dict[str, Any]:
        """SLKD: a student (fresh, or ``soft_kd.init_from``) trained on the references with alpha·CE + (1 − alpha)·T²·D
        against the teacher."""
        s = self.cfg.soft_kd
        extra = {"kd": s.objective_settings(), "teacher": self.models.teacher_identity(s.teacher)}
        if s.cache:
            extra["cache"] = self.keys["teacher_cache"]
        inputs = ("teacher_cache",) if s.cache else teacher_stage(s.teacher)
        return self._train_stage("train_slkd", extra, self.kd_data, inputs, init=start_of(self.cfg, "SLKD"))

    def stage_train_gkd(self) -> dict[str, Any]:
        """GKD: like SLKD (with ``gkd.divergence``, ``gkd.beta`` and ``gkd.init_from``), but with probability lambda
        a step's targets are sampled by the student itself."""
        s, g, data = self.cfg.soft_kd, self.cfg.gkd, partial(self.kd_data, gkd=self.cfg.gkd)
        extra = {"kd": g.objective(s).objective_settings(), "teacher": self.models.teacher_identity(s.teacher)}
        extra["gkd"] = g.key_settings()
        return self._train_stage("train_gkd", extra, data, teacher_stage(s.teacher), init=start_of(self.cfg, "GKD"))

    def stage_translate(self, name: str) -> dict[str, Any]:
        """The test set translated by one system; with several processes, each translates its share of the batches."""
        system = systems.get(name)
        g = self.cfg.generate

        def fn(folder: Path) -> dict[str, Any]:
            tokenizer, test = self.models.tokenizer(system.side), self.split("test")
            model, saved = self.models.system_for(system, g.engine)
            self.models.seed()
            run = {"seed": self.cfg.seed, "progress": self.progress, "desc": f"translate {name}"}
            run["prompt"] = self.models.prompt
            return {
                **translate_split(model, tokenizer, test, folder, g, self.processes, saved=saved, **run),
                "device": str(self.device),
            }

        stage = system.trained_stage(self.scratch)
        m = getattr(self.cfg, system.side)
        source = {"base": m.model, "dtype": m.dtype} if stage is None else {"stage": stage, "key": self.keys[stage]}
        settings = {"system": name, "model": source, "generate": g.output_settings(), "data": self.keys["data"]}
        settings.update(seed=self.cfg.seed, **self.models.prompt_settings())
        inputs = ("data", "tokenizer", *([stage] if stage else []))
        return self._stage(f"translate_{name}", settings, fn, inputs=inputs, collective=True)

    def stage_evaluate(self, name: str) -> dict[str, Any]:
        """Corpus scores (scores.json, into the report) and per-sentence scores (sentences.jsonl, in test order)."""
        from distillmt.metrics import evaluate_with_sentences

        e = self.cfg.eval
        source = self.run.root / f"translate_{name}" / "translations.jsonl"

        def fn(folder: Path) -> dict[str, Any]:
            rows, test = read_jsonl(source), self.split("test")
            if [r["ref"] for r in rows] != [p.tgt for p in test]:  # every row must be scored on the whole test set
                raise DistillmtError(f"{source} does not hold the {len(test)} test sentences; delete {source.parent}")
            options = metric_options(e, str(self.device), rows)
            scores, sentences = evaluate_with_sentences([r["hyp"] for r in rows], [r["ref"] for r in rows], **options)
            write_json(folder / "scores.json", scores)
            write_jsonl(folder / "sentences.jsonl", sentences)
            return scores

        settings = {"translations": self.keys[f"translate_{name}"], "eval": evaluate_settings(e)}
        return self._stage(f"evaluate_{name}", settings, fn, inputs=(f"translate_{name}",))

    def stage_significance(self) -> dict[str, Any]:
        """Every row against the baseline row by paired bootstrap (score, 95% CI, p-value; see ``stats``); without a
        baseline row (or with ``eval.baseline=none``) nothing runs and the result is ``{"skipped": reason}``."""
        from distillmt import stats

        e, rows = self.cfg.eval, list(self.cfg.systems)
        baseline = stats.pick_baseline(e.baseline, rows)
        if baseline is None:
            log.info("stage %-22s skipped: %s", "significance", stats.no_baseline_reason(e.baseline, rows))
            return {"skipped": stats.no_baseline_reason(e.baseline, rows)}

        def fn(folder: Path) -> dict[str, Any]:
            test = {"bleu_tokenize": e.bleu_tokenize, "n_samples": e.bootstrap_samples}
            result = compare_run_rows(self.run.root, rows, [p.tgt for p in self.split("test")], baseline, **test)
            write_json(folder / "significance.json", result)
            return result

        settings = {"evaluate": {name: self.keys[f"evaluate_{name}"] for name in rows}, "baseline": baseline}
        settings.update(n_samples=e.bootstrap_samples, seed=stats.sacrebleu_seed())
        inputs = tuple(f"{stage}_{name}" for name in rows for stage in ("translate", "evaluate"))
        return self._stage("significance", settings, fn, inputs=inputs)

    # --- the whole experiment ----------------------------------------------------------------------------------------
    def run_all(self, command: str | None = None) -> dict[str, Any]:
        """Every stage the config needs, then the report, with the run folder held throughout (:func:`hold`)."""
        with hold(self):
            return run_stages(self, command)


def run_stages(exp: Experiment, command: str | None) -> dict[str, Any]:
    """The table of contents of an experiment: every stage its config needs, in order, then the report."""
    from distillmt.report import describe_system, write_report

    cfg = exp.cfg
    preflight(cfg)
    started, needed = time.perf_counter(), needed_stages(cfg)
    if exp.is_main:  # config.json stays the last finished run's until this one has its report
        write_json(exp.run.root / ATTEMPT_CONFIG, to_dict(cfg))
    exp.stage_data()
    if exp.scratch:
        exp.stage_tokenizer()
    # the student first: it needs no teacher, so its row exists even when the teacher's training fails or is stopped
    if "train_student" in needed:
        exp.stage_train_student()
    if "train_teacher" in needed:
        exp.stage_train_teacher()
    if "train_sft_more" in needed:
        exp.stage_train_sft_more()
    if needed & {"train_hlkd", "train_hlkd_slkd"}:
        exp.stage_teacher_labels()
    if "train_hlkd" in needed:
        exp.stage_train_hlkd()
    if "train_slkd" in needed and cfg.soft_kd.cache:
        exp.stage_teacher_cache()
    if "train_slkd" in needed:
        exp.stage_train_slkd()
    if "train_gkd" in needed:
        exp.stage_train_gkd()
    if "train_hlkd_slkd" in needed:
        exp.stage_train_hlkd_slkd()
    rows = {}
    for name in cfg.systems:
        translation, scores = exp.stage_translate(name), exp.stage_evaluate(name)
        rows[name] = {"scores": scores, "translation": translation, "settings": describe_system(cfg, name)}
    report = {"name": cfg.name, "command": command, "systems": rows, "significance": exp.stage_significance()}
    report["stages"] = exp.run.timings
    report.update(wall_seconds=time.perf_counter() - started, machine=_machine(exp.device), config=to_dict(cfg))
    if exp.is_main:
        write_report(exp.run.root, report)
        write_json(exp.run.root / RUN_CONFIG, report["config"])
        (exp.run.root / ATTEMPT_CONFIG).unlink(missing_ok=True)
    return report


def preflight(cfg: ExperimentConfig) -> None:
    """Fail in seconds, before any stage, on what can be checked up front: a pretrained model that cannot be
    reached (e.g. a hub id offline), a missing local data file, a BERTScore layer the encoder lacks, a tracker
    that is not installed."""
    from distillmt.metrics import check_bertscore
    from distillmt.models import check_loadable, resolve_ref
    from distillmt.tracking import check_trackers

    check_trackers(cfg.report_to)
    check_data_files(cfg.data)
    extra = cfg.hard_kd.extra_sources_file
    if extra:
        _check_file(extra, "hard_kd.extra_sources_file")
    if cfg.eval.bertscore:
        check_bertscore(cfg.eval.bertscore_model, cfg.eval.bertscore_layer)
    if cfg.eval.comet_model:
        from distillmt import comet

        comet.check(cfg.eval.comet_model)
    for key, g in (("generate", cfg.generate), ("hard_kd.decoding", cfg.hard_kd.decoding)):
        check_engine(g.engine, key)
    if cfg.teacher.model != "scratch":
        for m in (cfg.teacher, cfg.student):
            check_loadable(resolve_ref(m.model))
        check_soft_label_tokenizers(cfg)


SOFT_LABEL_ROWS = ("SLKD", "HLKD+SLKD", "GKD")


def check_soft_label_tokenizers(cfg: ExperimentConfig) -> None:
    """Soft labels compared token by token need one vocabulary: a soft-label row between pretrained models whose
    tokenizers differ is refused now (only the tokenizers are loaded), unless ``soft_kd.cross_tokenizer=uld``."""
    from distillmt.models import load_tokenizer, tokenizer_difference

    rows = [r for r in cfg.systems if r in SOFT_LABEL_ROWS]
    if cfg.teacher.model == "scratch" or not rows or cfg.soft_kd.cross_tokenizer == "uld":
        return
    difference = tokenizer_difference(load_tokenizer(cfg.teacher.model), load_tokenizer(cfg.student.model))
    if difference is not None:
        raise DistillmtError(
            f"teacher.model and student.model have different tokenizers ({difference}), and {', '.join(rows)} "
            "compare their distributions token by token. Between these two models TEACHER, TEACHER_PEFT, STUDENT, "
            "STUDENT_PEFT and HLKD work (labels are text); for SLKD and HLKD+SLKD set soft_kd.cross_tokenizer=uld "
            "(Universal Logit Distillation; GKD has no cross-tokenizer form here)"
        )


def metric_options(e: EvalConfig, device: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``evaluate_with_sentences``'s options from the eval section, for these translations.jsonl rows (COMET also
    reads their sources)."""
    options = {"bleu_tokenize": e.bleu_tokenize, "bertscore_model": e.bertscore_model if e.bertscore else None}
    options.update(bertscore_layer=e.bertscore_layer, bertscore_batch_size=e.bertscore_batch_size, device=device)
    if e.comet_model:
        sources = [r.get("src") for r in rows]
        if not all(isinstance(src, str) for src in sources):
            raise DistillmtError("COMET needs the source sentences: translations.jsonl rows without 'src'")
        options.update(sources=sources, comet_model=e.comet_model, comet_batch_size=e.comet_batch_size)
    return options


def evaluate_settings(e: EvalConfig) -> dict[str, Any]:
    """What keys an evaluate stage: the metric settings (not the significance test's); the COMET ones only when
    COMET is on, so the keys of runs without it stay what they were before COMET existed."""
    skip = {"baseline", "bootstrap_samples"} | ({"comet_model", "comet_batch_size"} if e.comet_model is None else set())
    return {k: v for k, v in asdict(e).items() if k not in skip}


def check_data_files(d: DataConfig) -> None:
    """Every file the data section names exists (a hub name of source=hf cannot be checked here), naming its key."""
    if d.source in data_mod.FILE_SOURCES and not d.path:
        what = "a dataset name" if d.source == "hf" else "a file"
        raise DistillmtError(f"data.source={d.source} needs data.path ({what})")
    if d.source == "text" and not d.tgt_path:
        raise DistillmtError("data.source=text needs data.tgt_path (the target-side file, line by line with data.path)")
    for key in ("path", *_GIVEN_FILES):
        path = getattr(d, key)
        if not path or (key == "path" and d.source == "hsk"):
            continue
        if d.source == "hf" and key in ("path", "valid_path", "test_path"):
            looks_local = Path(path).suffix.lower() in data_mod.HF_BUILDERS and not glob.has_magic(path)
            if not looks_local:  # a folder, a glob, or a hub name: the loader says what is wrong
                continue
        _check_file(path, f"data.{key}", f" (data.source={d.source})")


def _check_file(path: str, key: str, note: str = "") -> None:
    if Path(path).is_dir():
        raise DistillmtError(f"config key '{key}' = {path!r} is a folder, not a file{note}")
    if not Path(path).is_file():
        raise DistillmtError(f"config key '{key}': file not found: {path}{note}")


def check_engine(engine: str, key: str) -> None:
    """A generation engine that cannot run here is refused before any stage: CTranslate2 must be installed, vLLM must
    be installed and have a GPU."""
    import importlib.util

    if engine == "ct2" and importlib.util.find_spec("ctranslate2") is None:
        raise DistillmtError(f"config key '{key}.engine' = ct2 needs CTranslate2: pip install 'distillmt[ct2]'")
    if engine == "vllm" and (importlib.util.find_spec("vllm") is None or not torch.cuda.is_available()):
        raise DistillmtError(
            f"config key '{key}.engine' = vllm needs vLLM and a CUDA GPU, and this machine lacks "
            f"{'vLLM' if importlib.util.find_spec('vllm') is None else 'a GPU'}: use engine hf or ct2"
        )


def needed_stages(cfg: ExperimentConfig) -> set[str]:
    """The training stages the requested systems need: their own, and the fine-tuned teacher of any KD row
    that learns from it."""
    rows = [systems.get(name) for name in cfg.systems]
    needed = {s.trained_stage(cfg.teacher.model == "scratch") for s in rows} - {None}
    if any(getattr(cfg, section).teacher == "finetuned" for s in rows for section in s.teacher_from):
        needed.add("train_teacher")
    if "train_sft_more" in needed or any(start_of(cfg, s.name) != "none" for s in rows):
        needed.add("train_student")  # the model they start from, even when STUDENT_PEFT is not a row
    return needed


def start_of(cfg: ExperimentConfig, row: str) -> str:
    """Where a KD row's student starts: its section's ``init_from`` (none for rows without one: a fresh model)."""
    section = systems.get(row).init_from
    return getattr(cfg, section).init_from if section else "none"


def hold(exp: Experiment) -> AbstractContextManager:
    """The run folder of ``exp``, for it alone while it lasts (see :func:`run_folder_lock`). Under a sweep (a shared
    stage store) a run that finds its folder held waits instead: two sweeps that run the same point take turns."""
    return run_folder_lock(exp.run.root, wait=exp.run.store is not None, processes=exp.processes)


def processes_state(device: str) -> Any:
    """accelerate's state of the processes when several run the experiment together (torchrun, accelerate launch:
    ``WORLD_SIZE`` > 1), else None. Waits between processes may last as long as a stage the main process runs alone."""
    import datetime
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    from distillmt.engines import engine_name, process_group

    cpu, backend = process_group(device)
    state = PartialState(cpu=cpu, timeout=datetime.timedelta(hours=24), **({"backend": backend} if backend else {}))
    if state.is_main_process:
        log.info("%d processes (%s): training stages run on all of them under %s, the others on this one",
                 state.num_processes, state.distributed_type, engine_name())  # fmt: skip
    return state


def translate_split(
    model: Any, tokenizer: Any, pairs: list[data_mod.Pair], folder: Path, cfg: GenerateConfig, processes: Any,
    saved: Any = None, **run: Any,
) -> dict[str, Any]:  # fmt: skip
    """``pairs`` translated into ``folder/translations.jsonl`` (src, ref, hyp per line, in order); returns the row's
    figures. With several processes each translates its share of the batches, and the main process writes the
    merged rows. ``saved``: where vLLM finds the weights when ``model`` is None (see ``Models.system_for``)."""
    from accelerate.utils import gather_object

    from distillmt.generate import merge_shards, process_shard, release_vllm, translate_with_engine
    from distillmt.models import count_parameters, saved_parameter_count

    shard = process_shard(processes)
    res, engine = translate_with_engine(
        model, tokenizer, [p.src for p in pairs], cfg, work_dir=folder, shard=shard, saved=saved, **run
    )
    release_vllm()
    if processes is not None:
        res = merge_shards(gather_object([res]))
    if processes is None or processes.is_main_process:
        rows = [{"src": p.src, "ref": p.tgt, "hyp": h} for p, h in zip(pairs, res.hypotheses, strict=True)]
        write_jsonl(folder / "translations.jsonl", rows)
    n_params = count_parameters(model)["total"] if model is not None else saved_parameter_count(saved.folder)
    return {"parameters": n_params, **res.summary(), "engine": engine, "processes": shard[1]}


def _sha256(path: str | None) -> str | None:
    return file_sha256(path) if path else None


_GIVEN_FILES = ("tgt_path", "valid_path", "valid_tgt_path", "test_path", "test_tgt_path")


def data_settings(d: DataConfig, seed: int) -> dict[str, Any]:
    """What keys the data stage: the data section as resolved, less the token limits (they key the stages that
    encode) and the languages (they act through the fields and ``simplified`` here, and the prompt where a model is
    prompted; tatoeba and hsk read their direction from them: keyed when it is not en→zh); each local file by its
    sha256, since it can change under the same name; the paths added since 0.2 only when set."""
    d = d.resolved()
    unkeyed = ("max_source_tokens", "max_target_tokens", "src_lang", "tgt_lang", *_GIVEN_FILES)
    settings = {k: v for k, v in asdict(d).items() if k not in unkeyed}
    settings["seed"] = seed
    if d.source in ("tatoeba", "hsk") and (d.src_lang, d.tgt_lang) != ("en", "zh"):
        settings["languages"] = [d.src_lang, d.tgt_lang]
    if d.path and d.source != "tatoeba":  # (a tatoeba path was never hashed: keys of 0.2 runs stay)
        sha = data_mod.fingerprint(d.path)
        if sha is not None:
            settings["file_sha256"] = sha
    for key in _GIVEN_FILES:
        if getattr(d, key):
            settings[key] = {"path": getattr(d, key), "sha256": data_mod.fingerprint(getattr(d, key))}
    return settings


def extra_label_sources(cfg: ExperimentConfig) -> list[str]:
    """The extra source sentences of sequence-level KD (``hard_kd.extra_sources``): the first N lines of
    ``extra_sources_file``, or the first N corpus sources that the data split leaves out of every split."""
    h, d = cfg.hard_kd, cfg.data
    if h.extra_sources_file:
        lines = Path(h.extra_sources_file).read_text(encoding="utf-8").splitlines()
        sources = [data_mod.normalize(line) for line in lines if line.strip()]
        return sources[: h.extra_sources] if h.extra_sources else sources
    if not h.extra_sources:
        return []
    pairs, given, _ = data_mod.load_corpus(d)
    unused = data_mod.unused_sources(pairs, **data_mod.cut_sizes(d, given), seed=cfg.seed)
    if len(unused) < h.extra_sources:
        raise DistillmtError(
            f"hard_kd.extra_sources = {h.extra_sources}, but the corpus has only {len(unused)} sources left out of "
            "every split; lower it, lower data.train_size, or give hard_kd.extra_sources_file"
        )
    return unused[: h.extra_sources]


def label_length(folder: Path, shards: list[str], log_it: bool = True) -> dict[str, Any]:
    """How long the teacher's labels are against the references, on the sources that have one: the mean characters
    of each, their ratio and the number of sources (students trained on short labels translate short)."""
    rows = [r for name in shards for r in read_jsonl(folder / name) if r.get("ref") is not None]
    label, ref = (sum(len(r[k]) for r in rows) / len(rows) if rows else None for k in ("label", "ref"))
    ratio = label / ref if rows and ref else None
    if log_it and ratio is not None:
        log.info("teacher labels: on the %d sources with a reference they average %.2f characters, the references "
                 "%.2f (ratio %.3f)", len(rows), label, ref, ratio)  # fmt: skip
    return {"sources": len(rows), "label_chars": label, "reference_chars": ref, "ratio": ratio}


def teacher_stage(which: str) -> tuple[str, ...]:
    """The stage a KD stage reads its teacher from: the fine-tuning stage, or none for the base model."""
    return ("train_teacher",) if which == "finetuned" else ()


def compare_run_rows(
    root: Path, rows: list[str], refs: list[str], baseline: str, *, bleu_tokenize: str, n_samples: int
) -> dict[str, Any]:
    """The significance test of a run folder's rows against ``baseline``, from their translations and per-sentence
    scores (``None`` where a metric was not measured)."""
    from distillmt import stats
    from distillmt.metrics import sentence_scores

    hyps = {name: [r["hyp"] for r in read_jsonl(root / f"translate_{name}" / "translations.jsonl")] for name in rows}
    sentences = {name: read_jsonl(root / f"evaluate_{name}" / "sentences.jsonl") for name in rows}
    return stats.compare_to_baseline(hyps, refs, baseline, sentence_scores=sentence_scores(sentences),
                                     bleu_tokenize=bleu_tokenize, n_samples=n_samples)  # fmt: skip


class ValidChrF:
    """The ``select_by=valid_chrf`` measure of a model in training: sacrebleu's corpus chrF of ``pairs``' sources
    translated as the test set will be (the ``generate`` settings, in transformers whatever ``g.engine`` says: the
    model is the one in memory). A LoRA model translates as its row will, its adapter merged into ``merged``, a plain
    copy of the base model (:class:`distillmt.models.MergedCopy`, which may also serve GKD's sampling); the model in
    training is left as it is."""

    def __init__(
        self, tokenizer: Any, pairs: list[data_mod.Pair], g: GenerateConfig, prompt: Any, *, seed: int, merged: Any
    ):
        self.tokenizer, self.pairs, self.g, self.prompt, self.seed = tokenizer, pairs, g, prompt, seed
        self.merged = merged

    def __call__(self, model: Any) -> float:
        from distillmt.generate import translate
        from distillmt.metrics import chrf

        if hasattr(model, "merge_and_unload"):  # a peft model
            model = self.merged(model)
        sources = [p.src for p in self.pairs]
        hyps = translate(model, self.tokenizer, sources, self.g, seed=self.seed, progress=False, prompt=self.prompt)
        return chrf(hyps.hypotheses, [p.tgt for p in self.pairs])["score"]


def train_and_save(
    model: Any,
    tokenizer: Any,
    data: tuple[list[dict], list[dict]],
    folder: Path,
    cfg: TrainConfig,
    objective: Any = None,
    processes: Any = None,
    **run: Any,
) -> dict[str, Any]:
    """Train on ``data`` (training and validation examples; resuming from ``folder``'s checkpoints), then save the
    model to ``folder/model`` atomically. ``run``: the other keyword arguments of :func:`distillmt.train.train`."""
    from distillmt.engines import full_state_dict
    from distillmt.models import count_parameters, save_trained
    from distillmt.train import train

    summary = train(model, *data, folder, cfg, objective, pad_token_id=tokenizer.pad_token_id, **run)
    state = full_state_dict(model)  # under FSDP the processes gather their shards; else None
    if processes is None or processes.is_main_process:  # under DDP the processes all hold the same weights
        shutil.rmtree(folder / "model.tmp", ignore_errors=True)
        save_trained(model, tokenizer, folder / "model.tmp", state_dict=state)
        shutil.rmtree(folder / "model", ignore_errors=True)
        (folder / "model.tmp").rename(folder / "model")
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)  # the saved model supersedes them
    if processes is not None:
        processes.wait_for_everyone()
    return {**summary, "parameters": count_parameters(model)}


def _machine(device: torch.device) -> dict[str, Any]:
    import os

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": engines.cpu_name(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run_experiment(
    cfg: ExperimentConfig, *, progress: bool = True, command: str | None = None, store: Path | None = None
) -> dict[str, Any]:
    try:
        exp = Experiment(cfg, progress=progress, store=store)
        report = exp.run_all(command)
    except FileNotFoundError as e:
        raise DistillmtError(f"missing file: {e.filename}") from None
    if exp.is_main:
        log_results(cfg, report)
    return report


def open_trackers(
    cfg: ExperimentConfig, run_name: str, config: dict[str, Any], is_main: bool = True
) -> AbstractContextManager[list[Any]]:
    """The started trackers of ``report_to`` (none by default) for the tracker run ``run_name`` of this experiment
    (see :mod:`distillmt.tracking`): the experiment's name is the project, TensorBoard writes
    ``<run folder>/tensorboard/<run_name>/``. Processes other than the main one get none."""
    from distillmt.tracking import tracker_run

    if not cfg.report_to or not is_main:
        return nullcontext([])
    root = Path(cfg.output_dir) / cfg.name
    return tracker_run(cfg.report_to, cfg.name, run_name, root / "tensorboard", config, device=cfg.device)


def log_results(cfg: ExperimentConfig, report: dict[str, Any]) -> None:
    """Every row's corpus scores (``<metric>/<ROW>``, at step 0) to the trackers of ``report_to``, as the tracker run
    ``results`` with the whole config as its hyperparameters; every run logs them, even one whose stages were all
    done before."""
    from distillmt.tracking import log_values, score_values

    with open_trackers(cfg, "results", report["config"]) as trackers:
        log_values(trackers, score_values(report["systems"]), step=0)


def train_role(cfg: ExperimentConfig, role: str, *, progress: bool = True) -> tuple[dict[str, Any], Path]:
    """Fine-tune one model of the experiment alone (``role``: teacher or student) with the stages it needs (data,
    tokenizer); returns the training stage's result and the folder of the trained model."""
    exp = Experiment(cfg, progress=progress)
    with hold(exp):
        preflight(cfg)
        exp.stage_data()
        if exp.scratch:
            exp.stage_tokenizer()
        result = exp.stage_train_teacher() if role == "teacher" else exp.stage_train_student()
    return result, exp.run.root / f"train_{role}" / "model"
