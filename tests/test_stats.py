"""Tests for distillmt.stats: the paired bootstrap of a mean-of-sentence-scores metric against hand-checked
properties and against sacrebleu's own paired bootstrap, and the row-against-baseline comparison.

What is compared with sacrebleu, and why:

* exactly: sacrebleu's ``PairedTest(test_type='bs')`` run on a metric whose corpus score *is* the mean of given sentence
  scores (``MeanOfSentences`` below: sentence statistics ``[score, 1]``, score = sum / count) must give the same
  p-value, bootstrap mean and CI as :func:`paired_bootstrap` on those sentence scores: same resampling indices, same
  CI, same p-value formula (sacrebleu sums in float32, hence the tolerance on means and CIs);
* in kind: sacrebleu's paired test on corpus chrF versus :func:`paired_bootstrap` on sentence chrF. The statistics differ
  (corpus chrF pools character n-gram counts; the mean of sentence chrF weights every sentence equally), so the numbers
  differ, but both must call the same systems significant, point the same way, and give CIs of similar width.
"""

from __future__ import annotations

import numpy as np
import pytest
from sacrebleu.metrics import CHRF
from sacrebleu.metrics.base import Metric, Score, Signature
from sacrebleu.significance import PairedTest
from sacrebleu.significance import estimate_ci as sacrebleu_estimate_ci

from distillmt import stats
from distillmt.config import load_config
from distillmt.errors import DistillmtError

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _sacrebleu_seed(monkeypatch):
    monkeypatch.delenv("SACREBLEU_SEED", raising=False)  # sacrebleu's default seed, 12345


def scores(n: int, seed: int = 0, low: float = 0.5, high: float = 0.8) -> np.ndarray:
    return np.random.default_rng(seed).uniform(low, high, n)


# --- hand-checked properties ------------------------------------------------------------------------------------------


def test_identical_systems_are_not_significant():
    """Every resampled difference is 0, as extreme as the observed 0: p = 1 (sacrebleu's strict count would give
    its smallest p-value, 1/(n+1), and call a system significantly different from itself)."""
    x = scores(100)
    r = stats.paired_bootstrap(x, x.copy())
    assert r["p_value"] == 1.0
    assert r["difference"] == 0.0
    assert r["system"] == r["baseline"]
    assert stats.paired_bootstrap(x, x.copy(), n_samples=200)["p_value"] == 1.0


def test_a_system_with_the_same_mean_is_not_significant():
    x = scores(200)
    shuffled = np.random.default_rng(1).permutation(x)  # same sentence scores in other places: same mean
    r = stats.paired_bootstrap(shuffled, x)
    assert abs(r["difference"]) < 1e-12
    assert r["p_value"] > 0.3


@pytest.mark.parametrize("sign", [1, -1])
def test_a_system_better_or_worse_on_every_sentence_is_significant(sign):
    base = scores(100)
    gain = np.random.default_rng(2).uniform(0.005, 0.02, 100)  # small: ~4% of the sentence-score spread
    r = stats.paired_bootstrap(base + sign * gain, base)
    assert r["p_value"] < 0.05
    assert r["p_value"] == 1 / 1001  # no resample comes near: the smallest p-value sacrebleu's formula gives
    assert np.sign(r["difference"]) == sign


def test_the_ci_contains_the_mean_and_narrows_with_more_sentences():
    widths = []
    for n in (50, 200, 800):
        x = scores(n, seed=n)
        r = stats.paired_bootstrap(x, scores(n, seed=n + 1))
        s = r["system"]
        assert s["ci_low"] < s["mean"] < s["ci_high"]
        assert s["ci_low"] < s["score"] < s["ci_high"]
        assert s["score"] == pytest.approx(x.mean())
        assert s["mean"] == pytest.approx(x.mean(), abs=0.01)
        widths.append(s["ci_high"] - s["ci_low"])
    assert widths[0] > 1.5 * widths[1] > 2.25 * widths[2]  # ~1/sqrt(n): halves for 4x the sentences
    # about 1.96 standard errors on each side
    x = scores(800, seed=800)
    assert widths[2] / 2 == pytest.approx(1.96 * x.std() / np.sqrt(800), rel=0.15)


