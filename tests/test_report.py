"""Tests for distillmt.report: the table and signature lines come from the metric entries alone, rows scored on
different sentences are refused, and every system gets its description."""

from __future__ import annotations

import copy

import pytest
from conftest import BLEU_SIG, BS_SIG, CHRF_SIG, REASON, two_rows, with_significance
from conftest import make_report as _report
from conftest import make_scores as _scores

from distillmt.config import load_config
from distillmt.errors import DistillmtError
from distillmt.plots import significance_record
from distillmt.report import check_comparable, describe_system, markdown_report, results_table, write_report

pytestmark = pytest.mark.unit

TABLE = (
    "| system | BERTScore P | BERTScore R | BERTScore F1 | chrF | BLEU | params | translation tokens/s |\n"
    "|---|---|---|---|---|---|---|---|\n"
    "| TEACHER | 0.7703 | 0.7134 | 0.7395 | 9.80 | 8.41 | 3.2M | 3785 |\n"
    "| STUDENT | n/a | n/a | n/a | 5.28 | 2.72 | 305K | 8692 |\n"
    "\n"
    f"BERTScore not measured: {REASON}\n"
)


def test_results_table_is_the_default_layout():
    assert results_table(two_rows()) == TABLE


def test_table_without_unavailable_metrics_has_no_note():
    report = _report(SLKD=(_scores(0.7476, 0.6788, 0.7101, 8.17, 6.57), {"parameters": 305_000}))
    assert results_table(report) == (
        "| system | BERTScore P | BERTScore R | BERTScore F1 | chrF | BLEU | params | translation tokens/s |\n"
        "|---|---|---|---|---|---|---|---|\n"
        "| SLKD | 0.7476 | 0.6788 | 0.7101 | 8.17 | 6.57 | 305K | n/a |\n"
    )


def test_markdown_report_signature_lines_come_from_the_entries():
    text = markdown_report(two_rows())
    assert text.startswith("# distillmt results: default\n\nCommand: `distillmt run`\n\n" + TABLE)
    assert (
        "## Metric signatures\n\n"
        f"- BERTScore: `{BS_SIG}` (mean over 300 sentences, no baseline rescaling)\n"
        f"- chrF: `{CHRF_SIG}`\n"
        f"- BLEU: `{BLEU_SIG}`\n\n"
        "## Systems\n\n- **TEACHER**: TEACHER settings\n- **STUDENT**: STUDENT settings\n"
    ) in text
    assert "| data | 0.8 | ran |\n| evaluate_TEACHER | 3.0 | reused (complete) |" in text


def test_signature_of_a_metric_comes_from_the_first_row_that_measured_it():
    report = two_rows()
    report["systems"] = dict(reversed(report["systems"].items()))  # STUDENT (BERTScore n/a) first
    assert f"- BERTScore: `{BS_SIG}` (mean over 300 sentences" in markdown_report(report)
    no_bertscore = two_rows()
    del no_bertscore["systems"]["TEACHER"]
    assert "- BERTScore" not in markdown_report(no_bertscore)


def test_a_new_metric_entry_adds_its_column_and_signature_without_code_changes():
    report = two_rows()
    for value, row in zip((0.81234, None), report["systems"].values(), strict=True):
        row["scores"]["comet"] = {
            "name": "COMET",
            "score": value,
            "signature": "Unbabel/wmt22-comet-da" if value is not None else None,
            "columns": {"COMET": value},
            "decimals": 3,
            "note": "wmt22-comet-da, batch 8",
        }
        if value is None:
            row["scores"]["comet"]["unavailable"] = "no GPU"
    assert results_table(report) == (
        "| system | BERTScore P | BERTScore R | BERTScore F1 | chrF | BLEU | COMET | params | translation tokens/s |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
        "| TEACHER | 0.7703 | 0.7134 | 0.7395 | 9.80 | 8.41 | 0.812 | 3.2M | 3785 |\n"
        "| STUDENT | n/a | n/a | n/a | 5.28 | 2.72 | n/a | 305K | 8692 |\n"
        "\n"
        f"BERTScore not measured: {REASON}\n"
        "COMET not measured: no GPU\n"
    )
    assert "- BLEU: `" + BLEU_SIG + "`\n- COMET: `Unbabel/wmt22-comet-da` (wmt22-comet-da, batch 8)\n" in (
        markdown_report(report)
    )


def test_metric_order_in_the_scores_is_the_column_order():
    report = two_rows()
    for row in report["systems"].values():
        s = row["scores"]
        row["scores"] = {"n": s["n"], "refs_sha256": s["refs_sha256"], "bleu": s["bleu"], "chrf": s["chrf"]}
    assert results_table(report).splitlines()[:3] == [
        "| system | BLEU | chrF | params | translation tokens/s |",
        "|---|---|---|---|---|",
        "| TEACHER | 8.41 | 9.80 | 3.2M | 3785 |",
    ]


