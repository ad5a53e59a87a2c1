"""Confidence intervals and significance: paired bootstrap resampling, the way sacrebleu does it.

BLEU and chrF go through sacrebleu's own paired test (``sacrebleu.significance.PairedTest`` with ``test_type='bs'``),
which resamples the sentence statistics and recomputes the corpus score, with one function of it replaced (see
below). A metric that is a mean of sentence scores (BERTScore F1) goes through :func:`paired_bootstrap`, which copies
sacrebleu's ``_paired_bs_test`` step for step:

* resampling: ``numpy.random.default_rng(seed).choice(n, size=(n_samples, n), replace=True)``: the same index
  matrix sacrebleu draws for the same seed, shared by the system and the baseline (paired);
* CI: sacrebleu's ``estimate_ci``: sort the resampled scores, take the ``n_samples // 40``-th from each end (95%),
  and report the mean of the resampled scores ± half the distance between them;
* p-value: the observed difference ``|score(system) − score(baseline)|`` against the resampled absolute differences
  shifted to mean zero (the null hypothesis), ``p = (#{shifted > observed} + 1) / (n_samples + 1)`` in sacrebleu.

One rule for ties, every metric and every test: a resample as extreme as the observed difference counts against
significance (:func:`p_value` counts ``>=``). sacrebleu counts only strictly larger ones, so two rows whose metric ties
on every resample (identical translations; translations that differ only where the metric does not look, such as
spaces for chrF; both rows at BLEU 0.00) get its smallest p-value, ``1 / (n_samples + 1)``, and would be called
significantly different. Counting ties gives p = 1 there and changes nothing else. For BLEU and chrF this means the
p-value of sacrebleu's ``PairedTest`` is not used: :func:`_paired_bs_test` runs in its place, the same test with
:func:`p_value`. :func:`compare_to_baseline` also does not test a row whose translations equal the baseline's line for
line: it records ``p = 1.0`` and ``identical_to_baseline: true``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

SEED = 12345  # sacrebleu's fixed seed (environment variable SACREBLEU_SEED, default 12345)
ALPHA = 0.05  # a difference is called significant at p < ALPHA


def sacrebleu_seed() -> int | None:
    """The seed sacrebleu's PairedTest will use: ``SACREBLEU_SEED`` (default 12345), None when it is 'none'.
    PairedTest also turns a seed of 0 into None (no fixed seed), and so does this."""
    seed = os.environ.get("SACREBLEU_SEED", str(SEED))
    return None if seed.lower() == "none" or int(seed) == 0 else int(seed)


def resample_indices(n_items: int, n_samples: int, seed: int | None) -> np.ndarray:
    """The ``(n_samples, n_items)`` index matrix of sacrebleu's paired bootstrap for this seed."""
    return np.random.default_rng(seed).choice(n_items, size=(n_samples, n_items), replace=True)


def estimate_ci(scores: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """(mean, half-width) of the resampled scores as sacrebleu's ``estimate_ci`` computes them (for 0.95 the bounds are
    the ``n // 40``-th smallest and largest); the interval is mean ± half-width."""
    scores = np.sort(np.asarray(scores, dtype=float))
    n = len(scores)
    lower_idx = int(n * (1.0 - confidence) / 2 + 1e-9)
    upper_idx = n - lower_idx - 1
    return float(scores.mean()), float(0.5 * (scores[upper_idx] - scores[lower_idx]))


def p_value(sample_diffs: np.ndarray, real_difference: float) -> float:
    """sacrebleu's paired-bootstrap p-value, ``sample_diffs`` being the resampled ``|system − baseline|`` centred on
    their mean, with one change: a resample as extreme as the observed difference (a tie) counts against
    significance. sacrebleu counts only strictly larger ones, so two identical systems (every difference 0) get its
    smallest p-value, 1/(n+1), and would be called significantly different; here they get p = 1. Without ties, as
    with any real pair of systems, the two formulas agree exactly."""
    stats = sample_diffs - sample_diffs.mean()
    return (int(np.sum(stats >= real_difference)) + 1) / (len(stats) + 1)


def _interval(mean: float, half: float) -> dict[str, float]:
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half}


def _as_array(values: Sequence[float], what: str) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    if array.ndim != 1 or not len(array):
        raise ValueError(f"{what}: need a non-empty sequence of sentence scores")
    return array


def bootstrap_ci(
    values: Sequence[float], *, n_samples: int = 1000, seed: int | None = SEED, confidence: float = 0.95
) -> dict[str, float]:
    """Score (the mean of ``values``) and its bootstrap CI, from the same resamples :func:`paired_bootstrap` draws."""
    array = _as_array(values, "bootstrap_ci")
    samples = array[resample_indices(len(array), n_samples, seed)].mean(axis=1)
    return {"score": float(array.mean()), **_interval(*estimate_ci(samples, confidence))}