def test_same_seed_same_result_other_seed_other_resamples():
    a, b = scores(60, seed=3), scores(60, seed=4)
    assert stats.paired_bootstrap(a, b) == stats.paired_bootstrap(a, b, seed=12345)
    other = stats.paired_bootstrap(a, b, seed=7)
    assert other["system"]["ci_low"] != stats.paired_bootstrap(a, b)["system"]["ci_low"]
    assert other["system"]["score"] == stats.paired_bootstrap(a, b)["system"]["score"]


def test_bootstrap_ci_is_the_ci_paired_bootstrap_gives():
    a, b = scores(80, seed=5), scores(80, seed=6)
    r = stats.paired_bootstrap(a, b, n_samples=500, seed=9)
    assert stats.bootstrap_ci(a, n_samples=500, seed=9) == r["system"]
    assert stats.bootstrap_ci(b, n_samples=500, seed=9) == r["baseline"]


@pytest.mark.parametrize("n", [100, 101, 119, 120, 400, 999, 1000, 1001, 2000, 4321])
def test_estimate_ci_matches_sacrebleus(n):
    x = np.random.default_rng(n).normal(size=n)
    mean, half = stats.estimate_ci(x)
    want_mean, want_half = sacrebleu_estimate_ci(x)
    assert mean == pytest.approx(want_mean, abs=1e-12)
    assert half == want_half


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="3 system scores but 2 baseline"):
        stats.paired_bootstrap([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="non-empty"):
        stats.paired_bootstrap([], [])
    with pytest.raises(ValueError, match="confidence"):
        stats.paired_bootstrap([1.0], [1.0], confidence=1.0)


# --- against sacrebleu's own paired bootstrap -------------------------------------------------------------------------


class MeanOfSentences(Metric):
    """A sacrebleu metric whose corpus score is the mean of the sentence scores written as the hypotheses."""

    _SIGNATURE_TYPE = Signature

    def _preprocess_segment(self, sent: str) -> str:
        return sent

    def _extract_reference_info(self, refs):
        return {}

    def _compute_segment_statistics(self, hypothesis, ref_kwargs):
        return [float(hypothesis), 1.0]

    def _compute_score_from_stats(self, stats_):
        return Score("mean", float(stats_[0]) / float(stats_[1]))

    def _aggregate_and_compute(self, stats_):
        return self._compute_score_from_stats(np.sum(np.asarray(stats_, dtype=float), axis=0))


def sacrebleu_paired_bs(systems: dict[str, np.ndarray], n_samples: int = 1000) -> dict:
    named = [(name, [repr(float(v)) for v in values]) for name, values in systems.items()]
    refs = [["-"] * len(named[0][1])]
    _, results = PairedTest(named, {"mean": MeanOfSentences()}, refs, test_type="bs", n_samples=n_samples)()
    return dict(zip(results["System"], results["mean"], strict=True))


def test_paired_bootstrap_equals_sacrebleus_paired_test_on_a_mean_metric():
    base = scores(150, seed=10)
    rng = np.random.default_rng(11)
    systems = {
        "base": base,
        "better": base + rng.uniform(0.0, 0.03, 150),
        "noisy": base + rng.normal(0.0, 0.05, 150),  # a noisy system with no real difference
        "slightly": base + rng.normal(0.004, 0.05, 150),
    }
    sacre = sacrebleu_paired_bs(systems)
    for name, values in systems.items():
        ours = stats.paired_bootstrap(values, base)
        theirs = sacre[name]
        assert ours["system"]["score"] == pytest.approx(theirs.score, rel=1e-6)
        assert ours["system"]["mean"] == pytest.approx(theirs.mean, rel=1e-5)
        half = (ours["system"]["ci_high"] - ours["system"]["ci_low"]) / 2
        assert half == pytest.approx(theirs.ci, rel=1e-3)
        if name != "base":
            assert ours["p_value"] == theirs.p_value
    ps = {name: stats.paired_bootstrap(v, base)["p_value"] for name, v in systems.items() if name != "base"}
    assert ps["better"] < 0.05 < ps["noisy"]  # both outcomes occur, so the equality above is not trivial
    assert 1 / 1001 < ps["slightly"] < 1


def chinese_corpus(n: int, seed: int = 0):
    """References, and a function that copies them with a given share of characters replaced."""
    chars = list("的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对")
    rng = np.random.default_rng(seed)
    refs = ["".join(rng.choice(chars, size=int(rng.integers(6, 16)))) for _ in range(n)]

    def noisy(rate: float, texts: list[str] | None = None) -> list[str]:
        return ["".join(str(rng.choice(chars)) if rng.random() < rate else c for c in t) for t in texts or refs]

    return refs, noisy


def test_agrees_in_kind_with_sacrebleus_paired_test_on_chrf():
    refs, noisy = chinese_corpus(200)
    base = noisy(0.5)
    better = noisy(0.3)
    near = list(base)
    near[0] = refs[0]  # one sentence of 200 changed
    systems = {"base": base, "better": better, "near": near, "same": list(base)}
    _, results = PairedTest(list(systems.items()), {"chrF": CHRF()}, [refs], test_type="bs", n_samples=1000)()
    corpus = dict(zip(results["System"], results["chrF2"], strict=True))
    metric = CHRF()
    sentence = {
        name: [metric.sentence_score(h, [r]).score for h, r in zip(hyps, refs, strict=True)]
        for name, hyps in systems.items()
    }
    ours = {name: stats.paired_bootstrap(sentence[name], sentence["base"]) for name in systems}

    for name in ("better", "near"):  # same verdict at p < 0.05, same direction
        assert (ours[name]["p_value"] < 0.05) == (corpus[name].p_value < 0.05), name
        assert np.sign(ours[name]["difference"]) == np.sign(corpus[name].score - corpus["base"].score), name
    assert ours["better"]["p_value"] < 0.05 and ours["near"]["p_value"] > 0.05
    assert ours["same"]["p_value"] == 1.0 and corpus["same"].p_value == 1 / 1001  # ties: see p_value's docstring
    for name in systems:  # CIs of similar width, each around its own score
        s = ours[name]["system"]
        assert s["ci_low"] < s["score"] < s["ci_high"]
        assert corpus[name].mean - corpus[name].ci < corpus[name].score < corpus[name].mean + corpus[name].ci
        assert 0.5 < ((s["ci_high"] - s["ci_low"]) / 2) / corpus[name].ci < 2


# --- every row against the baseline -----------------------------------------------------------------------------------


def test_compare_to_baseline_uses_sacrebleus_results_for_bleu_and_chrf():
    from sacrebleu.metrics import BLEU

    refs, noisy = chinese_corpus(120, seed=1)
    hyps = {"TEACHER": noisy(0.2), "STUDENT": noisy(0.5), "HLKD": noisy(0.45)}
    f1 = {name: scores(120, seed=i) for i, name in enumerate(hyps)}
    out = stats.compare_to_baseline(hyps, refs, "STUDENT", sentence_scores={"bertscore": f1}, n_samples=500)
    assert out["baseline"] == "STUDENT" and out["n_samples"] == 500 and out["seed"] == 12345
    assert "bs:500|seed:12345" in out["signatures"]["bleu"] and "tok:zh" in out["signatures"]["bleu"]
    assert list(out["systems"]) == ["TEACHER", "STUDENT", "HLKD"]
    assert all(list(row) == ["bertscore", "chrf", "bleu"] for row in out["systems"].values())

    named = [("STUDENT", hyps["STUDENT"]), ("TEACHER", hyps["TEACHER"]), ("HLKD", hyps["HLKD"])]
    metrics = {"chrf": CHRF(), "bleu": BLEU(tokenize="zh")}
    _, results = PairedTest(named, metrics, [refs], test_type="bs", n_samples=500)()
    for key, score_name in (("chrf", "chrF2"), ("bleu", "BLEU")):
        for name, result in zip(results["System"], results[score_name], strict=True):
            record = out["systems"][name][key]
            assert record["score"] == result.score
            assert record["ci_low"] == pytest.approx(result.mean - result.ci)
            assert record["ci_high"] == pytest.approx(result.mean + result.ci)
            assert record["p_value"] == result.p_value
            assert record["significant"] == (None if result.p_value is None else result.p_value < 0.05)
    for name in hyps:
        r = stats.paired_bootstrap(f1[name], f1["STUDENT"], n_samples=500)
        record = out["systems"][name]["bertscore"]
        assert record["score"] == r["system"]["score"] and record["ci_low"] == r["system"]["ci_low"]
        assert record["p_value"] == (None if name == "STUDENT" else r["p_value"])
    assert out["systems"]["TEACHER"]["chrf"]["significant"] is True
    assert out["systems"]["STUDENT"]["chrf"]["p_value"] is None


def test_identical_translations_are_not_tested():
    refs, noisy = chinese_corpus(60, seed=2)
    base = noisy(0.5)
    hyps = {"STUDENT": base, "HLKD": list(base), "TEACHER": noisy(0.1)}
    f1 = {"STUDENT": scores(60), "HLKD": scores(60), "TEACHER": scores(60, seed=1)}
    out = stats.compare_to_baseline(hyps, refs, "STUDENT", sentence_scores={"bertscore": f1})
    assert out["identical_to_baseline"] == ["HLKD"]
    for key in ("bertscore", "chrf", "bleu"):
        record = out["systems"]["HLKD"][key]
        assert record["p_value"] == 1.0 and record["significant"] is False
        assert record["ci_low"] == out["systems"]["STUDENT"][key]["ci_low"]
    assert out["systems"]["TEACHER"]["chrf"]["significant"] is True


def sacrebleu_p_values(hyps: dict[str, list[str]], refs: list[str], baseline: str) -> dict[str, dict[str, float]]:
    """sacrebleu's own paired-bootstrap p-values, row -> metric key -> p (the baseline row left out)."""
    from sacrebleu.metrics import BLEU

    named = [(baseline, hyps[baseline]), *((n, h) for n, h in hyps.items() if n != baseline)]
    metrics = {"chrf": CHRF(), "bleu": BLEU(tokenize="zh")}
    _, results = PairedTest(named, metrics, [refs], test_type="bs", n_samples=1000)()
    p = {name: {} for name in results["System"][1:]}
    for key, score_name in (("chrf", "chrF2"), ("bleu", "BLEU")):
        for name, result in zip(results["System"][1:], results[score_name][1:], strict=True):
            p[name][key] = result.p_value
    return p


def test_rows_at_bleu_and_chrf_zero_are_a_tie_not_a_difference():
    """The known case: two rows whose translations differ but share no character with the references (the wrong
    language) score BLEU 0.00 and chrF 0.00 on every resample. sacrebleu's strict count gives 1/1001 and a †."""
    refs, noisy = chinese_corpus(80, seed=4)
    words = "the a cat dog sat ran on under mat house quickly slowly".split()
    rng = np.random.default_rng(5)
    english = [" ".join(rng.choice(words, size=5)) for _ in refs]
    other = [" ".join(rng.choice(words, size=7)) for _ in refs]
    hyps = {"STUDENT": english, "HLKD": other, "TEACHER": noisy(0.3)}
    out = stats.compare_to_baseline(hyps, refs, "STUDENT")
    assert out["identical_to_baseline"] == []
    for key in ("chrf", "bleu"):
        record = out["systems"]["HLKD"][key]
        assert record["score"] == 0.0 == out["systems"]["STUDENT"][key]["score"]
        assert record["p_value"] == 1.0 and record["significant"] is False, key
        assert record["ci_low"] == record["ci_high"] == 0.0  # the CI stays as measured
        assert out["systems"]["TEACHER"][key]["significant"] is True  # a real difference still is one
    assert sacrebleu_p_values(hyps, refs, "STUDENT")["HLKD"] == {"chrf": 1 / 1001, "bleu": 1 / 1001}


def test_rows_differing_only_in_spaces_tie_on_chrf_and_bleu():
    """chrF drops whitespace and BLEU's zh tokenizer splits every Chinese character, so a row that differs from the
    baseline only in the spaces between characters has its sentence statistics and every resampled score, non-zero
    here, equal to the baseline's: a tie on each resample, so p = 1, not sacrebleu's 1/1001."""
    refs, noisy = chinese_corpus(80, seed=6)
    base = noisy(0.4)
    spaced = [" ".join(t) if i % 2 else t for i, t in enumerate(base)]
    hyps = {"STUDENT": base, "HLKD": spaced}
    out = stats.compare_to_baseline(hyps, refs, "STUDENT")
    assert out["identical_to_baseline"] == []
    for key in ("chrf", "bleu"):
        record, baseline = out["systems"]["HLKD"][key], out["systems"]["STUDENT"][key]
        assert record["score"] == baseline["score"] > 10
        assert record["p_value"] == 1.0 and record["significant"] is False, key
        assert record["ci_low"] == baseline["ci_low"] < record["ci_high"] == baseline["ci_high"]
    assert sacrebleu_p_values(hyps, refs, "STUDENT")["HLKD"] == {"chrf": 1 / 1001, "bleu": 1 / 1001}


def test_rows_without_sentence_scores_get_no_such_metric():
    refs, noisy = chinese_corpus(30, seed=3)
    hyps = {"STUDENT": noisy(0.5), "TEACHER": noisy(0.2)}
    out = stats.compare_to_baseline(hyps, refs, "STUDENT", sentence_scores={"bertscore": dict.fromkeys(hyps)})
    assert all(list(row) == ["chrf", "bleu"] for row in out["systems"].values())
    assert "bertscore" not in out["signatures"]
    with pytest.raises(ValueError, match="baseline 'SLKD' is not one of the rows"):
        stats.compare_to_baseline(hyps, refs, "SLKD")


@pytest.mark.parametrize(
    ("setting", "rows", "want"),
    [
        ("auto", ["TEACHER", "STUDENT", "TEACHER_PEFT", "STUDENT_PEFT", "HLKD"], "STUDENT_PEFT"),
        ("auto", ["TEACHER", "STUDENT", "HLKD"], "STUDENT"),
        ("auto", ["TEACHER", "HLKD"], None),
        ("none", ["TEACHER", "STUDENT"], None),
        ("HLKD", ["TEACHER", "STUDENT", "HLKD"], "HLKD"),
    ],
)
def test_pick_baseline(setting, rows, want):
    assert stats.pick_baseline(setting, rows) == want
    if want is None:
        assert setting in stats.no_baseline_reason(setting, rows)


def test_config_keys_are_checked():
    cfg = load_config(None, [])
    assert (cfg.eval.baseline, cfg.eval.bootstrap_samples) == ("auto", 1000)
    assert load_config(None, ["eval.baseline=STUDENT", "eval.bootstrap_samples=100"]).eval.bootstrap_samples == 100
    with pytest.raises(DistillmtError, match=r"'eval.baseline' = 'best' is not allowed; choose one of: auto, none"):
        load_config(None, ["eval.baseline=best"])
    with pytest.raises(DistillmtError, match=r"'eval.baseline' = 'GKD' is not a row of the table"):
        load_config(None, ["eval.baseline=GKD"])
    with pytest.raises(DistillmtError, match=r"'eval.bootstrap_samples' = 99 is out of range; allowed: \[100, inf\]"):
        load_config(None, ["eval.bootstrap_samples=99"])
