"""The experiment as named stages in ``<output_dir>/<name>/<stage>/``.

A stage is identified by a key: the hash of the settings that determine its output, upstream stage keys included.
``stage.json`` is written last, so a stage whose ``stage.json`` carries the current key is complete and is skipped
on rerun; one that was interrupted resumes from what it left (training checkpoints, label shards, cache shards) as
long as its key is unchanged, and starts afresh when a setting that shapes it changed. Sweeps can later share a
stage between runs through the same keys.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from distillmt import data as data_mod
from distillmt.config import ExperimentConfig, to_dict
from distillmt.errors import DistillmtError
from distillmt.io import read_json, read_jsonl, write_json, write_jsonl

log = logging.getLogger("distillmt.pipeline")


def stage_key(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Run:
    """Bookkeeping for one run folder: which stages are done, with which keys, and how long each took."""

    def __init__(self, root: Path):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.timings: dict[str, dict[str, Any]] = {}

    def stage(self, name: str, settings: dict[str, Any], fn: Callable[[Path], dict[str, Any] | None]) -> dict[str, Any]:
        key = stage_key(settings)
        folder = self.root / name
        done = folder / "stage.json"
        if done.exists():
            info = read_json(done)
            if info.get("key") == key:
                log.info("stage %-22s skipped: complete (key %s)", name, key)
                self.timings[name] = {"seconds": info.get("seconds"), "skipped": True, "key": key}
                return info["result"]
            log.info("stage %-22s settings changed (key %s -> %s): running it again", name, info.get("key"), key)
            shutil.rmtree(folder)
        pending = folder / "pending.json"
        if pending.exists() and read_json(pending).get("key") != key:
            log.info("stage %-22s partial output from other settings: starting afresh", name)
            shutil.rmtree(folder)
        resumed = folder.exists()
        folder.mkdir(parents=True, exist_ok=True)
        write_json(pending, {"key": key, "settings": settings})
        log.info("stage %-22s %s (key %s)", name, "resuming" if resumed else "running", key)
        start = time.perf_counter()
        result = fn(folder) or {}
        seconds = time.perf_counter() - start
        write_json(
            done,
            {
                "stage": name,
                "key": key,
                "settings": settings,
                "result": result,
                "seconds": seconds,
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
        )
        pending.unlink(missing_ok=True)
        self.timings[name] = {"seconds": seconds, "skipped": False, "resumed": resumed, "key": key}
        log.info("stage %-22s done in %.1f s", name, seconds)
        return result


def _examples(tokenizer: Any, pairs: list[data_mod.Pair], max_src: int, max_tgt: int) -> list[dict]:
    from distillmt.prompts import encode_example

    return [
        encode_example(tokenizer, p.src, p.tgt, max_source_tokens=max_src, max_target_tokens=max_tgt) for p in pairs
    ]


class Experiment:
    """Builds and runs the stages of one config. Each ``_stage_*`` method returns a result dict that later stages and
    the report read; the heavy objects (models) are loaded inside stages and freed when they end."""

    def __init__(self, cfg: ExperimentConfig, *, progress: bool = True):
        from transformers.utils import logging as hf_logging

        from distillmt.models import pick_device

        hf_logging.disable_progress_bar()  # per-file load/save bars would drown the stage progress bars
        self.cfg = cfg
        self.progress = progress
        self.run = Run(Path(cfg.output_dir) / cfg.name)
        self.device = pick_device(cfg.device)
        self.scratch = cfg.teacher.model == "scratch"
        self.keys: dict[str, str] = {}

    # --- helpers ------------------------------------------------------------------------------------------------
    def _stage(self, name: str, settings: dict[str, Any], fn: Callable[[Path], dict | None]) -> dict[str, Any]:
        result = self.run.stage(name, settings, fn)
        self.keys[name] = stage_key(settings)
        return result

    def _seed(self) -> None:
        from transformers import set_seed

        set_seed(self.cfg.seed)

    def _dtype(self, side: str) -> torch.dtype:
        from distillmt.models import pick_dtype

        return pick_dtype(getattr(self.cfg, side).dtype, self.device, scratch=self.scratch)

    def _tokenizer_ref(self) -> str:
        return str(self.run.root / "tokenizer") if self.scratch else self.cfg.student.model

    def _tokenizer(self) -> Any:
        from distillmt.models import load_tokenizer

        return load_tokenizer(self._tokenizer_ref())

    def _split(self, name: str) -> list[data_mod.Pair]:
        return data_mod.read_pairs(self.run.root / "data" / f"{name}.jsonl")

    def _encoded(self, tokenizer: Any, pairs: list[data_mod.Pair]) -> list[dict]:
        d = self.cfg.data
        return _examples(tokenizer, pairs, d.max_source_tokens, d.max_target_tokens)

    def _trained_stage(self, system: str) -> str | None:
        """The training stage behind a results row, or None for a base model used zero-shot."""
        if system in ("TEACHER", "STUDENT"):
            return f"train_{system.lower()}" if self.scratch else None
        return {
            "TEACHER_PEFT": "train_teacher",
            "STUDENT_PEFT": "train_student",
            "HLKD": "train_hlkd",
            "SLKD": "train_slkd",
            "GKD": "train_gkd",
        }[system]

    def _load_system_model(self, system: str) -> Any:
        """The model behind a results row: a base model, or what a training stage saved (adapter or full weights)."""
        from distillmt.models import load_model, load_trained

        side = "teacher" if system.startswith("TEACHER") else "student"
        base = getattr(self.cfg, side).model
        trained = self._trained_stage(system)
        if trained is None:
            return load_model(base, dtype=self._dtype(side), device=self.device)
        return load_trained(
            base, self.run.root / trained / "model", dtype=self._dtype(side), device=self.device, merge=True
        )

    def _new_trainable(self, side: str, tokenizer: Any) -> Any:
        """A model ready to train: built from scratch, or a pretrained one with LoRA (or all weights) trainable."""
        from distillmt.models import apply_lora, build_scratch_model, load_model

        m = getattr(self.cfg, side)
        if self.scratch:
            s = m.scratch
            model = build_scratch_model(
                tokenizer,
                hidden_size=s.hidden_size,
                num_layers=s.num_layers,
                num_heads=s.num_heads,
                num_kv_heads=s.num_kv_heads,
                intermediate_size=s.intermediate_size,
                seed=self.cfg.seed,
                max_positions=self.cfg.data.max_source_tokens + self.cfg.data.max_target_tokens + 8,
            )
        else:
            model = load_model(m.model, dtype=self._dtype(side), device=self.device)
        if m.lora.enabled:
            model = apply_lora(
                model, r=m.lora.r, alpha=m.lora.alpha, dropout=m.lora.dropout, target_modules=m.lora.target_modules
            )
        return model.to(self.device)

    def _model_settings(self, side: str) -> dict[str, Any]:
        m = getattr(self.cfg, side)
        s = {"model": m.model, "dtype": m.dtype, "lora": asdict(m.lora) if m.lora.enabled else None}
        if self.scratch:
            s["scratch"] = asdict(m.scratch)
            s["tokenizer"] = self.keys["tokenizer"]
        return s

    def _teacher_identity(self, which: str) -> dict[str, Any]:
        """What a KD stage depends on from its teacher: the fine-tuning stage's key, or the base model."""
        if which == "finetuned":
            return {"teacher": "finetuned", "train_teacher": self.keys["train_teacher"]}
        return {"teacher": "base", "model": self.cfg.teacher.model, "dtype": self.cfg.teacher.dtype}

    def _load_teacher(self, which: str) -> Any:
        from distillmt.models import load_model, load_trained

        if which == "finetuned":
            path = self.run.root / "train_teacher" / "model"
            return load_trained(
                self.cfg.teacher.model, path, dtype=self._dtype("teacher"), device=self.device, merge=True
            )
        return load_model(self.cfg.teacher.model, dtype=self._dtype("teacher"), device=self.device)

    def _train(
        self,
        folder: Path,
        model: Any,
        tokenizer: Any,
        train_examples: list[dict],
        train_cfg: Any,
        kd: Any = None,
        desc: str = "train",
    ) -> dict[str, Any]:
        from distillmt.models import count_parameters, save_trained
        from distillmt.train import train

        self._seed()
        valid = self._encoded(tokenizer, self._split("valid"))
        summary = train(
            model,
            train_examples,
            valid,
            folder,
            pad_token_id=tokenizer.pad_token_id,
            seed=self.cfg.seed,
            kd=kd,
            device=self.cfg.device,
            progress=self.progress,
            desc=desc,
            **asdict(train_cfg),
        )
        tmp = folder / "model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_trained(model, tokenizer, tmp)
        shutil.rmtree(folder / "model", ignore_errors=True)
        tmp.rename(folder / "model")
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)  # the saved model supersedes them
        summary["parameters"] = count_parameters(model)
        return summary

    # --- stages -------------------------------------------------------------------------------------------------
    def stage_data(self) -> dict[str, Any]:
        d = self.cfg.data

        def fn(folder: Path) -> dict[str, Any]:
            pairs, stats = data_mod.load_pairs(
                d.source,
                path=d.path,
                src_field=d.src_field,
                tgt_field=d.tgt_field,
                hf_split=d.hf_split,
                max_chars=d.max_chars,
                simplified=d.simplified,
            )
            splits = data_mod.split_pairs(
                pairs, train_size=d.train_size, valid_size=d.valid_size, test_size=d.test_size, seed=self.cfg.seed
            )
            for name, split in splits.items():
                data_mod.write_pairs(folder / f"{name}.jsonl", split)
            return {"load": stats.as_dict(), "sizes": {k: len(v) for k, v in splits.items()}}

        settings = {k: v for k, v in asdict(d).items() if k not in ("max_source_tokens", "max_target_tokens")}
        settings["seed"] = self.cfg.seed
        if d.source in ("jsonl", "tsv") and d.path:  # a local file can change under the same name
            settings["file_sha256"] = (
                hashlib.sha256(Path(d.path).read_bytes()).hexdigest() if Path(d.path).is_file() else None
            )
        return self._stage("data", settings, fn)

    def stage_tokenizer(self) -> dict[str, Any]:
        from distillmt.models import train_bpe_tokenizer

        def fn(folder: Path) -> dict[str, Any]:
            train = self._split("train")
            tok = train_bpe_tokenizer(
                [p.src for p in train] + [p.tgt for p in train],
                self.cfg.tokenizer_vocab_size,
                self.run.root / "tokenizer",
            )
            return {"vocab_size": len(tok)}

        return self._stage("tokenizer", {"data": self.keys["data"], "vocab_size": self.cfg.tokenizer_vocab_size}, fn)

    def stage_train(
        self,
        name: str,
        side: str,
        train_cfg: Any,
        *,
        pairs_fn: Callable[[], list[data_mod.Pair]],
        extra: dict[str, Any],
        kd_fn: Callable[[Any], Any] | None = None,
    ) -> dict[str, Any]:
        """One training stage: references, teacher labels, or logit KD, all through the same loop."""

        def fn(folder: Path) -> dict[str, Any]:
            tokenizer = self._tokenizer()
            model = self._new_trainable(side, tokenizer)
            examples = self._encoded(tokenizer, pairs_fn())
            kd = kd_fn(examples) if kd_fn is not None else None
            result = self._train(folder, model, tokenizer, examples, train_cfg, kd=kd, desc=name)
            del model, kd
            return result

        settings = {
            "data": self.keys["data"],
            "model": self._model_settings(side),
            "train": asdict(train_cfg),
            "seed": self.cfg.seed,
            "max_tokens": [self.cfg.data.max_source_tokens, self.cfg.data.max_target_tokens],
            **extra,
        }
        return self._stage(name, settings, fn)

    def stage_teacher_labels(self) -> dict[str, Any]:
        """Sequence-level KD labels: the teacher translates every training source, written shard by shard."""
        from distillmt.generate import translate

        h = self.cfg.hard_kd
        ident = self._teacher_identity(h.teacher)
        decoding = asdict(h.decoding)
        label_settings = {
            "teacher": ident,
            "decoding": decoding,
            "num_candidates": h.num_candidates,
            "selection": h.selection,
            "seed": self.cfg.seed,
        }

        def fn(folder: Path) -> dict[str, Any]:
            train = self._split("train")
            tokenizer = None
            model = None
            shards = []
            generated, seconds = 0, 0.0
            n_shards = (len(train) + h.shard_size - 1) // h.shard_size
            for i in range(n_shards):
                chunk = train[i * h.shard_size : (i + 1) * h.shard_size]
                # A shard's name carries the hash of its sources and of the teacher/decoding settings: a rerun reuses
                # exactly the shards those still describe.
                digest = stage_key({"src": [p.src for p in chunk], **label_settings})
                path = folder / f"shard-{i:05d}-{digest}.jsonl"
                shards.append(path.name)
                if path.exists():
                    continue
                if model is None:
                    tokenizer = self._tokenizer()
                    model = self._load_teacher(h.teacher)
                    self._seed()
                dec = h.decoding
                res = translate(
                    model,
                    tokenizer,
                    [p.src for p in chunk],
                    batch_size=dec.batch_size,
                    max_new_tokens=dec.max_new_tokens,
                    num_beams=max(dec.num_beams, h.num_candidates if not dec.do_sample else 1),
                    length_penalty=dec.length_penalty,
                    do_sample=dec.do_sample,
                    temperature=dec.temperature,
                    top_k=dec.top_k,
                    top_p=dec.top_p,
                    num_return_sequences=h.num_candidates,
                    selection=h.selection,
                    seed=self.cfg.seed + i,
                    progress=self.progress,
                    desc=f"teacher labels {i + 1}/{n_shards}",
                )
                generated += res.generated_tokens
                seconds += res.seconds
                write_jsonl(
                    path,
                    [
                        {"src": p.src, "ref": p.tgt, "label": hyp, "candidates": c}
                        for p, hyp, c in zip(chunk, res.hypotheses, res.candidates, strict=True)
                    ],
                )
            return {"shards": shards, "generated_tokens": generated, "generation_seconds": seconds}

        return self._stage(
            "teacher_labels", {"data": self.keys["data"], **label_settings, "shard_size": h.shard_size}, fn
        )

    def _hard_label_pairs(self) -> list[data_mod.Pair]:
        h = self.cfg.hard_kd
        folder = self.run.root / "teacher_labels"
        rows = []
        for name in read_json(folder / "stage.json")["result"]["shards"]:
            rows.extend(read_jsonl(folder / name))
        rng = random.Random(self.cfg.seed)
        keep_ref = set(rng.sample(range(len(rows)), int(round(h.mix_references * len(rows)))))
        pairs = [data_mod.Pair(r["src"], r["ref"] if i in keep_ref else r["label"]) for i, r in enumerate(rows)]
        empty = sum(1 for p in pairs if not p.tgt.strip())
        if empty:  # kept: sequence-level KD trains on what the teacher says, even when it says nothing
            log.warning("%d of %d teacher labels are empty", empty, len(pairs))
        return pairs

    def _kd_settings(self, gkd: bool) -> Callable[[list[dict]], Any]:
        from distillmt.models import check_same_tokenizer, load_tokenizer
        from distillmt.prompts import end_token_id
        from distillmt.train import KDSettings

        s = self.cfg.soft_kd

        def make(examples: list[dict]) -> Any:
            tokenizer = self._tokenizer()
            if not self.scratch:  # logit KD compares token by token: refuse mismatched vocabularies before training
                check_same_tokenizer(load_tokenizer(self.cfg.teacher.model), tokenizer)
            kd = KDSettings(
                alpha=s.alpha,
                temperature=s.temperature,
                divergence=s.divergence,
                beta=s.beta,
                chunk_size=s.chunk_size,
                vocab_size=len(tokenizer),
                end_token_id=end_token_id(tokenizer),
            )
            if gkd:
                kd.on_policy_prob = self.cfg.gkd.lmbda
                kd.on_policy_temperature = self.cfg.gkd.temperature
                kd.on_policy_max_new_tokens = self.cfg.gkd.max_new_tokens
            if s.cache and not gkd:
                from distillmt.logit_cache import TeacherCache

                cache = TeacherCache(self.run.root / "teacher_cache")
                cache.check(
                    teacher_id=self._teacher_id_string(),
                    k=s.cache_k,
                    temperature=s.temperature,
                    vocab_size=len(tokenizer),
                    examples=examples,
                )
                kd.cache = cache
            else:
                kd.teacher = self._load_teacher(s.teacher)
            return kd

        return make

    def _teacher_id_string(self) -> str:
        return json.dumps(self._teacher_identity(self.cfg.soft_kd.teacher), sort_keys=True)

    def stage_teacher_cache(self) -> dict[str, Any]:
        from distillmt.logit_cache import build_teacher_cache

        s = self.cfg.soft_kd

        def fn(folder: Path) -> dict[str, Any]:
            tokenizer = self._tokenizer()
            examples = self._encoded(tokenizer, self._split("train"))
            teacher = self._load_teacher(s.teacher)
            cache = build_teacher_cache(
                teacher,
                examples,
                folder,
                teacher_id=self._teacher_id_string(),
                k=s.cache_k,
                temperature=s.temperature,
                vocab_size=len(tokenizer),
                batch_size=self.cfg.train_student.batch_size,
                pad_token_id=tokenizer.pad_token_id,
                device=self.device,
                progress=self.progress,
            )
            return {"entries": len(cache)}

        settings = {
            "data": self.keys["data"],
            "teacher": self._teacher_identity(s.teacher),
            "k": s.cache_k,
            "temperature": s.temperature,
            "max_tokens": [self.cfg.data.max_source_tokens, self.cfg.data.max_target_tokens],
        }
        if self.scratch:
            settings["tokenizer"] = self.keys["tokenizer"]
        return self._stage("teacher_cache", settings, fn)

    def stage_translate(self, system: str) -> dict[str, Any]:
        from distillmt.generate import translate
        from distillmt.models import count_parameters

        g = self.cfg.generate

        def fn(folder: Path) -> dict[str, Any]:
            tokenizer = self._tokenizer()
            model = self._load_system_model(system)
            test = self._split("test")
            self._seed()
            res = translate(
                model,
                tokenizer,
                [p.src for p in test],
                batch_size=g.batch_size,
                max_new_tokens=g.max_new_tokens,
                num_beams=g.num_beams,
                length_penalty=g.length_penalty,
                do_sample=g.do_sample,
                temperature=g.temperature,
                top_k=g.top_k,
                top_p=g.top_p,
                seed=self.cfg.seed,
                progress=self.progress,
                desc=f"translate {system}",
            )
            write_jsonl(
                folder / "translations.jsonl",
                [{"src": p.src, "ref": p.tgt, "hyp": h} for p, h in zip(test, res.hypotheses, strict=True)],
            )
            params = count_parameters(model)
            return {
                "parameters": params["total"],
                "generated_tokens": res.generated_tokens,
                "seconds": res.seconds,
                "tokens_per_s": res.tokens_per_second,
                "sentences_per_s": len(test) / max(res.seconds, 1e-9),
                "device": str(self.device),
            }

        source = self._system_source(system)
        settings = {
            "system": system,
            "model": source,
            "generate": asdict(g),
            "data": self.keys["data"],
            "seed": self.cfg.seed,
        }
        return self._stage(f"translate_{system}", settings, fn)

    def _system_source(self, system: str) -> dict[str, Any]:
        stage = self._trained_stage(system)
        if stage is None:
            side = "teacher" if system == "TEACHER" else "student"
            return {"base": getattr(self.cfg, side).model, "dtype": getattr(self.cfg, side).dtype}
        return {"stage": stage, "key": self.keys[stage]}

    def stage_evaluate(self, system: str) -> dict[str, Any]:
        from distillmt.metrics import evaluate

        e = self.cfg.eval

        def fn(folder: Path) -> dict[str, Any]:
            rows = read_jsonl(self.run.root / f"translate_{system}" / "translations.jsonl")
            scores = evaluate(
                [r["hyp"] for r in rows],
                [r["ref"] for r in rows],
                bleu_tokenize=e.bleu_tokenize,
                bertscore_model=e.bertscore_model if e.bertscore else None,
                bertscore_layer=e.bertscore_layer,
                bertscore_batch_size=e.bertscore_batch_size,
                device=str(self.device),
            )
            bs = scores.get("bertscore", {})
            if "unavailable" in bs:
                if not getattr(self, "_warned_bertscore", False):
                    log.warning("BERTScore not reported: %s", bs["unavailable"])
                    self._warned_bertscore = True
            write_json(folder / "scores.json", scores)
            return scores

        settings = {"translations": self.keys[f"translate_{system}"], "eval": asdict(e)}
        return self._stage(f"evaluate_{system}", settings, fn)

    # --- the whole experiment -----------------------------------------------------------------------------------
    def preflight(self) -> None:
        """Fail in seconds, before any stage, when a pretrained model cannot be reached (e.g. a hub id offline)."""
        from distillmt.models import check_loadable, resolve_ref

        if self.scratch:
            return
        for side in ("teacher", "student"):
            check_loadable(resolve_ref(getattr(self.cfg, side).model))

    def run_all(self, command: str | None = None) -> dict[str, Any]:
        cfg = self.cfg
        self.preflight()
        started = time.perf_counter()
        write_json(self.run.root / "config.json", to_dict(cfg))
        systems = cfg.systems
        self.stage_data()
        if self.scratch:
            self.stage_tokenizer()
        needs_ft_teacher = (
            self.scratch
            and "TEACHER" in systems
            or "TEACHER_PEFT" in systems
            or ("HLKD" in systems and cfg.hard_kd.teacher == "finetuned")
            or ({"SLKD", "GKD"} & set(systems) and cfg.soft_kd.teacher == "finetuned")
        )
        refs = lambda: self._split("train")  # noqa: E731
        descriptions: dict[str, str] = {}
        if needs_ft_teacher:
            self.stage_train("train_teacher", "teacher", cfg.train_teacher, pairs_fn=refs, extra={})
        if (self.scratch and "STUDENT" in systems) or "STUDENT_PEFT" in systems:
            self.stage_train("train_student", "student", cfg.train_student, pairs_fn=refs, extra={})
        if "HLKD" in systems:
            self.stage_teacher_labels()
            self.stage_train(
                "train_hlkd",
                "student",
                cfg.train_student,
                pairs_fn=self._hard_label_pairs,
                extra={"labels": self.keys["teacher_labels"], "mix_references": cfg.hard_kd.mix_references},
            )
            h = cfg.hard_kd
            descriptions["HLKD"] = (
                f"labels from the {h.teacher} teacher, {h.num_candidates} candidate(s), "
                f"selection={h.selection}, beams={h.decoding.num_beams}, sample={h.decoding.do_sample}, "
                f"mix_references={h.mix_references}"
            )
        soft = asdict(cfg.soft_kd)
        if "SLKD" in systems:
            extra = {"kd": soft, "teacher": self._teacher_identity(cfg.soft_kd.teacher)}
            if cfg.soft_kd.cache:
                self.stage_teacher_cache()
                extra["cache"] = self.keys["teacher_cache"]
            self.stage_train(
                "train_slkd",
                "student",
                cfg.train_student,
                pairs_fn=refs,
                extra=extra,
                kd_fn=self._kd_settings(gkd=False),
            )
            s = cfg.soft_kd
            descriptions["SLKD"] = (
                f"{s.teacher} teacher, loss={s.alpha}*CE+{1 - s.alpha:g}*T^2*{s.divergence}, "
                f"T={s.temperature}"
                + (f", beta={s.beta}" if s.divergence in ("jsd", "skew_kl") else "")
                + (f", top-{s.cache_k} cache" if s.cache else "")
            )
        if "GKD" in systems:
            extra = {"kd": soft, "gkd": asdict(cfg.gkd), "teacher": self._teacher_identity(cfg.soft_kd.teacher)}
            self.stage_train(
                "train_gkd", "student", cfg.train_student, pairs_fn=refs, extra=extra, kd_fn=self._kd_settings(gkd=True)
            )
            descriptions["GKD"] = (
                f"on-policy lambda={cfg.gkd.lmbda}, {cfg.soft_kd.divergence}, T={cfg.soft_kd.temperature}"
            )
        results = {}
        for system in systems:
            translation = self.stage_translate(system)
            scores = self.stage_evaluate(system)
            results[system] = {
                "scores": scores,
                "translation": translation,
                "settings": descriptions.get(system, self._default_description(system)),
            }
        from distillmt.report import write_report

        total = time.perf_counter() - started
        report = {
            "name": cfg.name,
            "command": command,
            "systems": results,
            "stages": self.run.timings,
            "wall_seconds": total,
            "machine": _machine(self.device),
            "config": to_dict(cfg),
        }
        write_report(self.run.root, report)
        return report

    def _default_description(self, system: str) -> str:
        side = "teacher" if system.startswith("TEACHER") else "student"
        m = getattr(self.cfg, side)
        if self.scratch:
            s = m.scratch
            return f"{side} from scratch (h={s.hidden_size}, layers={s.num_layers}) trained on the references"
        if system in ("TEACHER", "STUDENT"):
            return f"{m.model}, zero-shot"
        lora = f"LoRA r={m.lora.r} alpha={m.lora.alpha}" if m.lora.enabled else "all weights"
        return f"{m.model} + {lora} on the references"


def _machine(device: torch.device) -> dict[str, Any]:
    import os

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run_experiment(cfg: ExperimentConfig, *, progress: bool = True, command: str | None = None) -> dict[str, Any]:
    try:
        return Experiment(cfg, progress=progress).run_all(command)
    except FileNotFoundError as e:
        raise DistillmtError(f"missing file: {e.filename}") from None
