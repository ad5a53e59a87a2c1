"""Plots of a run folder and a sweep folder, and `distillmt report DIR`: fast and offline, on results.json,
results.csv and metrics.jsonl files built by hand (no training)."""

from __future__ import annotations

import copy
import json
import math

import pytest
from conftest import two_rows, with_significance

import distillmt.plots
from distillmt.cli import main
from distillmt.metrics import METRICS, Metric
from distillmt.plots import (
    bars_plot,
    grid_lines_plot,
    heatmap_plot,
    key_lines_plot,
    line_labels,
    log_scale,
    save_plot,
    score_plot,
    training_plot,
)
from distillmt.report import rewrite_run_report, write_report
from distillmt.sweep import Point, Sweep, _csv, load_sweep, rewrite_sweep_report, write_sweep_report

pytestmark = pytest.mark.unit

PNG = b"\x89PNG\r\n\x1a\n"


def _png(path) -> bool:
    return path.read_bytes()[:8] == PNG


def _labelled(plot) -> None:
    """Every panel has a title, axis labels and a legend (a heat map's legend is its labelled colour bar)."""
    fig = plot.figure
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert panels
    for ax in panels:
        assert ax.get_title() or fig.get_suptitle()
        assert ax.get_xlabel() and ax.get_ylabel()
        assert ax.get_legend() is not None or fig.legends or ax.images
    colorbars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert all(ax.get_ylabel() for ax in colorbars)
    assert plot.caption and "\n" not in plot.caption


# --- one run ----------------------------------------------------------------------------------------------------------


