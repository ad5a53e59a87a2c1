import logging
import os
import signal

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def build_tiny_qwen(
    vocab_size: int = 40,
    *,
    hidden_size: int = 16,
    num_layers: int = 1,
    intermediate_size: int = 32,
    max_positions: int = 64,
    seed: int = 0,
    **config,
):
    """A randomly initialised (seeded) Qwen2 causal LM small enough for a unit test, built offline from its config."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=max_positions,
        **config,
    )
    return Qwen2ForCausalLM(cfg)


@pytest.fixture(scope="session")
def tiny_qwen():
    """The :func:`build_tiny_qwen` factory, for tests that build several models."""
    return build_tiny_qwen


# The micro experiment: every stage of the pipeline on a few dozen pairs with tiny scratch models (a few seconds per
# stage on a CPU). Used as command-line overrides by the pipeline, export, sweep, kill and DDP tests.
MICRO = [
    "systems=[TEACHER,STUDENT,HLKD,SLKD,GKD]",
    "tokenizer_vocab_size=300",
    "data.train_size=40",
    "data.valid_size=6",
    "data.test_size=6",
    "teacher.scratch={hidden_size: 32, num_layers: 2, num_heads: 2, num_kv_heads: 1, intermediate_size: 64}",
    "student.scratch={hidden_size: 16, num_layers: 1, num_heads: 2, num_kv_heads: 1, intermediate_size: 32}",
    "train_teacher={max_steps: 4, batch_size: 8, save_every: 2, log_every: 2}",
    "train_student={max_steps: 3, batch_size: 8, save_every: 2, log_every: 1}",
    "generate={max_new_tokens: 6, batch_size: 4}",
    "hard_kd={shard_size: 16, workers: 1, decoding: {max_new_tokens: 6}}",  # workers: test_label_workers
    "gkd.max_new_tokens=6",
    "eval.bertscore=false",
]


def micro_cfg(tmp_path, *extra: str):
    """The :data:`MICRO` config writing under ``tmp_path/micro`` (``name=...`` in ``extra`` renames the folder)."""
    from distillmt.config import load_config

    return load_config(None, [*MICRO, f"output_dir={tmp_path}", "name=micro", *extra])


# Hand-built run reports (no training) for the report and plot tests.
SHA = "ab" * 32
BLEU_SIG = "nrefs:1|case:mixed|eff:no|tok:zh|smooth:exp|version:2.6.0"
CHRF_SIG = "nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no|version:2.6.0"
BS_SIG = "store:multilingual-e5-small_L9_no-idf_version=0.3.13(hug_trans=5.24.0)_fast-tokenizer"
REASON = "could not load model 'bert-base-chinese': the hub did not answer"


def make_scores(p=None, r=None, f=None, chrf=0.0, bleu=0.0, *, n=300, sha=SHA):
    """One row's metric entries as ``evaluate`` writes them; BERTScore unavailable (``REASON``) when ``f`` is None."""
    if f is None:
        bertscore = {
            "name": "BERTScore",
            "score": None,
            "signature": None,
            "columns": {"BERTScore P": None, "BERTScore R": None, "BERTScore F1": None},
            "decimals": 4,
            "unavailable": REASON,
        }
    else:
        bertscore = {
            "name": "BERTScore",
            "score": f,
            "signature": BS_SIG,
            "columns": {"BERTScore P": p, "BERTScore R": r, "BERTScore F1": f},
            "decimals": 4,
            "note": f"mean over {n} sentences, no baseline rescaling",
        }
    return {
        "n": n,
        "refs_sha256": sha,
        "bertscore": bertscore,
        "chrf": {"name": "chrF", "score": chrf, "signature": CHRF_SIG, "columns": {"chrF": chrf}, "decimals": 2},
        "bleu": {"name": "BLEU", "score": bleu, "signature": BLEU_SIG, "columns": {"BLEU": bleu}, "decimals": 2},
    }


def make_report(**rows):
    """A run report (results.json) with one row per ``NAME=(scores, translation)``."""
    return {
        "name": "default",
        "command": "distillmt run",
        "systems": {
            name: {"scores": scores, "translation": translation, "settings": f"{name} settings"}
            for name, (scores, translation) in rows.items()
        },
        "stages": {"data": {"seconds": 0.84, "skipped": False}, "evaluate_TEACHER": {"seconds": 3.0, "skipped": True}},
        "wall_seconds": 720.04,
        "machine": {"device": "cpu", "cpus": 2, "torch": "2.13.0", "platform": "Linux"},
    }


def two_rows():
    """TEACHER with every metric, STUDENT without BERTScore; no significance test."""
    return make_report(
        TEACHER=(
            make_scores(0.77031, 0.71344, 0.73951, 9.8012, 8.4149),
            {"parameters": 3_200_123, "tokens_per_s": 3785.4},
        ),
        STUDENT=(make_scores(chrf=5.2849, bleu=2.7213), {"parameters": 305_321, "tokens_per_s": 8692.2}),
    )


