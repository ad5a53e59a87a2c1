"""Batched translation with the prompt prefix every source shares run once: the same outputs as without."""

import pytest
import torch
from conftest import build_tiny_qwen

from distillmt.generate import translate
from distillmt.prompts import pad_left
from distillmt.sections import GenerateConfig, HardKDConfig

pytestmark = pytest.mark.unit

CHAT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "<|im_start|>assistant\n"
)
SOURCES = [
    "the cat sat",
    "a dog ran on the mat every day",
    "we saw it",
    "the cat and the dog",
    "it",
    "every day we sat",
]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    from distillmt.models import train_bpe_tokenizer

    texts = SOURCES * 5 + ["Translate the following English text into Chinese. Reply with the translation only."] * 5
    tok = train_bpe_tokenizer(texts + ["猫在桌子上睡觉。", "你好世界"] * 5, 300, tmp_path_factory.mktemp("tok"))
    tok.chat_template = CHAT
    model = build_tiny_qwen(len(tok), hidden_size=32, seed=3, max_positions=256, pad_token_id=tok.pad_token_id)
    with torch.no_grad():  # sharper than the initialisation: outputs that depend on the source
        for p in model.parameters():
            p.mul_(8.0 if p.ndim > 1 else 1.0)
    return model.eval(), tok


def split(args: dict) -> tuple[GenerateConfig, dict]:
    """Keyword arguments as the decoding section and the rest (seed, progress, candidates, ...)."""
    names = GenerateConfig.__dataclass_fields__
    return GenerateConfig(**{k: v for k, v in args.items() if k in names}), {
        k: v for k, v in args.items() if k not in names
    }


