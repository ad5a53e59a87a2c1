"""The whole pipeline on a few dozen pairs with micro models: every stage runs, reruns skip finished stages, an
interrupted run continues without redoing them, and a changed setting reruns only what depends on it."""

import json
from pathlib import Path

import pytest
from conftest import micro_cfg

from distillmt.errors import DistillmtError
from distillmt.io import read_json, read_jsonl
from distillmt.pipeline import Experiment, run_experiment


def stage_keys(root: Path) -> dict[str, str]:
    return {p.parent.name: read_json(p)["key"] for p in root.glob("*/stage.json")}


def test_full_pipeline_then_rerun_skips_everything(tmp_path):
    cfg = micro_cfg(tmp_path)
    report = run_experiment(cfg, progress=False)
    root = tmp_path / "micro"
    assert list(report["systems"]) == ["TEACHER", "STUDENT", "HLKD", "SLKD", "GKD"]
    for name, row in report["systems"].items():
        assert 0.0 <= row["scores"]["chrf"]["score"] <= 100.0
        assert "tok:zh" in row["scores"]["bleu"]["signature"]
        assert "bertscore" not in row["scores"]  # eval.bertscore=false in MICRO: not computed, not reported
        lines = (root / f"translate_{name}" / "translations.jsonl").read_text().splitlines()
        assert len(lines) == 6 and {"src", "ref", "hyp"} <= set(json.loads(lines[0]))
    assert (root / "results.md").read_text().startswith("# distillmt results")
    assert json.loads((root / "results.json").read_text())["systems"]["SLKD"]["settings"].startswith("finetuned")
    # every student row has the same parameter count (same budget, same architecture)
    params = {k: v["translation"]["parameters"] for k, v in report["systems"].items()}
    assert params["STUDENT"] < params["TEACHER"]
    assert params["STUDENT"] == params["HLKD"] == params["SLKD"] == params["GKD"]
    # labels were written as shards named by their content hash
    assert len(list((root / "teacher_labels").glob("shard-*.jsonl"))) == 3

    again = run_experiment(cfg, progress=False)
    assert all(t["skipped"] for t in again["stages"].values())
    assert again["systems"]["SLKD"]["scores"] == report["systems"]["SLKD"]["scores"]


