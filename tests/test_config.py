"""Tests for distillmt.config: defaults, dotted overrides, range/choice/type errors, YAML files, cross-field checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from distillmt.config import (
    SYSTEMS,
    ExperimentConfig,
    SoftKDConfig,
    describe,
    load_config,
    resolved,
    to_dict,
    validate,
)
from distillmt.errors import DistillmtError

pytestmark = pytest.mark.unit

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
CONFIG_FILES = sorted(CONFIGS.glob("*.yaml")) + sorted(CONFIGS.glob("*.yml"))


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --- defaults and overrides ----------------------------------------------------------------------------------------


def test_defaults_validate_and_match_the_dataclass():
    cfg = load_config(None)
    validate(cfg)  # no exception
    assert isinstance(cfg, ExperimentConfig)
    assert to_dict(cfg) == to_dict(resolved(ExperimentConfig()))  # with what follows the language pair made concrete
    assert cfg.teacher.model == cfg.student.model == "scratch"
    assert set(cfg.systems) <= set(SYSTEMS)


def test_defaults_are_not_shared_between_instances():
    a, b = load_config(None), load_config(None)
    a.systems.append("GKD")
    a.teacher.lora.target_modules.clear()
    assert "GKD" not in b.systems
    assert b.teacher.lora.target_modules


@pytest.mark.parametrize(
    ("override", "getter", "expected"),
    [
        ("train_student.batch_size=8", lambda c: c.train_student.batch_size, 8),
        ("train_student.batch_size=8.0", lambda c: c.train_student.batch_size, 8),  # integral float -> int
        ("train_student.lr=3e-4", lambda c: c.train_student.lr, 3e-4),  # YAML 1.1 reads "3e-4" as a string
        ("train_student.lr=0.0003", lambda c: c.train_student.lr, 3e-4),
        ("train_teacher.lr=1.5e-3", lambda c: c.train_teacher.lr, 1.5e-3),
        ("train_teacher.epochs=2", lambda c: c.train_teacher.epochs, 2.0),  # int -> float field
        ("soft_kd.temperature=4", lambda c: c.soft_kd.temperature, 4.0),
        ("soft_kd.cache=true", lambda c: c.soft_kd.cache, True),
        ("data.simplified=false", lambda c: c.data.simplified, False),
        ("eval.bertscore=False", lambda c: c.eval.bertscore, False),
        ("systems=[TEACHER,STUDENT]", lambda c: c.systems, ["TEACHER", "STUDENT"]),
        ("systems=[TEACHER, STUDENT, GKD]", lambda c: c.systems, ["TEACHER", "STUDENT", "GKD"]),
        ("systems=TEACHER,HLKD", lambda c: c.systems, ["TEACHER", "HLKD"]),  # bare comma list
        ("teacher.lora.target_modules=[q_proj,v_proj]", lambda c: c.teacher.lora.target_modules, ["q_proj", "v_proj"]),
        ("teacher.lora.r=8", lambda c: c.teacher.lora.r, 8),
        ("data.path=corpus.jsonl", lambda c: c.data.path, "corpus.jsonl"),
        ("data.path=", lambda c: c.data.path, None),  # optional field: empty means None
        ("soft_kd.divergence=jsd", lambda c: c.soft_kd.divergence, "jsd"),
        ("hard_kd.decoding.num_beams=4", lambda c: c.hard_kd.decoding.num_beams, 4),
        ("name=my-run", lambda c: c.name, "my-run"),
    ],
)
def test_dotted_override_is_coerced_to_the_field_type(override, getter, expected):
    value = getter(load_config(None, [override]))
    assert value == expected
    assert type(value) is type(expected)


def test_overrides_apply_in_order_and_leave_other_keys_at_defaults():
    cfg = load_config(None, ["train_student.lr=1e-4", "train_student.lr=2e-4", "soft_kd.alpha=0.25"])
    assert cfg.train_student.lr == pytest.approx(2e-4)
    assert cfg.soft_kd.alpha == 0.25
    base = to_dict(load_config(None))
    got = to_dict(cfg)
    got["train_student"]["lr"] = base["train_student"]["lr"]
    got["soft_kd"]["alpha"] = base["soft_kd"]["alpha"]
    assert got == base
    assert cfg.train_teacher.lr == base["train_teacher"]["lr"]  # the two train sections are independent


def test_override_on_top_of_a_yaml_file(tmp_path):
    path = _write(tmp_path / "c.yaml", "name: fromfile\ntrain_student:\n  lr: 1.0e-4\n  batch_size: 4\n")
    cfg = load_config(path, ["train_student.batch_size=16"])
    assert cfg.name == "fromfile"
    assert cfg.train_student.lr == pytest.approx(1e-4)
    assert cfg.train_student.batch_size == 16


def test_the_word_no_is_a_choice_not_a_yaml_boolean(tmp_path):
    # YAML 1.1 reads `no` as false; the documented choice `mixed_precision: no` must still mean "no"
    cfg = load_config(None, ["train_teacher.mixed_precision=no"])
    assert cfg.train_teacher.mixed_precision == "no"
    cfg = load_config(_write(tmp_path / "c.yaml", "train_student:\n  mixed_precision: no\n"), [])
    assert cfg.train_student.mixed_precision == "no"
    with pytest.raises(DistillmtError, match="mixed_precision.*auto, no, bf16, fp16"):
        load_config(None, ["train_teacher.mixed_precision=yes"])


def test_override_without_equals_sign_is_an_error():
    with pytest.raises(DistillmtError, match=r"not key=value"):
        load_config(None, ["train_student.lr"])


# --- range, choice, type and key errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "key", "allowed"),
    [
        ("soft_kd.alpha=1.5", "soft_kd.alpha", "[0.0, 1.0]"),
        ("train_student.lr=-1", "train_student.lr", "[0.0, 10.0]"),
        ("data.test_size=0", "data.test_size", "[1, inf]"),
        ("teacher.lora.r=0", "teacher.lora.r", "[1, 4096]"),
        ("generate.top_p=0", "generate.top_p", "[1e-06, 1.0]"),
        ("seed=-1", "seed", "[0, inf]"),
        ("hard_kd.decoding.num_beams=65", "hard_kd.decoding.num_beams", "[1, 64]"),
    ],
)
def test_out_of_range_names_dotted_key_and_range(override, key, allowed):
    with pytest.raises(DistillmtError) as info:
        load_config(None, [override])
    msg = str(info.value)
    assert f"'{key}'" in msg
    assert "out of range" in msg
    assert f"allowed: {allowed}" in msg


@pytest.mark.parametrize(
    ("override", "key", "choices"),
    [
        ("soft_kd.divergence=kl", "soft_kd.divergence", ["forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd"]),
        ("train_teacher.schedule=foo", "train_teacher.schedule", ["cosine", "linear", "constant"]),
        ("data.source=xml", "data.source", ["tatoeba", "hsk", "text", "tsv", "csv", "jsonl", "hf"]),
        ("student.dtype=fp8", "student.dtype", ["auto", "float32", "bfloat16", "float16"]),
    ],
)
def test_bad_choice_names_key_and_allowed_values(override, key, choices):
    with pytest.raises(DistillmtError) as info:
        load_config(None, [override])
    msg = str(info.value)
    assert f"'{key}'" in msg
    assert "choose one of: " + ", ".join(choices) in msg


def test_unknown_system_names_the_allowed_systems():
    with pytest.raises(DistillmtError, match=r"unknown system 'SLDK'.*SLKD"):
        load_config(None, ["systems=[TEACHER,SLDK]"])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("soft_kd.temprature=1.0", "soft_kd.temprature"),
        ("train_studnet.lr=1e-4", "train_studnet"),
        ("teacher.lora.rank=8", "teacher.lora.rank"),
        ("sead=1", "sead"),
    ],
)
def test_unknown_key_is_an_error_naming_it(override, key):
    with pytest.raises(DistillmtError, match=rf"unknown config key '{key}'"):
        load_config(None, [override])


def test_unknown_key_in_yaml_file_is_an_error(tmp_path):
    path = _write(tmp_path / "typo.yaml", "soft_kd:\n  alpha: 0.3\n  temprature: 2.0\n")
    with pytest.raises(DistillmtError, match=r"unknown config key 'soft_kd.temprature'.*temperature"):
        load_config(path)


@pytest.mark.parametrize(
    ("override", "key", "what"),
    [
        ("train_student.batch_size=abc", "train_student.batch_size", "integer"),
        ("train_student.batch_size=2.5", "train_student.batch_size", "integer"),
        ("train_student.batch_size=true", "train_student.batch_size", "integer"),  # a bool is not an int here
        ("train_student.lr=fast", "train_student.lr", "number"),
        ("soft_kd.cache=maybe", "soft_kd.cache", "true or false"),
        ("soft_kd.cache=1", "soft_kd.cache", "true or false"),
        ("soft_kd.temperature.x=1", "soft_kd.temperature", "number"),
        ("name=[a,b]", "name", "string"),
    ],
)
def test_wrong_type_names_key_and_expected_type(override, key, what):
    with pytest.raises(DistillmtError) as info:
        load_config(None, [override])
    assert f"'{key}'" in str(info.value)
    assert what in str(info.value)


def test_section_given_a_scalar_is_an_error():
    with pytest.raises(DistillmtError, match=r"'soft_kd' must be a mapping"):
        load_config(None, ["soft_kd=3"])


def test_override_into_a_non_section_is_an_error(tmp_path):
    path = _write(tmp_path / "c.yaml", "name: x\n")
    with pytest.raises(DistillmtError, match=r"'name' is not a section"):
        load_config(path, ["name.sub=1"])


@pytest.mark.parametrize("override", ["soft_kd.alpha=.nan", "train_student.lr=nan"])
def test_nan_is_out_of_range(override):
    with pytest.raises(DistillmtError):
        load_config(None, [override])


@pytest.mark.parametrize("override", ["data=0", "data=[]", "soft_kd=false"])
def test_falsy_non_mapping_section_is_an_error(override):
    with pytest.raises(DistillmtError, match=r"must be a mapping"):
        load_config(None, [override])


def test_override_into_an_empty_yaml_section(tmp_path):
    path = _write(tmp_path / "c.yaml", "soft_kd:\n  # alpha: 0.3\n")
    assert load_config(path).soft_kd.alpha == SoftKDConfig().alpha  # an empty section means defaults
    assert load_config(path, ["soft_kd.alpha=0.1"]).soft_kd.alpha == pytest.approx(0.1)


def test_unknown_bleu_tokenizer_is_rejected_up_front():
    with pytest.raises(DistillmtError, match=r"eval.bleu_tokenize"):
        load_config(None, ["eval.bleu_tokenize=chinese"])


# --- YAML files ------------------------------------------------------------------------------------------------------


def test_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(DistillmtError, match=r"config file not found"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("name: x\nseed: 1\n\tbad: 2\n", 3),  # a tab cannot start a token
        ("name: x\nsoft_kd: {alpha: 0.5\n", 3),  # unclosed flow mapping: reported where the stream ends
        ("name: x\n  seed: 1\n", 2),  # bad indentation
    ],
)
def test_invalid_yaml_reports_file_and_line(tmp_path, text, line):
    path = _write(tmp_path / "broken.yaml", text)
    with pytest.raises(DistillmtError) as info:
        load_config(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}:{line}: invalid YAML")
    assert "\n" not in msg


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_yaml_that_is_not_a_mapping_is_an_error(tmp_path, text):
    path = _write(tmp_path / "list.yaml", text)
    with pytest.raises(DistillmtError, match=r"a config must be a mapping"):
        load_config(path)


def test_empty_yaml_file_means_defaults(tmp_path):
    path = _write(tmp_path / "empty.yaml", "# nothing set\n")
    assert to_dict(load_config(path)) == to_dict(load_config(None))


def test_yaml_values_are_range_checked_like_overrides(tmp_path):
    path = _write(tmp_path / "c.yaml", "train_student:\n  lr: 20.0\n")
    with pytest.raises(DistillmtError, match=r"'train_student.lr' = 20.0 is out of range; allowed: \[0.0, 10.0\]"):
        load_config(path)


_CONFIG_PARAMS = [pytest.param(p, id=p.name) for p in CONFIG_FILES] or [pytest.param(None, id="no-configs")]


@pytest.mark.parametrize("path", _CONFIG_PARAMS)
def test_every_shipped_config_validates(path):
    assert path is not None, f"no YAML files in {CONFIGS}"  # a missing or empty configs/ fails, it is not skipped
    cfg = load_config(path)
    validate(cfg)
    assert cfg.name  # a run folder name
    assert cfg.systems


def test_default_yaml_equals_the_builtin_defaults():
    assert to_dict(load_config(CONFIGS / "default.yaml")) == to_dict(load_config(None))


# --- cross-field checks ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (["systems=[TEACHER_PEFT]"], r"TEACHER_PEFT needs pretrained models"),
        (["systems=[STUDENT,STUDENT_PEFT]"], r"STUDENT_PEFT needs pretrained models"),
        (["hard_kd.selection=mbr", "hard_kd.num_candidates=1"], r"mbr needs hard_kd.num_candidates >= 2"),
        (["hard_kd.selection=reference"], r"reference needs hard_kd.num_candidates >= 2"),
        (["teacher.model=store:qwen2.5-coder-1.5b-instruct"], r"both be 'scratch' or both be pretrained"),
        (["hard_kd.teacher=base"], r"hard_kd.teacher=base needs a pretrained teacher"),
        (["soft_kd.teacher=base"], r"soft_kd.teacher=base needs a pretrained teacher"),
        (["student.scratch.num_heads=3"], r"'student.scratch': hidden_size must be divisible"),
        (["teacher.scratch.num_kv_heads=3"], r"'teacher.scratch'.*num_heads by num_kv_heads"),
    ],
)
def test_cross_field_errors(overrides, pattern):
    with pytest.raises(DistillmtError, match=pattern):
        load_config(None, overrides)


@pytest.mark.parametrize(
    "overrides",
    [
        ["hard_kd.selection=mbr", "hard_kd.num_candidates=4"],
        ["teacher.model=store:a", "student.model=store:b", "systems=[TEACHER,TEACHER_PEFT,STUDENT_PEFT]"],
        ["teacher.model=store:a", "student.model=store:b", "hard_kd.teacher=base", "soft_kd.teacher=base"],
        ["hard_kd.teacher=base", "systems=[TEACHER,STUDENT,SLKD]"],  # HLKD not run: its teacher does not matter
    ],
)
def test_cross_field_valid_combinations(overrides):
    load_config(None, overrides)  # no exception


# --- the reference printed by `distillmt config` ---------------------------------------------------------------------


def test_describe_lists_every_leaf_key_with_its_default():
    lines = describe()
    text = "\n".join(lines)

    def leaves(d: dict, prefix: str = "") -> list[str]:
        out = []
        for k, v in d.items():
            out.extend(leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"])
        return out

    keys = leaves(to_dict(ExperimentConfig()))
    for key in keys:
        assert any(line.startswith(f"{key} = ") for line in lines), key
    assert "soft_kd.temperature = 2.0 [0.05, 100.0]" in text
    assert "soft_kd.divergence = 'forward_kl' [forward_kl|reverse_kl|jsd|skew_kl|tvd]" in text


# --- config files that cannot be read, run folder names and output_dir ------------------------------------------------


def test_config_path_that_is_a_folder_is_an_error(tmp_path):
    with pytest.raises(DistillmtError, match=rf"config file {tmp_path} is a folder, not a YAML file"):
        load_config(tmp_path)


def test_non_utf8_config_file_names_the_file(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(DistillmtError) as info:
        load_config(path)
    msg = str(info.value)
    assert msg.startswith(f"config file {path}: not valid UTF-8")
    assert "\n" not in msg


def test_yaml_reader_error_is_one_line(tmp_path):
    path = _write(tmp_path / "nul.yaml", "name: a\x00b\n")
    with pytest.raises(DistillmtError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: invalid YAML")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("name=..", r"config key 'name' = '\.\.' is not allowed"),
        ("name=.", r"config key 'name' = '\.' is not allowed"),
        ("name=''", r"config key 'name' is empty"),
        ("name='  '", r"config key 'name' is empty"),
        ("name=a/b", r"config key 'name' = 'a/b' is not allowed"),
        ("name=../escape", r"config key 'name' = '\.\./escape' is not allowed"),
        ("name=a\\b", r"config key 'name' = 'a\\\\b' is not allowed"),
        ("output_dir=''", r"config key 'output_dir' is empty"),
    ],
)
def test_bad_run_names_are_refused(tmp_path, override, pattern):
    with pytest.raises(DistillmtError, match=pattern):
        load_config(None, [override, f"output_dir={tmp_path}"] if "output_dir" not in override else [override])


def test_output_dir_that_is_a_file_is_refused(tmp_path):
    f = _write(tmp_path / "runs", "not a folder\n")
    with pytest.raises(DistillmtError, match=rf"'output_dir' = '{f}': {f} exists and is a file, not a folder"):
        load_config(None, [f"output_dir={f}"])
    with pytest.raises(DistillmtError, match=rf"{f} exists and is a file"):  # a file further up the path
        load_config(None, [f"output_dir={f}/deeper"])


def test_run_folder_that_is_a_file_is_refused(tmp_path):
    _write(tmp_path / "t", "not a folder\n")
    with pytest.raises(DistillmtError, match=r"exists and is a file, not a run folder"):
        load_config(None, [f"output_dir={tmp_path}", "name=t"])


@pytest.mark.parametrize("name", ["t1", "my-run.v2", "..x", "jsd_beta=0.5"])
def test_plain_run_names_and_missing_output_dir_are_fine(tmp_path, name):
    cfg = load_config(None, [f"name={name}", f"output_dir={tmp_path / 'not' / 'yet'}"])
    assert cfg.name == name
    assert not (tmp_path / "not").exists()  # validation creates nothing


def test_the_readmes_own_pair_config_validates(tmp_path):
    """The config the README's "Distil your own pair" tells users to copy loads as written."""
    readme = (CONFIGS.parent / "README.md").read_text(encoding="utf-8")
    start = readme.index("```yaml\n# distillmt run configs/mine.yaml") + len("```yaml\n")
    cfg = load_config(_write(tmp_path / "mine.yaml", readme[start : readme.index("```", start)]))
    assert (cfg.data.src_lang, cfg.data.tgt_lang, cfg.data.source) == ("en", "de", "text")
    assert cfg.eval.bleu_tokenize == "13a" and cfg.teacher.lora.enabled and cfg.student.lora.enabled