def test_a_row_without_a_metric_shows_n_a():
    report = two_rows()
    del report["systems"]["STUDENT"]["scores"]["bleu"]
    assert "| STUDENT | n/a | n/a | n/a | 5.28 | n/a | 305K | 8692 |" in results_table(report)


def test_rows_scored_on_different_sentences_are_refused(tmp_path):
    fewer = two_rows()
    fewer["systems"]["STUDENT"]["scores"]["n"] = 200
    other_refs = two_rows()
    other_refs["systems"]["STUDENT"]["scores"]["refs_sha256"] = "cd" * 32
    for report in (fewer, other_refs):
        with pytest.raises(DistillmtError, match=r"different test sentences.*TEACHER: 300 sentences.*STUDENT"):
            check_comparable(report)
        with pytest.raises(DistillmtError, match=r"different test sentences"):
            results_table(report)
        with pytest.raises(DistillmtError, match=r"different test sentences"):
            write_report(tmp_path, report)
        assert list(tmp_path.iterdir()) == []  # nothing written


def test_rows_without_a_reference_hash_are_refused():
    report = two_rows()
    del report["systems"]["STUDENT"]["scores"]["refs_sha256"]
    with pytest.raises(DistillmtError, match=r"scores of STUDENT carry no reference hash.*Rerun their evaluate"):
        check_comparable(report)
    del report["systems"]["TEACHER"]["scores"]["refs_sha256"]
    with pytest.raises(DistillmtError, match=r"scores of TEACHER, STUDENT carry no reference hash"):
        check_comparable(report)


def test_same_sentences_pass_and_the_report_is_written(tmp_path):
    report = two_rows()
    check_comparable(report)
    assert write_report(tmp_path, copy.deepcopy(report)) == tmp_path / "results.md"
    text = (tmp_path / "results.md").read_text(encoding="utf-8")
    plots = text[text.index("## Plots\n") : text.index("## Metric signatures\n")]
    assert text.replace(plots, "") == markdown_report(report)  # the report without plots, plus its plots section
    assert plots.startswith("## Plots\n\n![scores_bertscore](plots/scores_bertscore.png)\n\n*BERTScore F1 of each")
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "scores_bertscore.png",
        "scores_bleu.png",
        "scores_chrf.png",
    ]
    assert (tmp_path / "results.json").is_file()


def test_markdown_report_embeds_plots_with_captions():
    plots = [("plots/scores_chrf.png", "chrF of each system."), (None, "Plot training_x not drawn: OSError: full.")]
    text = markdown_report(two_rows(), plots)
    assert (
        TABLE + "\n## Plots\n\n![scores_chrf](plots/scores_chrf.png)\n\n*chrF of each system.*\n\n"
        "Plot training_x not drawn: OSError: full.\n\n## Metric signatures\n"
    ) in text


LEGEND = (
    "Cells: score (95% CI); † = differs from the baseline STUDENT at p < 0.05. Test: paired bootstrap resampling, "
    "1,000 resamples, seed 12345 (sacrebleu's paired test for chrF and BLEU; BERTScore F1 on its sentence scores "
    "with the same resamples).\n"
)

TABLE_WITH_CI = (
    "| system | BERTScore P | BERTScore R | BERTScore F1 | chrF | BLEU | p vs STUDENT (BERTScore F1 / chrF / BLEU) "
    "| params | translation tokens/s |\n"
    "|---|---|---|---|---|---|---|---|---|\n"
    "| TEACHER | 0.7703 | 0.7134 | 0.7395† (0.7301–0.7490) | 9.80† (9.10–10.52) | 8.41† (7.60–9.30) "
    "| 0.0010 / 0.0010 / 0.0010 | 3.2M | 3785 |\n"
    "| STUDENT | 0.6989 | 0.6178 | 0.6538 (0.6440–0.6630) | 5.28 (4.80–5.75) | 2.72 (2.30–3.20) "
    "| baseline | 305K | 8692 |\n"
    "| HLKD | 0.7423 | 0.6719 | 0.7037† (0.6941–0.7130) | 5.40 (4.90–5.90) | 2.99 (2.50–3.50) "
    "| 0.0010 / 0.3127 / 0.2448 | 305K | 9463 |\n"
    "\n" + LEGEND
)


def test_table_with_significance_shows_ci_marks_p_values_and_legend():
    report = with_significance()
    assert results_table(report) == TABLE_WITH_CI
    assert significance_record(report, "HLKD", "chrf")["p_value"] == 0.3127
    assert significance_record(report, "STUDENT", "bleu")["significant"] is None
    assert significance_record(two_rows(), "HLKD", "chrf") is None


def test_markdown_report_with_significance_lists_the_test_signatures():
    text = markdown_report(with_significance())
    assert "Command: `distillmt run`\n\n" + TABLE_WITH_CI + "\n## Metric signatures\n" in text
    assert (
        "- BERTScore F1 paired bootstrap vs STUDENT: `mean of sentence scores|bs:1000|seed:12345`\n"
        "- chrF paired bootstrap vs STUDENT: `nrefs:1|bs:1000|seed:12345|case:mixed|eff:yes|nc:6|nw:0|space:no|"
        "version:2.6.0`\n"
        "- BLEU paired bootstrap vs STUDENT: `nrefs:1|bs:1000|seed:12345|"
    ) in text
    assert "No significance test" not in text