def test_prefix_inputs_put_the_shared_prefix_first_and_pad_the_rest_on_the_left():
    enc = pad_left([[5, 6, 7, 8], [5, 6, 9]], 0, shared=2)
    assert enc["input_ids"].tolist() == [[5, 6, 7, 8], [5, 6, 0, 9]]
    assert enc["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 1]]
    plain = pad_left([[5, 6, 7], [9]], 0)  # no prefix: plain left padding
    assert plain["input_ids"].tolist() == [[5, 6, 7], [0, 0, 9]] and plain["attention_mask"].tolist()[1] == [0, 0, 1]


@pytest.mark.parametrize(
    "decoding",
    [{}, {"num_beams": 2}, {"do_sample": True, "temperature": 1.5, "num_return_sequences": 2}],
    ids=["greedy", "beams", "sampled candidates"],
)
def test_translation_with_the_shared_prompt_prefix_run_once_is_the_same(chat_model, decoding, monkeypatch):
    """Greedy, beam search and sampled candidates give the same outputs whether the chat template's shared prefix
    is run once (handed to generate as a cache) or in every row; the cache is really used."""
    model, tok = chat_model
    caches = []
    real_generate = model.generate

    def spy(*args, **kwargs):
        caches.append(kwargs.get("cache"))
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    args = {"batch_size": 4, "max_new_tokens": 6, "seed": 1, "progress": False, **decoding}
    cfg, run = split(args)
    shared = translate(model, tok, SOURCES, cfg, **run)
    assert len(caches) == 2 and all(c is not None for c in caches)
    caches.clear()
    whole = translate(model, tok, SOURCES, cfg, share_prefix=False, **run)
    assert caches == [None, None]
    assert shared.candidates == whole.candidates and shared.hypotheses == whole.hypotheses
    assert shared.generated_tokens == whole.generated_tokens > 0
    assert len(set(whole.hypotheses)) > 1  # the outputs differ between sources: the comparison means something


def test_prompts_without_a_long_shared_prefix_are_not_cached(chat_model, monkeypatch):
    """The plain template shares only "English:", under the minimum: no cache, plain left padding."""
    model, tok = chat_model
    monkeypatch.setattr(tok, "chat_template", None)
    caches = []
    real_generate = model.generate
    monkeypatch.setattr(model, "generate", lambda *a, **k: caches.append(k.get("cache")) or real_generate(*a, **k))
    out = translate(model, tok, SOURCES, GenerateConfig(batch_size=4, max_new_tokens=4), progress=False)
    assert caches == [None, None] and len(out.hypotheses) == len(SOURCES)


@pytest.mark.parametrize("decoding", [{}, {"num_beams": 2}], ids=["greedy", "beams"])
def test_ct2_static_prompt_gives_the_same_translations(chat_model, tmp_path, decoding):
    """With CTranslate2 the shared prompt prefix is its cached static prompt: the same outputs as the whole prompts,
    and as transformers."""
    pytest.importorskip("ctranslate2")
    from distillmt.generate import convert_to_ct2, translate_ct2

    model, tok = chat_model
    folder = convert_to_ct2(model, tok, tmp_path / "ct2", "float32")
    args = {"batch_size": 4, "max_new_tokens": 6, "progress": False, **decoding}
    cfg, run = split(args)
    shared = translate_ct2(str(folder), tok, SOURCES, cfg, **run)
    whole = translate_ct2(str(folder), tok, SOURCES, cfg, share_prefix=False, **run)
    assert shared.hypotheses == whole.hypotheses and shared.generated_tokens == whole.generated_tokens > 0
    if not decoding:
        assert shared.hypotheses == translate(model, tok, SOURCES, cfg, **run).hypotheses


def test_reference_selection_keeps_the_candidate_closest_to_the_reference():
    from distillmt.generate import reference_select

    assert reference_select(["狗在跑", "猫在桌子上", "猫在桌子上睡觉了"], "猫在桌子上睡觉。") == 2
    assert reference_select(["你好", "你好"], "你好世界") == 0  # a tie keeps the first (the teacher's best)
    assert reference_select(["abc", "xyz"], "qqq") == 0  # nothing in common: the first


def test_labels_by_reference_pick_the_candidate_nearest_the_reference_and_fall_back_to_the_score(chat_model, tmp_path):
    """Seq-Inter labels: among the teacher's beams, the candidate with the best sentence chrF against the pair's
    reference; a source without a reference (an extra source) keeps the teacher's own best, as selection=score."""
    from sacrebleu.metrics import CHRF

    from distillmt.data import Pair
    from distillmt.io import read_jsonl
    from distillmt.teacher_labels import build_teacher_labels

    model, tok = chat_model
    decoding = GenerateConfig(batch_size=4, max_new_tokens=6)

    def labels(selection: str, refs: list[str]) -> list[dict]:
        pairs = [Pair(s, r) for s, r in zip(SOURCES, refs, strict=True)]
        out = tmp_path / selection
        cfg = HardKDConfig(decoding=decoding, num_candidates=4, selection=selection, shard_size=4)
        result = build_teacher_labels(lambda: (model, tok), pairs, out, cfg, identity={"t": 1}, progress=False)
        return [r for name in result["shards"] for r in read_jsonl(out / name)]

    by_score = labels("score", [""] * len(SOURCES))
    # references the teacher's last beam matches exactly (chrF 100), and one source without a reference
    refs = [r["candidates"][-1] for r in by_score[:-1]] + [""]
    by_ref = labels("reference", refs)
    chrf = CHRF()
    for s, r, ref in zip(by_score, by_ref, refs, strict=True):
        assert r["candidates"] == s["candidates"] and len(r["candidates"]) == 4
        if not ref:  # no reference: the teacher's own choice
            assert r["label"] == s["label"]
        else:
            assert r["label"] == ref
            assert chrf.sentence_score(r["label"], [ref]).score == max(
                chrf.sentence_score(c, [ref]).score for c in r["candidates"]
            )
    assert sum(r["label"] != s["label"] for s, r in zip(by_score, by_ref, strict=True)) > 0  # moved somewhere