def _metrics(folder, *, kd: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(10, 110, 10):
        record = {"step": step, "loss": 2 + 5 * math.exp(-step / 40), "ce": 2.1 + 5 * math.exp(-step / 40)}
        record.update(lr=1e-3, tokens_per_s=900.0, on_policy=False)
        if kd:
            record.update(kd=0.1 + math.exp(-step / 50), forward_kl=0.2 + math.exp(-step / 50))
        if step % 50 == 0:
            record["valid_ce"] = 2.5 + 5 * math.exp(-step / 40)
        lines.append(json.dumps(record))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 11', encoding="utf-8")  # a cut-off line


def run_folder(tmp_path, report=None):
    root = tmp_path / "run"
    report = copy.deepcopy(report or with_significance())
    report["stages"] = {
        "data": {"seconds": 1.0},
        "train_teacher": {"seconds": 3.0},
        "train_slkd": {"seconds": 5.0},
        "evaluate_TEACHER": {"seconds": 1.0},
    }
    report["config"] = {"soft_kd": {"divergence": "jsd", "alpha": 0.5, "temperature": 2.0}}
    _metrics(root / "train_teacher", kd=False)
    _metrics(root / "train_slkd", kd=True)
    for stage in ("train_teacher", "train_slkd"):
        (root / stage / "stage.json").write_text("{}", encoding="utf-8")  # finished
    return root, report


def test_run_report_writes_every_plot_and_embeds_it(tmp_path):
    root, report = run_folder(tmp_path)
    assert write_report(root, report) == root / "results.md"
    names = ["scores_bertscore", "scores_chrf", "scores_bleu", "training_train_teacher", "training_train_slkd"]
    assert sorted(p.name for p in (root / "plots").iterdir()) == sorted(f"{n}.png" for n in names)
    assert all(_png(root / "plots" / f"{n}.png") for n in names)
    text = (root / "results.md").read_text(encoding="utf-8")
    for n in names:
        line = f"![{n}](plots/{n}.png)\n\n*"
        assert line in text  # the image, then its one-line caption
    assert text.index("## Plots") < text.index("## Metric signatures")
    assert json.loads((root / "results.json").read_text())["name"] == "default"


def test_score_plot_bars_ci_and_baseline(tmp_path):
    plot = score_plot(with_significance(), "chrf")
    _labelled(plot)
    ax = plot.figure.axes[0]
    assert ax.get_ylabel() == "chrF (0–100)" and ax.get_xlabel() == "system"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["TEACHER", "STUDENT", "HLKD"]
    bars = ax.patches
    assert [round(b.get_height(), 4) for b in bars] == [9.8012, 5.2849, 5.4012]
    assert [b.get_hatch() for b in bars] == [None, "//", None]  # the baseline is marked
    legend = [t.get_text() for t in plot.figure.legends[0].get_texts()]
    assert legend == ["system", "baseline (STUDENT)", "95% CI"]
    assert "95% CI from paired bootstrap resampling, 1,000 resamples" in plot.caption
    assert "hatched: the baseline STUDENT, † = differs from it at p < 0.05" in plot.caption
    assert "no CI" not in plot.caption
    assert _png(save_plot(plot, tmp_path))
    assert score_plot(with_significance(), "comet") is None  # not a metric of this report


def test_score_plot_rows_without_ci_get_no_error_bar_and_the_caption_says_so():
    report = with_significance()
    del report["significance"]["systems"]["HLKD"]["chrf"]
    plot = score_plot(report, "chrf")
    assert "no CI for HLKD (not tested), so no error bar there" in plot.caption
    (errorbar,) = plot.figure.axes[0].containers[1:]  # bars, then the error bars
    assert len(errorbar.lines[2][0].get_segments()) == 2  # TEACHER and STUDENT only
    plain = score_plot(two_rows(), "bertscore")  # no significance test; STUDENT did not measure BERTScore
    assert [t.get_text() for t in plain.figure.axes[0].get_xticklabels()] == ["TEACHER"]
    assert "no error bars: no CIs were computed" in plain.caption
    report = two_rows()
    report["significance"] = {"skipped": "eval.baseline=none"}
    assert "no error bars: no significance test (eval.baseline=none)" in score_plot(report, "chrf").caption


def test_training_plot_lines_per_stage(tmp_path):
    root, report = run_folder(tmp_path)
    kd = training_plot(root, report, "train_slkd")
    _labelled(kd)
    ax = kd.figure.axes[0]
    assert ax.get_xlabel() == "optimizer step" and ax.get_ylabel() == "loss (nats/token)"
    assert line_labels(ax) == [
        "training loss: α·CE + (1−α)·T²·D",
        "training CE",
        "KD term D = jsd (before T²)",
        "forward KL(teacher‖student)",
        "validation CE",
    ]
    assert list(ax.get_lines()[0].get_xdata()) == list(range(10, 110, 10))  # the cut-off line is dropped
    assert "its CE and KD term D = jsd" in kd.caption
    plain = training_plot(root, report, "train_teacher")
    assert line_labels(plain.figure.axes[0]) == ["training loss (CE)", "validation CE"]
    assert "KD" not in plain.caption
    report["config"]["soft_kd"]["divergence"] = "forward_kl"
    assert "forward KL(teacher‖student)" not in line_labels(training_plot(root, report, "train_slkd").figure.axes[0])
    assert training_plot(root, report, "train_hlkd") is None  # no metrics.jsonl
    assert "not finished" not in kd.caption
    (root / "train_slkd" / "stage.json").unlink()  # a stage stopped part-way: its curves, and the caption says so
    assert "; not finished (stopped at step " in training_plot(root, report, "train_slkd").caption
    assert _png(save_plot(kd, tmp_path))


def test_a_failing_plot_costs_only_that_plot_and_stale_plots_go(tmp_path, monkeypatch):
    root, report = run_folder(tmp_path)
    (root / "plots").mkdir(parents=True)
    (root / "plots" / "scores_comet.png").write_bytes(PNG)  # from an older report

    def broken(report, key):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(distillmt.plots, "score_plot", broken)
    write_report(root, report)
    text = (root / "results.md").read_text(encoding="utf-8")
    assert "| TEACHER |" in text and "Plot scores_chrf not drawn: RuntimeError: no fonts." in text
    assert "![training_train_slkd](plots/training_train_slkd.png)" in text
    assert sorted(p.name for p in (root / "plots").iterdir()) == [
        "training_train_slkd.png",
        "training_train_teacher.png",
    ]


def _add_comet(report):
    """A metric the code has never heard of, as a new metric function in distillmt.metrics would write it."""
    for value, row in zip((0.81234, 0.70111, 0.75022), report["systems"].values(), strict=True):
        entry = {"name": "COMET", "score": value, "signature": "wmt22-comet-da", "columns": {"COMET": value}}
        row["scores"]["comet"] = {**entry, "decimals": 3}
    return report


def test_a_new_metric_entry_gets_its_column_signature_and_plot_without_code_changes(tmp_path):
    root, report = run_folder(tmp_path)
    write_report(root, _add_comet(report))
    text = (root / "results.md").read_text(encoding="utf-8")
    assert text.splitlines()[4].startswith(
        "| system | BERTScore P | BERTScore R | BERTScore F1 | chrF | BLEU | COMET |"
    )
    assert "| TEACHER | 0.7703 |" in text and " | 0.812 | " in text
    assert "- COMET: `wmt22-comet-da`\n" in text
    assert (
        "![scores_comet](plots/scores_comet.png)\n\n*COMET of each system, no error bars: no CIs were computed" in text
    )
    assert _png(root / "plots" / "scores_comet.png")
    ax = score_plot(report, "comet").figure.axes[0]
    assert ax.get_ylabel() == "COMET"  # its score column: no range is declared for it
    assert [t.get_text() for t in ax.texts] == ["0.812", "0.701", "0.750"]


def test_a_metric_declared_in_metrics_reaches_the_sweep_report_and_its_axis(tmp_path, monkeypatch):
    monkeypatch.setitem(METRICS, "comet", Metric("comet", "COMET", "COMET", decimals=3, scale="0–1"))
    assert score_plot(_add_comet(with_significance()), "comet").figure.axes[0].get_ylabel() == "COMET (0–1)"
    path = tmp_path / "sweep.yaml"
    path.write_text("name: s\ngrid: {soft_kd.temperature: [1.0, 2.0]}\nplot_metric: comet\n", encoding="utf-8")
    assert load_sweep(path).plot_metric == "comet"
    sweep = size_sweep(seeds=(0,))
    sweep.plot_metric = "comet"
    rows = _rows(sweep, size_score)
    for row in rows:
        row["comet"] = row["chrf"] / 100
    write_sweep_report(sweep, tmp_path / "s", rows, command=None, runs=(3, 3))
    text = (tmp_path / "s" / "report.md").read_text(encoding="utf-8")
    assert "| point | data.train_size | system | chrf | bleu | comet | seeds |" in text
    assert "| p00_train_size=2000 | 2000 | STUDENT | 7.30† (6.90–7.80) | 3.65 | 0.073 | 1 |" in text
    assert "![comet_lines](comet_lines.png)\n\n*COMET against data.train_size (log-scale axis)" in text
    plot = key_lines_plot(sweep, rows)
    assert plot.figure.axes[0].get_ylabel() == "COMET (0–1)" and plot.name == "comet_lines.png"


def test_log_scale_past_a_factor_of_ten():
    assert log_scale([2000, 5000, 10000, 40000])
    assert not log_scale([0.5, 1.0, 2.0]) and not log_scale([1, 10]) and not log_scale([0, 100]) and not log_scale([])


# --- sweeps -----------------------------------------------------------------------------------------------------------


def _rows(sweep: Sweep, score, systems=("STUDENT", "SLKD"), ci=True):
    rows = []
    for point in sweep.points:
        for seed in sweep.seeds:
            for system in systems:
                value = score(point.settings, seed, system)
                row = {"point": point.name, "seed": seed, **{k: point.settings.get(k) for k in sweep.varied}}
                row.update(system=system, chrf=value, bleu=value / 2)
                if ci:
                    row.update(chrf_ci_low=value - 0.4, chrf_ci_high=value + 0.5, chrf_p_value=0.01)
                rows.append(row)
    return rows


def grid_sweep(seeds=(0, 1)) -> Sweep:
    points = [
        Point(f"p{i:02d}_temperature={t}_alpha={a}", {"soft_kd.temperature": t, "soft_kd.alpha": a})
        for i, (t, a) in enumerate((t, a) for t in (1.0, 2.0, 4.0) for a in (0.1, 0.5, 0.9))
    ]
    return Sweep("temperature-alpha", None, ["systems=[STUDENT,SLKD]"], points, list(seeds), "chrf", [
        "soft_kd.temperature", "soft_kd.alpha",
    ])  # fmt: skip


def grid_score(settings, seed, system):
    if system == "STUDENT":
        return 5.0
    return 6.0 + settings["soft_kd.temperature"] - 2 * settings["soft_kd.alpha"] + 0.3 * seed


def size_sweep(seeds=(0, 1)) -> Sweep:
    points = [Point(f"p{i:02d}_train_size={n}", {"data.train_size": n}) for i, n in enumerate((2000, 5000, 40000))]
    return Sweep("data-size", None, [], points, list(seeds), "chrf", ["data.train_size"])


def size_score(settings, seed, system):
    return {"STUDENT": 4.0, "HLKD": 6.0, "SLKD": 7.0}[system] + math.log10(settings["data.train_size"]) + 0.2 * seed


def test_grid_lines_one_line_per_second_key_value_for_each_kd_system():
    sweep = grid_sweep()
    plot = grid_lines_plot(sweep, _rows(sweep, grid_score))
    _labelled(plot)
    (ax,) = plot.figure.axes  # STUDENT is not a KD row and does not change: only SLKD has a panel
    assert ax.get_title() == "SLKD"
    assert line_labels(ax) == ["soft_kd.alpha = 0.1", "soft_kd.alpha = 0.5", "soft_kd.alpha = 0.9"]
    assert ax.get_xlabel() == "soft_kd.temperature (softmax T)" and ax.get_ylabel() == "chrF (0–100)"
    assert list(ax.get_lines()[0].get_xdata()) == [1.0, 2.0, 4.0]  # linear: 4 / 1 is no factor of 10
    assert list(ax.get_lines()[0].get_ydata()) == pytest.approx([6.95, 7.95, 9.95])  # mean over the two seeds
    assert len(ax.collections) == 3  # a band per line
    assert "band: ± 1 s.d. over seeds" in [t.get_text() for t in ax.get_legend().get_texts()]
    assert "one line per value of soft_kd.alpha, for SLKD; bands: ± one standard deviation" in plot.caption
    heat = heatmap_plot(sweep, _rows(sweep, grid_score))
    _labelled(heat)
    assert heat.figure.axes[0].images[0].get_array().shape == (3, 3)


def test_key_lines_per_system_with_bands_and_log_axis():
    sweep = size_sweep()
    plot = key_lines_plot(sweep, _rows(sweep, size_score, ("STUDENT", "HLKD", "SLKD")))
    _labelled(plot)
    ax = plot.figure.axes[0]
    assert line_labels(ax) == ["STUDENT", "HLKD", "SLKD"]
    assert ax.get_xscale() == "log" and ax.get_xlabel() == "data.train_size (training pairs) (log scale)"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["2,000", "5,000", "40,000"]
    assert len(ax.collections) == 3
    assert "band: ± 1 s.d. over seeds" in [t.get_text() for t in ax.get_legend().get_texts()]
    one_seed = size_sweep(seeds=(0,))
    plot = key_lines_plot(one_seed, _rows(one_seed, size_score))
    assert "band: 95% CI (one seed)" in [t.get_text() for t in plot.figure.axes[0].get_legend().get_texts()]
    assert "bands: the 95% CI of the run's paired bootstrap test (one seed)" in plot.caption
    no_ci = key_lines_plot(one_seed, _rows(one_seed, size_score, ci=False))
    assert len(no_ci.figure.axes[0].collections) == 0 and "no bands: one seed and no CI" in no_ci.caption
    assert "band:" not in " ".join(t.get_text() for t in no_ci.figure.axes[0].get_legend().get_texts())
    partial = _rows(one_seed, size_score, ("STUDENT", "SLKD"))
    for row in partial:
        if row["system"] == "STUDENT":  # the baseline row of a run without significance data, say
            del row["chrf_ci_low"], row["chrf_ci_high"]
    assert "; none for STUDENT" in key_lines_plot(one_seed, partial).caption


def test_bars_for_points_that_are_no_grid():
    points = [
        Point("p00_divergence=forward_kl", {"soft_kd.divergence": "forward_kl"}),
        Point("p01_divergence=jsd_beta=0.5", {"soft_kd.divergence": "jsd", "soft_kd.beta": 0.5}),
        Point("p02_divergence=tvd", {"soft_kd.divergence": "tvd"}),
    ]
    sweep = Sweep("divergence", None, [], points, [0, 1], "chrf", ["soft_kd.divergence", "soft_kd.beta"])
    plot = bars_plot(sweep, _rows(sweep, lambda s, seed, system: 5.0 + seed + len(s)))
    _labelled(plot)
    ax = plot.figure.axes[0]
    assert len(ax.patches) == 6 and [t.get_text() for t in ax.get_xticklabels()] == [p.name for p in points]
    assert [t.get_text() for t in plot.figure.legends[0].get_texts()] == [
        "STUDENT",
        "SLKD",
        "error bar: ± 1 s.d. over seeds",
    ]
    assert grid_lines_plot(sweep, _rows(sweep, lambda *a: 5.0)) is None  # two keys, but no full grid


@pytest.mark.parametrize(
    ("sweep", "score", "names"),
    [
        (grid_sweep(), grid_score, ["chrf_lines", "chrf_heatmap"]),
        (size_sweep(), size_score, ["chrf_lines"]),
        (Sweep("one", None, [], [Point("p00_x=a", {"x": "a"}), Point("p01_x=b", {"x": "b"})], [0], "chrf", ["x"]),
         lambda *a: 5.0, ["chrf_bars"]),
    ],
)  # fmt: skip
def test_sweep_report_embeds_its_plots_and_writes_sweep_json(tmp_path, sweep, score, names):
    root = tmp_path / sweep.name
    rows = _rows(sweep, score)
    write_sweep_report(sweep, root, rows, command="distillmt sweep x.yaml", runs=(1, 2))
    text = (root / "report.md").read_text(encoding="utf-8")
    for name in names:
        assert _png(root / f"{name}.png")
        assert f"![{name}]({name}.png)\n\n*" in text
    spec = json.loads((root / "sweep.json").read_text())
    assert spec["points"][0] == {"name": sweep.points[0].name, "settings": sweep.points[0].settings}
    assert spec["varied"] == sweep.varied and spec["plot_metric"] == "chrf" and spec["seeds"] == sweep.seeds
    assert spec["command"] == "distillmt sweep x.yaml"


# --- distillmt report DIR ---------------------------------------------------------------------------------------------


def test_cli_report_on_a_run_folder(tmp_path, capsys):
    root, report = run_folder(tmp_path)
    (root / "results.json").write_text(json.dumps(report), encoding="utf-8")
    assert main(["report", str(root)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"report: {root / 'results.md'}  (plots: plots/scores_bertscore.png, ")
    assert _png(root / "plots" / "training_train_slkd.png")
    assert "![scores_chrf](plots/scores_chrf.png)" in (root / "results.md").read_text(encoding="utf-8")
    assert rewrite_run_report(root) == root / "results.md"


def test_cli_report_on_a_sweep_folder_with_and_without_sweep_json(tmp_path, capsys):
    sweep = grid_sweep()
    root = tmp_path / sweep.name
    write_sweep_report(sweep, root, _rows(sweep, grid_score), command="distillmt sweep t.yaml", runs=(18, 18))
    csv_before = (root / "results.csv").read_text()
    for name in ("report.md", "chrf_lines.png", "chrf_heatmap.png"):
        (root / name).unlink()
    assert main(["report", str(root)]) == 0
    assert "chrf_lines.png, chrf_heatmap.png" in capsys.readouterr().out
    text = (root / "report.md").read_text(encoding="utf-8")
    assert "Command: `distillmt sweep t.yaml`" in text and "Runs finished: 18 of 18." in text
    assert "| p00_temperature=1.0_alpha=0.1 | 1.0 | 0.1 | SLKD | 6.95 ± 0.21† |" in text
    assert _png(root / "chrf_lines.png") and _png(root / "chrf_heatmap.png")
    assert (root / "results.csv").read_text() == csv_before  # the CSV is read, never rewritten
    (root / "sweep.json").unlink()  # the spec cannot be guessed from the CSV: one line saying what to do
    assert main(["report", str(root)]) == 2
    assert "has results.csv but no sweep.json" in capsys.readouterr().err


def test_cli_report_on_another_folder_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for target, message in [
        (tmp_path / "empty", "is neither a run folder (no results.json) nor a sweep folder (no results.csv)"),
        (tmp_path / "missing", "folder not found"),
    ]:
        assert main(["report", str(target)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("distillmt: error: ") and message in err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "results.json").write_text("{", encoding="utf-8")
    assert main(["report", str(tmp_path / "bad")]) == 2
    assert "results.json: invalid JSON" in capsys.readouterr().err
    (tmp_path / "bad" / "results.json").write_text("{}", encoding="utf-8")
    assert main(["report", str(tmp_path / "bad")]) == 2
    assert "lacks name, systems, stages" in capsys.readouterr().err


def test_plots_of_an_earlier_state_of_the_sweep_are_removed(tmp_path):
    sweep = size_sweep()
    rows = _rows(sweep, size_score)
    first = [r for r in rows if r["point"] == sweep.points[0].name]  # one point finished: nothing to draw a line of
    write_sweep_report(sweep, tmp_path, first, command=None, runs=(2, 6))
    assert _png(tmp_path / "chrf_bars.png")
    (tmp_path / "notes.png").write_bytes(PNG)  # not the report's: kept
    write_sweep_report(sweep, tmp_path, rows, command=None, runs=(6, 6))
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["chrf_lines.png", "notes.png"]


def test_csv_roundtrip_keeps_the_report_table(tmp_path):
    sweep = size_sweep()
    rows = _rows(sweep, size_score)
    root = tmp_path / "s"
    write_sweep_report(sweep, root, rows, command=None, runs=(6, 6))
    assert (root / "results.csv").read_text() == _csv(rows)
    before = (root / "report.md").read_text().rsplit("Updated", 1)[0]
    rewrite_sweep_report(root)
    assert (root / "report.md").read_text().rsplit("Updated", 1)[0] == before