def test_interrupted_run_continues_without_redoing_finished_stages(tmp_path, monkeypatch):
    cfg = micro_cfg(tmp_path, "systems=[TEACHER,STUDENT,HLKD]")
    calls = {"n": 0}
    real = Experiment.stage_translate

    def interrupted(self, system):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, system)

    monkeypatch.setattr(Experiment, "stage_translate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, progress=False)
    root = tmp_path / "micro"
    finished = {p.parent.name for p in root.glob("*/stage.json")}
    assert {"data", "tokenizer", "train_teacher", "train_student", "teacher_labels", "train_hlkd"} <= finished
    mtimes = {name: (root / name / "stage.json").stat().st_mtime_ns for name in finished}
    monkeypatch.setattr(Experiment, "stage_translate", real)
    report = run_experiment(cfg, progress=False)
    assert {name for name, t in report["stages"].items() if t["skipped"]} == finished
    assert all((root / name / "stage.json").stat().st_mtime_ns == m for name, m in mtimes.items())
    assert set(report["systems"]) == {"TEACHER", "STUDENT", "HLKD"}


def test_changed_setting_reruns_only_dependent_stages(tmp_path):
    cfg = micro_cfg(tmp_path, "systems=[TEACHER,STUDENT,SLKD]")
    run_experiment(cfg, progress=False)
    before = stage_keys(tmp_path / "micro")
    report = run_experiment(
        micro_cfg(tmp_path, "systems=[TEACHER,STUDENT,SLKD]", "soft_kd.temperature=1.0"), progress=False
    )
    after = stage_keys(tmp_path / "micro")
    rerun = {name for name, t in report["stages"].items() if not t["skipped"]}
    assert rerun == {"train_slkd", "translate_SLKD", "evaluate_SLKD", "significance"}
    assert {k for k in before if before[k] != after[k]} == rerun


def test_sentence_scores_and_significance_follow_the_baseline(tmp_path):
    import sacrebleu

    report = run_experiment(micro_cfg(tmp_path, "systems=[TEACHER,STUDENT]"), progress=False)
    root = tmp_path / "micro"
    for name in ("TEACHER", "STUDENT"):
        translations = read_jsonl(root / f"translate_{name}" / "translations.jsonl")
        sentences = read_jsonl(root / f"evaluate_{name}" / "sentences.jsonl")
        assert len(sentences) == len(translations) == 6
        assert all(set(s) == {"chrF", "BLEU"} for s in sentences)  # eval.bertscore=false: no BERTScore columns
        for s, t in zip(sentences, translations, strict=True):
            assert s["chrF"] == sacrebleu.sentence_chrf(t["hyp"], [t["ref"]]).score
        assert "sentences" not in json.loads((root / f"evaluate_{name}" / "scores.json").read_text())["chrf"]
    sig = read_json(root / "significance" / "significance.json")
    assert sig["baseline"] == "STUDENT" and (sig["n_samples"], sig["seed"]) == (1000, 12345)
    assert report["significance"] == sig
    assert sig["systems"]["STUDENT"]["chrf"]["p_value"] is None
    teacher = sig["systems"]["TEACHER"]["chrf"]
    assert 0 < teacher["p_value"] <= 1 and teacher["significant"] == (teacher["p_value"] < 0.05)
    md = (root / "results.md").read_text()
    score = report["systems"]["TEACHER"]["scores"]["chrf"]["score"]
    mark = "†" if teacher["significant"] else ""
    assert f"| {score:.2f}{mark} ({teacher['ci_low']:.2f}–{teacher['ci_high']:.2f}) |" in md
    assert "| p vs STUDENT (chrF / BLEU) |" in md and "paired bootstrap resampling, 1,000 resamples, seed 12345" in md

    # another baseline reruns only the significance stage; eval.baseline=none or no baseline row skips it
    again = run_experiment(micro_cfg(tmp_path, "systems=[TEACHER,STUDENT]", "eval.baseline=TEACHER"), progress=False)
    assert {name for name, t in again["stages"].items() if not t["skipped"]} == {"significance"}
    assert read_json(root / "significance" / "significance.json")["baseline"] == "TEACHER"
    for extra, reason in [
        ("eval.baseline=none", "eval.baseline=none"),
        ("systems=[TEACHER]", "eval.baseline=auto: no STUDENT_PEFT or STUDENT row to test against (rows: TEACHER)"),
    ]:
        off = run_experiment(micro_cfg(tmp_path, "systems=[TEACHER,STUDENT]", extra), progress=False)
        assert "significance" not in off["stages"] and all(t["skipped"] for t in off["stages"].values())
        assert off["significance"] == {"skipped": reason}
        md = (root / "results.md").read_text()
        assert f"\nNo significance test: {reason}.\n" in md and "p vs" not in md and "–" not in md


def test_soft_kd_from_teacher_cache(tmp_path):
    cfg = micro_cfg(tmp_path, "systems=[TEACHER,SLKD]", "soft_kd.cache=true", "soft_kd.cache_k=8")
    report = run_experiment(cfg, progress=False)
    root = tmp_path / "micro"
    assert (root / "teacher_cache" / "manifest.json").exists()
    assert "top-8 cache" in report["systems"]["SLKD"]["settings"]
    logs = [json.loads(x) for x in (root / "train_slkd" / "metrics.jsonl").read_text().splitlines()]
    assert any("kd" in r for r in logs)


def test_teacher_label_shards_resume_and_follow_settings(tmp_path):
    cfg = micro_cfg(tmp_path, "systems=[TEACHER,HLKD]")
    run_experiment(cfg, progress=False)
    labels = tmp_path / "micro" / "teacher_labels"
    shards = sorted(labels.glob("shard-*.jsonl"))
    kept = {p.name: p.stat().st_mtime_ns for p in shards[:-1]}
    # a killed stage: no stage.json, the last shard missing
    (labels / "stage.json").unlink()
    shards[-1].unlink()
    run_experiment(cfg, progress=False)
    assert shards[-1].exists()
    assert {p.name: p.stat().st_mtime_ns for p in shards[:-1]} == kept  # finished shards were not regenerated
    # another decoding setting: every shard gets a new name (new hash) and is generated again
    run_experiment(micro_cfg(tmp_path, "systems=[TEACHER,HLKD]", "hard_kd.decoding.num_beams=2"), progress=False)
    assert not set(kept) & {p.name for p in labels.glob("shard-*.jsonl")}


def test_damaged_translations_or_model_file_reruns_that_stage(tmp_path):
    cfg = micro_cfg(tmp_path, "systems=[TEACHER,STUDENT]")
    first = run_experiment(cfg, progress=False)
    root = tmp_path / "micro"
    translations = root / "translate_STUDENT" / "translations.jsonl"
    translations.write_text("".join(translations.read_text().splitlines(keepends=True)[:3]))  # cut short
    weights = next((root / "train_teacher" / "model").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-100])
    again = run_experiment(cfg, progress=False)
    rerun = {name for name, t in again["stages"].items() if not t["skipped"]}
    assert rerun == {"train_teacher", "translate_STUDENT"}  # same bytes again, so nothing downstream reruns
    assert len(translations.read_text().splitlines()) == 6
    assert again["systems"]["STUDENT"]["scores"] == first["systems"]["STUDENT"]["scores"]
    assert again["systems"]["TEACHER"]["scores"] == first["systems"]["TEACHER"]["scores"]


