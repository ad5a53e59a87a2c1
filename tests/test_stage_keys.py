"""The default experiment's stage keys are those its earlier releases computed: a release that changes one makes every
user's finished default run retrain from that stage on. The keys below are those of 0.2 (data, tokenizer and the
teacher's and student's fine-tuning unchanged since 0.1, docs/results/default-cpu)."""

import pytest
from conftest import planned_keys

from distillmt.config import load_config

pytestmark = pytest.mark.unit

DEFAULT_KEYS = {
    "data": "74dadd13e1cdcb6f",
    "tokenizer": "1d518d317d9c32ff",
    "train_teacher": "bb7764b7328d976d",
    "train_student": "d3366ebe08e19544",
    "teacher_labels": "6c98bcf3cebd11fa",
    "train_hlkd": "54a79696a914642f",
    "train_slkd": "56964c437a7248ae",
    "translate_TEACHER": "65ae70a02e16c605",
    "evaluate_TEACHER": "d7ccd2b9fbc3c57f",
    "translate_STUDENT": "693b33a868b68eb1",
    "evaluate_STUDENT": "ca1c99452fdae32d",
    "translate_HLKD": "e7d597ceef947628",
    "evaluate_HLKD": "017cb64179288078",
    "translate_SLKD": "40a4f26623b4c319",
    "evaluate_SLKD": "43c2060e9b432137",
    "significance": "a04337e1c80e5dac",
}


def test_the_default_experiment_keeps_its_stage_keys(tmp_path):
    assert planned_keys(load_config(None, [f"output_dir={tmp_path}"])) == DEFAULT_KEYS