def paired_bootstrap(
    system: Sequence[float],
    baseline: Sequence[float],
    *,
    n_samples: int = 1000,
    seed: int | None = SEED,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Paired bootstrap test of a mean-of-sentence-scores metric, as sacrebleu's paired bootstrap: both systems are
    resampled with the same sentence indices, each resample's score is the mean of its sentence scores.

    Returns ``{"system": {"score", "mean", "ci_low", "ci_high"}, "baseline": {...}, "difference", "p_value",
    "n_samples", "seed", "confidence"}``: ``score`` the mean over all sentences, ``mean`` the mean of the resampled
    scores, ``ci_low``/``ci_high`` = mean ∓ the half-width of sacrebleu's CI, ``difference`` = system − baseline.
    """
    sys_scores, bl_scores = _as_array(system, "system"), _as_array(baseline, "baseline")
    if len(sys_scores) != len(bl_scores):
        raise ValueError(f"paired test: {len(sys_scores)} system scores but {len(bl_scores)} baseline scores")
    if n_samples < 1:
        raise ValueError(f"n_samples must be positive, got {n_samples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    idxs = resample_indices(len(sys_scores), n_samples, seed)
    resampled_sys, resampled_bl = sys_scores[idxs].mean(axis=1), bl_scores[idxs].mean(axis=1)
    score_sys, score_bl = float(sys_scores.mean()), float(bl_scores.mean())
    return {
        "system": {"score": score_sys, **_interval(*estimate_ci(resampled_sys, confidence))},
        "baseline": {"score": score_bl, **_interval(*estimate_ci(resampled_bl, confidence))},
        "difference": score_sys - score_bl,
        "p_value": p_value(np.abs(resampled_sys - resampled_bl), abs(score_sys - score_bl)),
        "n_samples": n_samples,
        "seed": seed,
        "confidence": confidence,
    }


def _paired_bs_test(
    baseline_info: Mapping[str, tuple[Any, Any]],
    sys_name: str,
    hypotheses: Sequence[str],
    references: Sequence[Sequence[str]] | None,
    metrics: Mapping[str, Any],
    n_samples: int = 1000,
    n_ar_confidence: int = -1,
    seed: int | None = None,
) -> tuple[str, dict[str, Any]]:
    """sacrebleu's ``significance._paired_bs_test``, with its signature, for ``PairedTest`` to call in its place: the
    same indices, float32 sentence statistics, corpus scores and CI, but the p-value from :func:`p_value`, so that a
    resample on which the system ties with the baseline counts against significance for BLEU and chrF as for every
    other metric. sacrebleu's p-value cannot be corrected afterwards: that needs the number of ties, and only the
    resampled scores, which it does not return, give it."""
    from sacrebleu.significance import Result
    from sacrebleu.significance import estimate_ci as sacrebleu_estimate_ci

    idxs = resample_indices(len(hypotheses), n_samples, seed)
    results = {}
    for name, metric in metrics.items():
        bl_stats, bl_result = baseline_info[name]
        sys_stats = metric._extract_corpus_statistics(hypotheses, references)
        sys_score = metric._aggregate_and_compute(sys_stats).score
        resampled_sys = _resampled_corpus_scores(metric, sys_stats, idxs)
        resampled_bl = _resampled_corpus_scores(metric, bl_stats, idxs)
        p = p_value(np.abs(resampled_sys - resampled_bl), abs(bl_result.score - sys_score))
        # sacrebleu's estimate_ci, not ours: it averages in the scores' own dtype (float32 for chrF), and the CI of a
        # row then equals the baseline's bit for bit when their statistics are equal
        results[name] = Result(sys_score, p, *sacrebleu_estimate_ci(resampled_sys))
    return sys_name, results


def _resampled_corpus_scores(metric: Any, sentence_stats: Any, idxs: np.ndarray) -> np.ndarray:
    # float32 as sacrebleu converts them: the same sums, so the same scores and CIs as its own test
    stats_ = np.array(sentence_stats, dtype="float32")
    return np.array([metric._compute_score_from_stats(s.sum(0)).score for s in stats_[idxs]])


def pick_baseline(setting: str, rows: Sequence[str]) -> str | None:
    """The baseline row for ``eval.baseline``: ``auto`` = STUDENT_PEFT when it is a row, else STUDENT, else None;
    ``none`` = None; a row name = that row (None when it is not a row)."""
    if setting == "none":
        return None
    if setting == "auto":
        return next((name for name in ("STUDENT_PEFT", "STUDENT") if name in rows), None)
    return setting if setting in rows else None


def no_baseline_reason(setting: str, rows: Sequence[str]) -> str:
    """Why no significance test is run for this setting and these rows (when :func:`pick_baseline` gives None)."""
    if setting == "none":
        return "eval.baseline=none"
    if setting == "auto":
        return f"eval.baseline=auto: no STUDENT_PEFT or STUDENT row to test against (rows: {', '.join(rows)})"
    return f"eval.baseline={setting} is not a row of the table (rows: {', '.join(rows)})"


def compare_to_baseline(
    hypotheses: Mapping[str, Sequence[str]],
    references: Sequence[str],
    baseline: str,
    *,
    sentence_scores: Mapping[str, Mapping[str, Sequence[float] | None]] | None = None,
    bleu_tokenize: str = "zh",
    n_samples: int = 1000,
) -> dict[str, Any]:
    """Every row against ``baseline`` with paired bootstrap resampling (seed: sacrebleu's, see :func:`sacrebleu_seed`).

    ``hypotheses``: row -> its translations (the table's row order); ``sentence_scores``: metric key -> row -> the
    sentence scores of a mean-of-sentence-scores metric (``{"bertscore": {row: sentence F1, ...}}``; a row with None
    has no such score and gets none). BLEU and chrF go through sacrebleu's ``PairedTest`` (its scores and CIs; its
    p-values too, except that a tie counts against significance: :func:`_paired_bs_test`), the sentence-score metrics
    through :func:`paired_bootstrap` with the same number of resamples and the same seed. A metric that ties with the
    baseline on every resample gives p = 1.0, not significant, whatever the translations.

    Returns ``{"baseline", "test", "n_samples", "seed", "confidence", "alpha", "signatures", "systems": {row: {metric
    key: {"score", "mean", "ci_low", "ci_high", "p_value", "significant"}}}, "identical_to_baseline": [row, ...]}``;
    the baseline row has ``p_value`` and ``significant`` None. A row whose translations equal the baseline's is not
    tested: p = 1.0, not significant, the baseline's CI, and it is listed under ``identical_to_baseline``.
    """
    from sacrebleu.metrics import BLEU, CHRF
    from sacrebleu.significance import PairedTest

    if baseline not in hypotheses:
        raise ValueError(f"baseline {baseline!r} is not one of the rows: {', '.join(hypotheses)}")
    refs = list(references)
    for name, hyps in hypotheses.items():
        if len(hyps) != len(refs):
            raise ValueError(f"{name}: {len(hyps)} translations but {len(refs)} references")
    others = [name for name in hypotheses if name != baseline]
    identical = {name for name in others if list(hypotheses[name]) == list(hypotheses[baseline])}
    tested = [name for name in others if name not in identical]
    named = [(baseline, list(hypotheses[baseline])), *((name, list(hypotheses[name])) for name in tested)]
    metrics = {"chrf": CHRF(), "bleu": BLEU(tokenize=bleu_tokenize)}
    test = PairedTest(named, metrics, [refs], test_type="bs", n_samples=n_samples)
    test._fn = _paired_bs_test  # sacrebleu's test but for ties, which count against significance (module docstring)
    seed = test._seed if test._seed else None  # what PairedTest passes on to each comparison
    signatures, results = test()
    rows: dict[str, dict[str, Any]] = {name: {} for name in hypotheses}
    out: dict[str, Any] = {
        "baseline": baseline,
        "test": "paired bootstrap resampling",
        "n_samples": test.n_samples,
        "seed": seed,
        "confidence": 0.95,
        "alpha": ALPHA,
        "signatures": {},
        "systems": rows,
    }
    # sacrebleu keys its results by score name (BLEU, chrF2), in the order of the metrics given
    for key, (score_name, sacre) in zip(metrics, ((k, v) for k, v in results.items() if k != "System"), strict=True):
        out["signatures"][key] = str(signatures[score_name])
        for name, result in zip(results["System"], sacre, strict=True):
            rows[name][key] = _record(result.score, result.mean, result.ci, result.p_value)
    for key, by_row in (sentence_scores or {}).items():
        base = by_row.get(baseline)
        if base is None:
            continue
        for name in hypotheses:
            values = by_row.get(name)
            if values is None:
                continue
            r = paired_bootstrap(values, base, n_samples=test.n_samples, seed=seed)
            p = None if name == baseline else r["p_value"]
            rows[name][key] = {**r["system"], "p_value": p, "significant": None if p is None else p < ALPHA}
        out["signatures"][key] = f"mean of sentence scores|bs:{test.n_samples}|seed:{str(seed).lower()}"
    for name in identical:  # equal translations: nothing to test, and the table can say so
        rows[name].update({key: dict(rows[baseline][key]) for key in metrics})
        for record in rows[name].values():
            record.update(p_value=1.0, significant=False)
    order = [*(sentence_scores or {}), *metrics]  # each row's metrics in one order: sentence-score metrics first
    for name in hypotheses:
        rows[name] = {key: rows[name][key] for key in order if key in rows[name]}
    out["identical_to_baseline"] = [name for name in hypotheses if name in identical]
    return out


def _record(score: float, mean: float, half: float, p: float | None) -> dict[str, Any]:
    return {
        "score": float(score),
        **_interval(float(mean), float(half)),
        "p_value": None if p is None else float(p),
        "significant": None if p is None else p < ALPHA,
    }