def test_failing_rerun_with_changed_settings_leaves_old_outputs_and_report(tmp_path, monkeypatch):
    import distillmt.generate

    cfg = micro_cfg(tmp_path, "systems=[TEACHER,STUDENT]")
    run_experiment(cfg, progress=False)
    root = tmp_path / "micro"
    kept = {p: p.read_bytes() for p in [root / "results.md", root / "results.json", *root.glob("translate_*/*")]}

    def broken(*args, **kwargs):
        raise RuntimeError("generation failed")

    monkeypatch.setattr(distillmt.generate, "translate", broken)
    with pytest.raises(RuntimeError):
        run_experiment(micro_cfg(tmp_path, "systems=[TEACHER,STUDENT]", "generate.max_new_tokens=5"), progress=False)
    assert {p: p.read_bytes() for p in kept} == kept


@pytest.mark.unit
def test_missing_local_data_file_is_an_error_that_deletes_nothing(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    rows = [{"en": f"Sentence number {i}.", "zh": f"第{i}句。"} for i in range(60)]
    corpus.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    extra = ["systems=[STUDENT]", "data.source=jsonl", f"data.path={corpus}", "data.train_size=40"]
    run_experiment(micro_cfg(tmp_path, *extra), progress=False)
    root = tmp_path / "micro"
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    corpus.unlink()
    with pytest.raises(DistillmtError, match="data.path.*file not found"):
        run_experiment(micro_cfg(tmp_path, *extra), progress=False)
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before


def test_combined_sequence_and_word_level_kd_row(tmp_path):
    """HLKD+SLKD: soft-label KD on the teacher's labels. It reuses HLKD's label stage and runs the teacher live even
    when SLKD uses a logit cache (the cache holds the references' positions, not the labels')."""
    cfg = micro_cfg(tmp_path, "systems=[STUDENT,HLKD,SLKD,HLKD+SLKD]", "soft_kd.cache=true", "soft_kd.cache_k=8")
    report = run_experiment(cfg, progress=False)
    root = tmp_path / "micro"
    assert list(report["systems"]) == ["STUDENT", "HLKD", "SLKD", "HLKD+SLKD"]
    assert report["systems"]["HLKD+SLKD"]["settings"].startswith("labels from the finetuned teacher (as HLKD)")
    stage = read_json(root / "train_hlkd_slkd" / "stage.json")
    assert stage["settings"]["labels"] == read_json(root / "teacher_labels" / "stage.json")["key"]
    logs = [json.loads(x) for x in (root / "train_hlkd_slkd" / "metrics.jsonl").read_text().splitlines()]
    assert any("forward_kl" in r for r in logs)  # only the live teacher gives the true forward KL
    assert report["stages"]["teacher_labels"]["skipped"] is False and "teacher_labels" in report["stages"]
    assert (root / "translate_HLKD+SLKD" / "translations.jsonl").exists()


def test_extra_sources_are_labelled_by_the_teacher_and_trained_on(tmp_path):
    from distillmt.teacher_labels import read_label_pairs

    sources = tmp_path / "extra.txt"
    sources.write_text("One more sentence.\n\nAnother one.\nA third.\n", encoding="utf-8")
    cfg = micro_cfg(tmp_path, "systems=[STUDENT,HLKD]", "hard_kd.extra_sources=12", "hard_kd.mix_references=1.0")
    run_experiment(cfg, progress=False)
    labels = tmp_path / "micro" / "teacher_labels"
    rows = [r for p in sorted(labels.glob("shard-*.jsonl")) for r in read_jsonl(p)]
    assert len(rows) == 40 + 12 and sum(r["ref"] is None for r in rows) == 12
    split_text = {t for p in (tmp_path / "micro" / "data").glob("*.jsonl") for r in read_jsonl(p) for t in r.values()}
    assert not {r["src"] for r in rows[40:]} & split_text  # never a sentence of any split
    shards = read_json(labels / "stage.json")["result"]["shards"]
    pairs = read_label_pairs(labels, shards, 1.0, seed=0)
    assert [p.tgt for p in pairs[:40]] == [r["ref"] for r in rows[:40]]  # references kept where there are some
    assert [p.tgt for p in pairs[40:]] == [r["label"] for r in rows[40:]]  # teacher labels for the extra sources

    from_file = run_experiment(
        micro_cfg(tmp_path, "systems=[STUDENT,HLKD]", f"hard_kd.extra_sources_file={sources}"), progress=False
    )
    assert not from_file["stages"]["teacher_labels"]["skipped"]
    rows = [r for p in sorted(labels.glob("shard-*.jsonl")) for r in read_jsonl(p)]
    assert [r["src"] for r in rows[40:]] == ["One more sentence.", "Another one.", "A third."]
    with pytest.raises(DistillmtError, match="hard_kd.extra_sources_file': file not found"):
        run_experiment(micro_cfg(tmp_path, "hard_kd.extra_sources_file=/nonexistent.txt"), progress=False)
