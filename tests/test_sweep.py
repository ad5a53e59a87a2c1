"""Sweeps on micro models: points share every stage whose key they share, a rerun skips finished points, an
interrupted sweep resumes, and the report has a table, results.csv and a plot."""

from __future__ import annotations

import csv
import json

import pytest
import yaml
from conftest import MICRO

import distillmt.pipeline
from distillmt.errors import DistillmtError
from distillmt.sweep import load_sweep, run_sweep


def sweep_file(tmp_path, **extra) -> str:
    spec = {
        "name": "temp",
        "overrides": [*MICRO, "systems=[STUDENT,SLKD]", f"output_dir={tmp_path / 'runs'}"],
        "grid": {"soft_kd.temperature": [1.0, 2.0]},
        "seeds": [0],
        **extra,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return str(path)


def test_sweep_shares_stages_between_points_and_reports(tmp_path):
    sweep = load_sweep(sweep_file(tmp_path))
    assert [p.name for p in sweep.points] == ["p00_temperature=1.0", "p01_temperature=2.0"]
    rows = run_sweep(sweep, progress=False)
    root = tmp_path / "runs" / "temp"
    store = sorted(p.name.rsplit("-", 1)[0] for p in (root.parent / "stages").iterdir())
    # data, tokenizer, the teacher and the student are computed once; each point has its own SLKD
    assert store.count("data") == 1 and store.count("train_teacher") == 1 and store.count("train_student") == 1
    assert store.count("train_slkd") == 2 and store.count("translate_STUDENT") == 1
    assert (root / "p01_temperature=2.0-seed0" / "train_slkd").is_symlink()
    table = list(csv.DictReader((root / "results.csv").open()))
    assert len(table) == len(rows) == 4
    assert {r["system"] for r in table} == {"STUDENT", "SLKD"}
    assert {r["soft_kd.temperature"] for r in table} == {"1.0", "2.0"}
    assert all(float(r["chrf"]) >= 0 for r in table)
    assert all(float(r["chrf_ci_low"]) <= float(r["chrf"]) <= float(r["chrf_ci_high"]) for r in table)
    assert {r["chrf_p_value"] for r in table if r["system"] == "STUDENT"} == {""}  # the baseline row
    student = [r for r in table if r["system"] == "STUDENT"]
    assert student[0]["chrf"] == student[1]["chrf"]  # the same shared stages, the same score
    report = (root / "report.md").read_text()
    assert "| p00_temperature=1.0 | 1.0 | SLKD |" in report and "![chrf_lines](chrf_lines.png)" in report
    assert (root / "chrf_lines.png").read_bytes()[:4] == b"\x89PNG"
    assert not (root / "chrf_bars.png").exists()  # drawn while one point was done, gone with the line plot
    spec = json.loads((root / "sweep.json").read_text())
    assert [p["name"] for p in spec["points"]] == [p.name for p in sweep.points]
    assert spec["varied"] == ["soft_kd.temperature"] and spec["seeds"] == [0] and spec["plot_metric"] == "chrf"


def test_rerun_skips_finished_points_and_interrupted_sweep_resumes(tmp_path, monkeypatch):
    path = sweep_file(tmp_path)
    real = distillmt.pipeline.run_experiment
    calls = {"n": 0}

    def dies_on_second_run(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(distillmt.pipeline, "run_experiment", dies_on_second_run)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(load_sweep(path), progress=False)
    root = tmp_path / "runs" / "temp"
    assert len(list(csv.DictReader((root / "results.csv").open()))) == 2  # what finished is already reported
    monkeypatch.setattr(distillmt.pipeline, "run_experiment", real)
    reports = []
    monkeypatch.setattr(
        distillmt.pipeline, "run_experiment", lambda *a, **k: reports.append(real(*a, **k)) or reports[-1]
    )
    run_sweep(load_sweep(path), progress=False)
    assert all(t["skipped"] for t in reports[0]["stages"].values())  # the first point was finished
    assert not reports[1]["stages"]["train_slkd"]["skipped"]
    reports.clear()
    run_sweep(load_sweep(path), progress=False)
    assert all(t["skipped"] for r in reports for t in r["stages"].values())


@pytest.mark.unit
def test_bad_sweep_files_name_the_file_and_point(tmp_path):
    with pytest.raises(DistillmtError, match=r"sweep.yaml: point 1 \(p01_temperature=-1\): config key 'soft_kd.temp"):
        load_sweep(sweep_file(tmp_path, grid={"soft_kd.temperature": [1.0, -1]}))
    with pytest.raises(DistillmtError, match="unknown sweep key 'grids'"):
        load_sweep(sweep_file(tmp_path, grids={}))
    with pytest.raises(DistillmtError, match="needs a 'grid' or a list of 'points'"):
        load_sweep(sweep_file(tmp_path, grid={}))
    with pytest.raises(DistillmtError, match="'seeds' must be"):
        load_sweep(sweep_file(tmp_path, seeds=[]))
    with pytest.raises(DistillmtError, match="unknown config key 'soft_kd.temprature'"):
        load_sweep(sweep_file(tmp_path, grid={}, points=[{"soft_kd.temprature": 1}]))


@pytest.mark.unit
@pytest.mark.parametrize("path", sorted(__import__("pathlib").Path("configs/sweeps").glob("*.yaml")))
def test_shipped_sweep_files_are_valid(path):
    sweep = load_sweep(path)
    header = path.read_text().split("\nname:")[0]
    assert f"# distillmt sweep {path}\n" in header  # each file starts with the command that runs it
    assert sweep.points and json.dumps([p.settings for p in sweep.points])


@pytest.mark.unit
def test_summary_table_marks_significance_per_seed_and_shows_ci_for_one_seed():
    from distillmt.sweep import Point, Sweep, summary_table

    sweep = Sweep("s", None, [], [Point("p00_T=1", {"soft_kd.temperature": 1})], [0, 1], "chrf", [])
    two = [
        {"point": "p00_T=1", "seed": s, "system": "SLKD", "chrf": 8.0 + s, "chrf_p_value": p}
        for s, p in ((0, 0.01), (1, 0.2))
    ]
    assert "| p00_T=1 | SLKD | 8.50 ± 0.71†1/2 | 2 |" in summary_table(sweep, two)
    one = [{"point": "p00_T=1", "seed": 0, "system": "SLKD", "chrf": 8.0, "chrf_ci_low": 7.1, "chrf_ci_high": 8.9}]
    one[0]["chrf_p_value"] = 0.001
    assert "| p00_T=1 | SLKD | 8.00† (7.10–8.90) | 1 |" in summary_table(sweep, one)


@pytest.mark.unit
def test_winner_is_tested_against_the_runner_up_seed_by_seed(tmp_path):
    from distillmt.sweep import Point, Sweep, winners

    refs = [f"这是第{i}个很长的测试句子。" for i in range(40)]
    outputs = {"p00_T=1": refs[:36] + ["错"] * 4, "p01_T=2": ["错误"] * 40}  # the first point is much better
    sweep = Sweep("s", None, [], [Point(p, {"soft_kd.temperature": i + 1}) for i, p in enumerate(outputs)], [0], "chrf")
    rows = []
    for point, hyps in outputs.items():
        folder = tmp_path / f"{point}-seed0" / "translate_SLKD"
        folder.mkdir(parents=True)
        folder.joinpath("translations.jsonl").write_text(
            "".join(
                json.dumps({"src": "x", "ref": r, "hyp": h}, ensure_ascii=False) + "\n"
                for r, h in zip(refs, hyps, strict=True)
            )
        )
        score = 90.0 if point == "p00_T=1" else 1.0
        rows += [{"point": point, "seed": 0, "system": "SLKD", "chrf": score},
                 {"point": point, "seed": 0, "system": "STUDENT", "chrf": 0.5}]  # fmt: skip
    (line,) = winners(sweep, tmp_path, rows)  # STUDENT does not change between points: no line for it
    assert line.startswith("- **SLKD**: best p00_T=1 (90.00), runner-up p01_T=2 (1.00), +89.00 chrf")
    assert "seed 0: p = 0.0010" in line and "(significant in every seed)" in line
