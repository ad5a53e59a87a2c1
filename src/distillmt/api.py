"""The Python API, for notebooks and scripts: :func:`run` an experiment and get its table as data (:class:`Results`),
:func:`translate` with the model of a run's row or of an export. ``distillmt.run``, ``distillmt.translate``,
``distillmt.Results`` and ``distillmt.load_config`` are these.

``distillmt translate`` (the CLI) and :func:`translate` share :func:`translation_setup`, so a setting resolves the
same way from both: the one given, else the one the model was scored with (an export's manifest, or the translate
stage of the run that scored it), else the default. Everything heavy is imported inside the functions: ``import
distillmt`` loads neither torch nor transformers.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distillmt.errors import DistillmtError

if TYPE_CHECKING:
    from distillmt.config import ExperimentConfig
    from distillmt.generate import TranslationResult
    from distillmt.sections import GenerateConfig

# What translate takes besides the model, by name: GenerateConfig's decoding fields (in the order its messages list
# them), then the dtype, the sampling seed and the languages the prompt names.
DECODING_KEYS = (
    "batch_size", "max_new_tokens", "num_beams", "length_penalty", "do_sample", "temperature", "top_k", "top_p",
    "max_batch_tokens", "max_source_tokens",
)  # fmt: skip
TRANSLATE_KEYS = (*DECODING_KEYS, "dtype", "seed", "src_lang", "tgt_lang")
DTYPES = ("auto", "float32", "bfloat16", "float16")


# ---------------------------------------------------------------------------------------------------------------------
# Experiments


@dataclass
class Results:
    """An experiment's results table as data. ``rows``: one dict per system, in table order, with the keys of a
    sweep's results.csv: ``system``, each metric's score under its key (``bleu``, ``chrf``, ``bertscore`` (F1), ...;
    None where it was not measured) with ``<key>_ci_low``, ``<key>_ci_high`` and ``<key>_p_value`` where the run
    tested it against the baseline, then ``parameters`` and ``tokens_per_s`` (translation). ``report``: the whole of
    results.json. ``folder``: the run folder. ``pandas.DataFrame(results.rows)`` is the table as a data frame."""

    rows: list[dict[str, Any]]
    report: dict[str, Any]
    folder: Path

    @classmethod
    def from_report(cls, report: dict[str, Any], folder: str | Path) -> Results:
        from distillmt.metrics import metric_entries
        from distillmt.plots import metric_layout, significance_record

        layout = metric_layout(report)
        rows = []
        for system, r in report["systems"].items():
            row: dict[str, Any] = {"system": system}
            entries = metric_entries(r["scores"])
            for key in layout:
                row[key] = entries.get(key, {}).get("score")
                tested = significance_record(report, system, key) or {}
                row.update({f"{key}_{k}": tested[k] for k in ("ci_low", "ci_high", "p_value") if k in tested})
            row.update(parameters=r["translation"].get("parameters"), tokens_per_s=r["translation"].get("tokens_per_s"))
            rows.append(row)
        return cls(rows, report, Path(folder))

    @classmethod
    def from_folder(cls, folder: str | Path) -> Results:
        """The results of a finished run, read from its folder (``results.json``); nothing is run."""
        from distillmt.io import read_json

        path = Path(folder) / "results.json"
        if not path.is_file():
            raise DistillmtError(f"{path} not found: {folder} is not the folder of a finished run")
        return cls.from_report(read_json(path), folder)

    def to_markdown(self) -> str:
        """The table as results.md and ``distillmt run`` show it (CIs, † and p-values included)."""
        from distillmt.report import results_table

        return results_table(self.report)

    def _repr_markdown_(self) -> str:  # a notebook shows the table
        return self.to_markdown()


def run(config: str | Path | ExperimentConfig | None = None, *, progress: bool = True, **overrides: Any) -> Results:
    """Run an experiment, as ``distillmt run`` does, and return its table as data.

    ``config``: a YAML file, an :class:`~distillmt.config.ExperimentConfig`, or None for the default experiment.
    ``overrides``: config keys, either dotted (``**{"train_student.lr": 3e-4}``) or a section as a dict
    (``train_student={"lr": 3e-4}``, merged into the section), plain keys as they are (``name="t1"``,
    ``systems=["TEACHER", "SLKD"]``). Stages already done in the run folder with the same settings are reused, so
    running a finished experiment again only reads its results. The label stage may start worker processes
    (``hard_kd.workers``), which import the calling script: keep a script's code under
    ``if __name__ == "__main__":``."""
    from distillmt.config import check_run_folder
    from distillmt.engines import configure_cpu
    from distillmt.models import pick_device
    from distillmt.pipeline import run_experiment

    cfg = _config(config, overrides)  # config errors come first, before any work
    check_run_folder(cfg)
    try:
        pick_device(cfg.device)
    except DistillmtError as e:
        raise DistillmtError(f"config key 'device': {e}") from None
    configure_cpu(cfg.threads)  # as `distillmt run` does
    report = run_experiment(cfg, progress=progress, command=_command(config, overrides))
    return Results.from_report(report, Path(cfg.output_dir) / cfg.name)


def _config(config: str | Path | ExperimentConfig | None, overrides: dict[str, Any]) -> ExperimentConfig:
    """The validated config: the file (or config, or defaults) with ``overrides`` written over it."""
    from distillmt.config import ExperimentConfig, _merge, from_dict, read_yaml, resolved, to_dict, validate

    if isinstance(config, ExperimentConfig):
        data = to_dict(config)
    elif config is None:
        data = {}
    elif isinstance(config, (str, Path)):
        data = read_yaml(config)
    else:
        raise DistillmtError(f"config must be a YAML file, an ExperimentConfig or None, got {type(config).__name__}")
    cfg = from_dict(ExperimentConfig, _merge(data, _nested(overrides)))
    validate(cfg)
    return resolved(cfg)


def _nested(overrides: dict[str, Any]) -> dict[str, Any]:
    """Dotted keys and section dicts as one nested dict (``{"a.b": 1, "a": {"c": 2}}`` → ``{"a": {"b": 1, "c": 2}}``)."""
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        _put(out, key, value)
    return out


def _put(node: dict[str, Any], key: str, value: Any) -> None:
    *sections, last = key.split(".")
    for part in [*sections, *([last] if isinstance(value, dict) else [])]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise DistillmtError(f"override {key!r}: '{part}' is given both a value and keys under it")
    if isinstance(value, dict):
        for k, v in value.items():
            _put(node, k, v)
    elif last in node and isinstance(node[last], dict):
        raise DistillmtError(f"override {key!r}: '{last}' is given both a value and keys under it")
    else:
        node[last] = value


def _command(config: Any, overrides: dict[str, Any]) -> str:
    """How this run was asked for, for the report (``Command:`` in results.md)."""
    from distillmt.config import ExperimentConfig

    args = ["ExperimentConfig(...)" if isinstance(config, ExperimentConfig) else repr(str(config))] if config else []
    args += [f"**{overrides!r}"] if overrides else []
    return f"distillmt.run({', '.join(args)})"


# ---------------------------------------------------------------------------------------------------------------------
# Translation


def translate(
    sources: str | Sequence[str],
    model: str | Path,
    system: str = "SLKD",
    *,
    device: str = "auto",
    progress: bool = True,
    **settings: Any,
) -> str | list[str]:
    """Translate ``sources`` (one sentence, or a list) and return the translation(s).

    ``model``: a run folder (the model of its row ``system``: the training stage's model, LoRA adapters on their base
    model, or the base model of a zero-shot row), an export folder (``distillmt export``; ``system`` is ignored), or
    any model ``distillmt translate --model`` takes. ``settings``: decoding (``num_beams``, ``max_new_tokens``,
    ``batch_size``, ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``length_penalty``, ``max_batch_tokens``,
    ``max_source_tokens``), ``dtype``, ``seed``, ``src_lang`` and ``tgt_lang`` (BCP-47; the prompt names them). A
    setting not given is the one the model was scored with (a training stage's model, an export), else the default."""
    base, adapter = model_of(model, system)
    setup = translation_setup(base, adapter=adapter, device=device, flag=_keyword, **settings)
    texts = [sources] if isinstance(sources, str) else list(sources)
    hypotheses = setup.run(texts, progress=progress).hypotheses if texts else []
    return hypotheses[0] if isinstance(sources, str) else hypotheses


def _keyword(name: str) -> str:
    """A setting as a Python caller writes it (the command line writes ``--num-beams``)."""
    return name


def model_of(folder: str | Path, system: str) -> tuple[str, str | None]:
    """``(model, adapter)`` to translate with for ``folder``: for a run folder, the model of its row ``system``;
    anything else (an export, a model folder, a hub id, ``store:NAME``) is the model itself."""
    from distillmt import systems
    from distillmt.io import read_json
    from distillmt.stages import ATTEMPT_CONFIG, RUN_CONFIG

    root = Path(folder)
    conf = None
    for name in (RUN_CONFIG, ATTEMPT_CONFIG):  # a run folder's experiment config (a model folder's has no sections)
        path = root / name
        data = read_json(path) if path.is_file() else None
        if isinstance(data, dict) and isinstance(data.get("student"), dict) and isinstance(data.get("teacher"), dict):
            conf = data
            break
    if conf is None:
        return str(folder), None
    if system not in systems.BY_NAME:
        raise DistillmtError(f"unknown system {system!r}; choose from: {', '.join(systems.NAMES)}")
    row = systems.get(system)
    stage = row.trained_stage(conf["teacher"].get("model") == "scratch")
    base = conf[row.side].get("model")
    if stage is None:  # a pretrained model used zero-shot
        return base, None
    saved = root / stage / "model"
    if not saved.is_dir():
        raise DistillmtError(
            f"{root} has no model for {system}: {saved} is missing (its config's systems: "
            f"{', '.join(conf.get('systems') or [])}); run the experiment with {system} among its systems"
        )
    if (saved / "adapter_config.json").is_file():  # LoRA: the adapter goes on the base model
        return base, str(saved)
    return str(saved), None


@dataclass
class TranslationSetup:
    """A model and the settings to translate with, resolved and checked before the model is loaded."""

    model: str
    adapter: str | None
    tokenizer: str | None
    device: Any
    engine: str  # hf | ct2
    decoding: GenerateConfig
    dtype: str
    seed: int
    prompt: Any

    def run(self, sources: list[str], progress: bool = True) -> TranslationResult:
        """Load the model and tokenizer, translate ``sources``."""
        from distillmt.generate import translate as translate_hf
        from distillmt.generate import translate_ct2
        from distillmt.models import load_model, load_tokenizer, pick_dtype

        tokenizer = load_tokenizer(self.tokenizer or self.model)
        run = {"seed": self.seed, "progress": progress, "prompt": self.prompt}
        if self.engine == "ct2":
            return translate_ct2(self.model, tokenizer, sources, self.decoding, device=self.device.type, **run)
        dtype = pick_dtype(self.dtype, self.device, scratch=False)
        model = load_model(self.model, dtype=dtype, device=self.device, adapter=self.adapter, merge=True)
        return translate_hf(model, tokenizer, sources, self.decoding, **run)


def translation_setup(
    model: str | Path,
    *,
    adapter: str | None = None,
    tokenizer: str | None = None,
    device: str = "auto",
    flag: Callable[[str], str] = _keyword,
    **given: Any,
) -> TranslationSetup:
    """How to translate with ``model`` (and LoRA ``adapter``): the engine its folder needs (CTranslate2 for such an
    export), and each of :data:`TRANSLATE_KEYS` as given (None: not given), else as recorded, else the default (see
    :func:`translation_settings`). ``flag(name)`` is how the caller's user spells a setting (``--num-beams`` on the
    command line, ``num_beams=`` in Python), for the messages."""
    from distillmt.export import exported_format
    from distillmt.models import pick_device

    unknown = sorted(set(given) - set(TRANSLATE_KEYS))
    if unknown:
        raise DistillmtError(f"unknown translate setting {unknown[0]!r}; the settings are: {', '.join(TRANSLATE_KEYS)}")
    try:
        dev = pick_device(device)
    except DistillmtError as e:
        raise DistillmtError(f"{flag('device')}: {e}") from None
    model = str(model)
    ct2 = exported_format(model) == "ct2" if Path(model).is_dir() else False
    if ct2 and adapter is not None:
        raise DistillmtError(f"{flag('adapter')} does not apply to a CTranslate2 model (its export merged the adapter)")
    engine = "ct2" if ct2 else "hf"
    decoding, dtype, seed, prompt = translation_settings(adapter or model, given, engine, flag)
    return TranslationSetup(model, adapter, tokenizer, dev, engine, decoding, dtype, seed, prompt)


def translation_settings(
    folder: str, given: dict[str, Any], engine: str, flag: Callable[[str], str]
) -> tuple[GenerateConfig, str, int, Any]:
    """The decoding settings, dtype name, seed and prompt to translate with: a setting ``given`` (not None), else
    what the model's record says it was scored with (:func:`distillmt.export.recorded_translation`: an export's
    manifest, or the translate stage of the run that scored a training stage's model folder; ``folder`` is the adapter
    where there is one, the model scored), else GenerateConfig's default (dtype ``auto``, seed 0, the English→Chinese
    prompt). One line on stderr names the recorded settings used and how to override them."""
    from distillmt import languages
    from distillmt.export import recorded_translation
    from distillmt.prompts import DEFAULT_PROMPT, Prompt, make_prompt
    from distillmt.sections import GenerateConfig, PromptConfig, check_section

    given = {k: v for k, v in given.items() if v is not None}
    recorded, where = recorded_translation(folder) if Path(folder).is_dir() else (None, "")
    rec = recorded or {}
    values, taken = {}, set()
    for name in DECODING_KEYS:
        if name in given:
            values[name] = given[name]
        elif name in rec.get("generate", {}):
            values[name], taken = rec["generate"][name], taken | {name}
    decoding = GenerateConfig(**values)
    check_section(decoding)  # (the command line's flags are checked as they are parsed; Python's keywords here)
    dtype = given.get("dtype") or rec.get("dtype") or "auto"
    if dtype not in DTYPES:
        raise DistillmtError(f"{flag('dtype')}: {dtype!r} is not one of {', '.join(DTYPES)}")
    seed = given["seed"] if "seed" in given else rec.get("seed", 0)
    if "dtype" not in given and "dtype" in rec and engine == "hf":
        taken.add("dtype")
    if "seed" not in given and "seed" in rec:
        taken.add("seed")
    prompt = Prompt(**rec["prompt"]) if "prompt" in rec else DEFAULT_PROMPT
    if given.get("src_lang") or given.get("tgt_lang"):  # the default words for another pair (each checked, then named)
        src, tgt = given.get("src_lang") or "en", given.get("tgt_lang") or "zh"
        languages.check_code(src, flag("src_lang"))
        languages.check_code(tgt, flag("tgt_lang"))
        prompt = make_prompt(PromptConfig(), src, tgt)
    if recorded is None:
        if where:  # rows that translated it differently: say so, and that the defaults are used
            print(f"{folder}: {where}", file=sys.stderr)
        return decoding, dtype, seed, prompt
    _say_recorded(folder, rec, where, taken, (decoding, dtype, seed), engine, flag)
    return decoding, dtype, seed, prompt


def _say_recorded(
    folder: str, rec: dict, where: str, taken: set[str], chosen: tuple, engine: str, flag: Callable[[str], str]
) -> None:
    """The line on stderr naming the recorded settings that matter for this decoding and how to override them."""
    from distillmt.sections import GenerateConfig

    decoding, dtype, seed = chosen
    shown = {"dtype": dtype, **{k: getattr(decoding, k) for k in DECODING_KEYS}, "seed": seed}
    relevant = {"dtype", "batch_size", "max_new_tokens", "num_beams"}
    if decoding.num_beams > 1:
        relevant.add("length_penalty")
    if decoding.do_sample:
        relevant |= {"do_sample", "temperature", "top_k", "top_p", "seed"}
    if decoding.max_batch_tokens:
        relevant.add("max_batch_tokens")
    if decoding.max_source_tokens != GenerateConfig().max_source_tokens:
        relevant.add("max_source_tokens")
    names = [k for k in shown if k in taken & relevant]
    if not names:
        return
    used = ", ".join(f"{k} {shown[k]}" for k in names)
    line = f"using {where}: {used} (override with {', '.join(flag(k) for k in names)})"
    scored_with = rec.get("scored_with")
    if isinstance(scored_with, str) and scored_with.split(" ")[0] != engine:
        line += f"; it was scored with {scored_with}, not {engine}: expect small differences"
    print(line, file=sys.stderr)
