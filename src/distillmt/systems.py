"""The rows of a results table, as one table of plain records.

A system is what gets translated and scored: a base model, or the model a training stage saved. Adding a KD method
starts here: give it a row, a training stage in ``pipeline.py`` that produces ``<stage>/model``, and a description
in ``report.describe_system``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class System:
    name: str
    side: str  # "teacher" | "student": whose model section (architecture, base weights, dtype) it uses
    stage: str  # the training stage whose saved model it is
    base: bool = (
        False  # the base model itself: zero-shot when pretrained, trained on references when built from scratch
    )
    pretrained_only: bool = False  # a fine-tuned copy of a pretrained model; meaningless for models built from scratch
    teacher_from: tuple[str, ...] = ()  # config sections whose `teacher` setting (finetuned | base) picks a teacher
    init_from: str | None = None  # the config section whose `init_from` setting picks where the student starts

    def trained_stage(self, scratch: bool) -> str | None:
        """The stage whose model this row scores, or None for a pretrained base model used zero-shot."""
        return None if self.base and not scratch else self.stage


TABLE: tuple[System, ...] = (
    System("TEACHER", "teacher", "train_teacher", base=True),
    System("STUDENT", "student", "train_student", base=True),
    System("TEACHER_PEFT", "teacher", "train_teacher", pretrained_only=True),
    System("STUDENT_PEFT", "student", "train_student", pretrained_only=True),
    System("HLKD", "student", "train_hlkd", teacher_from=("hard_kd",), init_from="hard_kd"),
    System("SLKD", "student", "train_slkd", teacher_from=("soft_kd",), init_from="soft_kd"),
    System("GKD", "student", "train_gkd", teacher_from=("soft_kd",), init_from="gkd"),
    # sequence-level + word-level KD (Kim & Rush 2016): soft-label KD on the teacher's labels
    System("HLKD+SLKD", "student", "train_hlkd_slkd", teacher_from=("hard_kd", "soft_kd"), init_from="soft_kd"),
    # the equal-compute reference row of KD after fine-tuning: train_student's model (STUDENT_PEFT, or STUDENT from
    # scratch) fine-tuned on the references for as many more steps as a KD phase that starts from it takes
    System("SFT_MORE", "student", "train_sft_more"),
)
BY_NAME: dict[str, System] = {s.name: s for s in TABLE}
NAMES: list[str] = [s.name for s in TABLE]


def get(name: str) -> System:
    return BY_NAME[name]