def test_table_with_significance_and_an_unmeasured_metric():
    report = with_significance()
    for row in report["significance"]["systems"].values():
        del row["bertscore"]
    report["systems"]["HLKD"]["scores"] = _scores(chrf=5.4012, bleu=2.9911)  # BERTScore n/a
    report["significance"]["identical_to_baseline"] = ["HLKD"]
    lines = results_table(report).splitlines()
    assert lines[0].startswith(
        "| system | BERTScore P | BERTScore R | BERTScore F1 | chrF | BLEU | p vs STUDENT (chrF / BLEU) |"
    )
    assert (
        lines[2]
        == "| TEACHER | 0.7703 | 0.7134 | 0.7395 | 9.80† (9.10–10.52) | 8.41† (7.60–9.30) | 0.0010 / 0.0010 | 3.2M | 3785 |"
    )
    assert (
        lines[4] == "| HLKD | n/a | n/a | n/a | 5.40 (4.90–5.90) | 2.99 (2.50–3.50) | 0.3127 / 0.2448 | 305K | 9463 |"
    )
    assert lines[6].endswith("(sacrebleu's paired test for chrF and BLEU).")
    assert lines[7:] == [
        "Translations identical to the baseline's, not tested (p = 1): HLKD.",
        "",
        f"BERTScore not measured: {REASON}",
    ]


@pytest.mark.parametrize("significance", [None, {"skipped": "eval.baseline=none"}])
def test_without_significance_results_the_table_is_the_plain_one(significance):
    report = two_rows()
    if significance is not None:
        report["significance"] = significance
    assert results_table(report) == TABLE
    text = markdown_report(report)
    assert text.startswith("# distillmt results: default\n\nCommand: `distillmt run`\n\n" + TABLE)
    assert ("No significance test: eval.baseline=none.\n" in text) == (significance is not None)
    assert "paired bootstrap" not in text


SCRATCH = {
    "TEACHER": "teacher from scratch (h=224, layers=4) trained on the references",
    "STUDENT": "student from scratch (h=64, layers=1) trained on the references",
    "HLKD": "labels from the finetuned teacher, 1 candidate(s), selection=score, beams=1, sample=False, "
    "mix_references=0.0",
    "SLKD": "finetuned teacher, loss=0.1*CE+0.9*T^2*forward_kl, T=2.0",
    "GKD": "on-policy lambda=0.5, forward_kl, T=2.0",
}


@pytest.mark.parametrize("name", list(SCRATCH))
def test_describe_system_scratch(name):
    assert describe_system(load_config(None, []), name) == SCRATCH[name]


PRETRAINED = {
    "TEACHER": "some/id, zero-shot",
    "STUDENT": "other/id, zero-shot",
    "TEACHER_PEFT": "some/id + LoRA r=8 alpha=16 on the references",
    "STUDENT_PEFT": "other/id + all weights on the references",
    "HLKD": "labels from the base teacher, 4 candidate(s), selection=mbr, beams=1, sample=True, mix_references=0.25",
    "SLKD": "finetuned teacher, loss=0.3*CE+0.7*T^2*jsd, T=1.0, beta=0.5, top-8 cache",
    "GKD": "on-policy lambda=0.25, jsd, T=1.0",
}


@pytest.mark.parametrize("name", list(PRETRAINED))
def test_describe_system_pretrained(name):
    cfg = load_config(
        None,
        [
            "teacher.model=some/id",
            "student.model=other/id",
            "teacher.lora={enabled: true, r: 8, alpha: 16}",
            "hard_kd={teacher: base, num_candidates: 4, selection: mbr, mix_references: 0.25}",
            "hard_kd.decoding.do_sample=true",
            "soft_kd={alpha: 0.3, temperature: 1.0, divergence: jsd, cache: true, cache_k: 8}",
            "gkd.lmbda=0.25",
        ],
    )
    assert describe_system(cfg, name) == PRETRAINED[name]


def test_describe_system_kd_details():
    cfg = load_config(None, ["soft_kd.divergence=skew_kl", "soft_kd.beta=0.1", "soft_kd.alpha=0.25"])
    assert describe_system(cfg, "SLKD") == "finetuned teacher, loss=0.25*CE+0.75*T^2*skew_kl, T=2.0, beta=0.1"
    cfg = load_config(None, ["soft_kd.divergence=tvd"])
    assert describe_system(cfg, "SLKD") == "finetuned teacher, loss=0.1*CE+0.9*T^2*tvd, T=2.0"
    with pytest.raises(DistillmtError, match=r"unknown system 'XKD'"):
        describe_system(cfg, "XKD")