def significance_entry(score, low, high, p):
    """One paired-bootstrap record of a row's metric (``p`` None for the baseline)."""
    significant = None if p is None else p < 0.05
    return {
        "score": score,
        "mean": (low + high) / 2,
        "ci_low": low,
        "ci_high": high,
        "p_value": p,
        "significant": significant,
    }


def with_significance():
    """Three rows, STUDENT the baseline; TEACHER differs on every metric, HLKD on BERTScore F1 only."""
    report = make_report(
        TEACHER=(
            make_scores(0.77031, 0.71344, 0.73951, 9.8012, 8.4149),
            {"parameters": 3_200_123, "tokens_per_s": 3785.4},
        ),
        STUDENT=(
            make_scores(0.69891, 0.61782, 0.65384, 5.2849, 2.7213),
            {"parameters": 305_321, "tokens_per_s": 8692.2},
        ),
        HLKD=(make_scores(0.74231, 0.67191, 0.70372, 5.4012, 2.9911), {"parameters": 305_321, "tokens_per_s": 9463.0}),
    )
    rows = {
        "TEACHER": [
            (0.73951, 0.73012, 0.74903, 0.000999),
            (9.8012, 9.1012, 10.5211, 0.000999),
            (8.4149, 7.6, 9.3, 0.001),
        ],
        "STUDENT": [(0.65384, 0.64401, 0.66302, None), (5.2849, 4.8012, 5.7533, None), (2.7213, 2.3022, 3.2011, None)],
        "HLKD": [
            (0.70372, 0.6941, 0.713, 0.000999),
            (5.4012, 4.9012, 5.9022, 0.3127),
            (2.9911, 2.5023, 3.4988, 0.2448),
        ],
    }
    systems = {}
    for name, records in rows.items():
        systems[name] = {}
        for key, (score, low, high, p) in zip(("bertscore", "chrf", "bleu"), records, strict=True):
            systems[name][key] = significance_entry(score, low, high, p)
    report["significance"] = {
        "baseline": "STUDENT",
        "test": "paired bootstrap resampling",
        "n_samples": 1000,
        "seed": 12345,
        "confidence": 0.95,
        "alpha": 0.05,
        "signatures": {
            "bertscore": "mean of sentence scores|bs:1000|seed:12345",
            "chrf": "nrefs:1|bs:1000|seed:12345|case:mixed|eff:yes|nc:6|nw:0|space:no|version:2.6.0",
            "bleu": "nrefs:1|bs:1000|seed:12345|case:mixed|eff:no|tok:zh|smooth:exp|version:2.6.0",
        },
        "systems": systems,
        "identical_to_baseline": [],
    }
    return report


@pytest.fixture
def restore_process_state():
    """``distillmt.cli.main`` installs a SIGTERM handler and configures logging, as an entry point should: undo both
    after a test that calls it."""
    handler = signal.getsignal(signal.SIGTERM)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    signal.signal(signal.SIGTERM, handler)
    root.handlers[:] = handlers
    root.setLevel(level)


def planned_keys(cfg) -> dict[str, str]:
    """The key of every stage the config's run would compute, without computing any."""
    from distillmt.pipeline import Experiment

    exp = Experiment(cfg, progress=False)
    exp.run.stage = lambda *args, **kwargs: {}
    exp.stage_data()
    exp.stage_tokenizer()
    for stage in ("train_teacher", "train_student", "teacher_labels", "train_hlkd", "train_slkd"):
        getattr(exp, f"stage_{stage}")()
    for name in cfg.systems:
        exp.stage_translate(name)
        exp.stage_evaluate(name)
    exp.stage_significance()
    return dict(exp.keys)


def random_examples(n: int = 8, seed: int = 0, vocab: int = 40) -> list[dict]:
    """Random prompt and target ids (each target ends with id 1, the tiny models' EOS) with their label masks: a model
    fitting one set gets worse on another after a few steps at a high lr."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = torch.randint(3, vocab, (3 + i % 3,), generator=g).tolist()
        t = torch.randint(3, vocab, (2 + i % 4,), generator=g).tolist() + [1]
        out.append({"input_ids": p + t, "labels": [-100] * len(p) + t})
    return out


@pytest.fixture(scope="session")
def pretrained_folder(tmp_path_factory) -> str:
    """A tiny Qwen2 model saved with its tokenizer, as a pretrained model's folder is."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from distillmt.models import train_bpe_tokenizer

    root = tmp_path_factory.mktemp("pretrained")
    texts = ["I like tea.", "我喜欢茶。", "The sea is big.", "大海很大。", "English: Chinese:"] * 4
    tok = train_bpe_tokenizer(texts, 300, root / "model")
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
    Qwen2ForCausalLM(config).save_pretrained(str(root / "model"), safe_serialization=True)
    return str(root / "model")
