"""A line of hundreds of kilobytes, given to translate or to a run, is cut where it enters, with a warning that counts
the lines cut: the tokenizer never sees it whole, the model never gets an attention matrix of its length, and BPE
training never gets a run of characters long enough to hold the tokenizer stage for minutes."""

import json
import logging
import random

import pytest
from conftest import build_tiny_qwen, micro_cfg

from distillmt.data import TOKENIZER_TEXT_CHARS, Pair, split_pairs, tokenizer_training_texts
from distillmt.generate import source_prompts, translate
from distillmt.prompts import CHARS_PER_TOKEN, IGNORE_INDEX, build_prompt, cut_source, encode_example
from distillmt.sections import GenerateConfig

CHAT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "<|im_start|>assistant\n"
)
WORDS = ["the", "cat", "sat", "on", "a", "mat", "every", "day", "we", "saw", "it", "dog", "ran"]


def long_line(n_chars: int = 200_000, seed: int = 0) -> str:
    """Ordinary words, ``n_chars`` characters of them: a pasted document, not a pathological string."""
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_chars // 3))[:n_chars]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    from distillmt.models import train_bpe_tokenizer

    texts = [" ".join(WORDS)] * 10 + ["Translate the following English text into Chinese."] * 5
    tok = train_bpe_tokenizer(texts + ["猫在桌子上睡觉。", "你好世界"] * 5, 300, tmp_path_factory.mktemp("tok"))
    tok.chat_template = CHAT
    model = build_tiny_qwen(len(tok), hidden_size=32, seed=3, max_positions=256, pad_token_id=tok.pad_token_id)
    return model.eval(), tok


class Recording:
    """A tokenizer that remembers the length of every text it was asked to tokenise."""

    def __init__(self, tok):
        self.tok, self.lengths = tok, []

    def __call__(self, text, **kw):
        self.lengths.append(len(text))
        return self.tok(text, **kw)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.unit
def test_translate_cuts_a_200_kb_source_with_one_warning_that_counts_the_lines(chat_model, caplog, monkeypatch):
    model, tok = chat_model
    widths = []
    real_generate = model.generate

    def generate(**kw):
        widths.append(kw["input_ids"].shape[1])
        return real_generate(**kw)

    monkeypatch.setattr(model, "generate", generate)
    sources = ["the cat sat", long_line(), "we saw it", long_line(seed=1)]
    with caplog.at_level(logging.WARNING, logger="distillmt.generate"):
        res = translate(model, tok, sources, GenerateConfig(max_new_tokens=4, max_source_tokens=64), progress=False)
    assert len(res.hypotheses) == 4 and all(isinstance(h, str) for h in res.hypotheses)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["2 of 4 sources were longer than 64 tokens and were cut to 64 (max_source_tokens)"]
    template = len(ids(tok, build_prompt(tok, "")))
    assert max(widths) <= template + 64  # the prompt the model saw, not 40,000 tokens of it


@pytest.mark.unit
def test_a_long_source_keeps_its_first_tokens_and_the_template_end(chat_model):
    _, tok = chat_model
    line = long_line()
    (prompt,) = source_prompts(tok, [line], 50)
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant")  # the generation prompt stays last
    cut, was_cut = cut_source(tok, line, 50)
    assert was_cut and ids(tok, cut) == ids(tok, line)[:50] and line.startswith(cut)
    assert cut_source(tok, "the cat sat", 50) == ("the cat sat", False)
    exactly = tok.decode(ids(tok, line)[:50])
    assert cut_source(tok, exactly, 50) == (exactly, False)  # at the cap is not over it


@pytest.mark.unit
def test_the_tokenizer_sees_a_bounded_prefix_of_a_huge_line(chat_model):
    _, tok = chat_model
    recording = Recording(tok)
    cut_source(recording, long_line(), 64)
    assert recording.lengths == [64 * CHARS_PER_TOKEN]


@pytest.mark.unit
def test_tokens_longer_than_the_first_guess_still_count_exactly(tmp_path):
    """A run of one character that BPE spells in long tokens: the first prefix holds too few tokens, so a longer one
    is read, and a line within the cap is not cut."""
    from distillmt.models import train_bpe_tokenizer

    tok = train_bpe_tokenizer(["a" * 64] * 20 + ["the cat"] * 5, 300, tmp_path / "tok")
    line = "a" * 4000
    n = len(ids(tok, line))
    assert len(line) > 4 * CHARS_PER_TOKEN * n  # tokens far longer than CHARS_PER_TOKEN characters
    assert cut_source(tok, line, n) == (line, False)
    cut, was_cut = cut_source(tok, line, 8)
    assert was_cut and ids(tok, cut) == ids(tok, line)[:8]


@pytest.mark.unit
def test_encode_example_on_a_200_kb_pair_tokenises_a_bounded_text_and_keeps_the_same_tokens(chat_model):
    _, tok = chat_model
    src, tgt = long_line(), "猫在桌子上睡觉。" * 25_000
    recording = Recording(tok)
    ex = encode_example(recording, src, tgt, max_source_tokens=96, max_target_tokens=96)
    assert max(recording.lengths) <= 2 * 96 * CHARS_PER_TOKEN + len(build_prompt(tok, ""))
    assert len(ex["input_ids"]) == 96 + 96 and ex["labels"][:96] == [IGNORE_INDEX] * 96
    # the same example as tokenising the whole pair, which it was before the cut by characters
    prompt = ids(tok, build_prompt(tok, src))
    whole = prompt[:48] + prompt[-48:] + ids(tok, tgt)[:95]
    assert ex["input_ids"][:-1] == whole


@pytest.mark.unit
def test_tokenizer_training_texts_are_cut_with_a_warning_that_counts_them(caplog):
    pairs = [Pair("the cat", "猫"), Pair(long_line(), "猫" * 70_000), Pair("we saw it", "我们看到了")]
    with caplog.at_level(logging.WARNING, logger="distillmt.data"):
        texts = tokenizer_training_texts(pairs)
    assert texts[:2] == ["the cat", "猫"] and texts[4:] == ["we saw it", "我们看到了"]
    assert texts[2:4] == [long_line()[:TOKENIZER_TEXT_CHARS], "猫" * TOKENIZER_TEXT_CHARS]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    expected = f"2 of 6 tokenizer training texts were longer than {TOKENIZER_TEXT_CHARS} characters"
    assert len(warnings) == 1 and warnings[0].startswith(expected)


def test_a_run_with_a_200_kb_pair_cuts_it_everywhere_and_finishes(tmp_path, monkeypatch, caplog):
    """data.max_chars raised above a 200 KB pair: the tokenizer is trained on its first characters, the teacher's
    labels and the test translations on its first tokens, and the run finishes with the cuts counted."""
    import distillmt.models
    from distillmt.pipeline import run_experiment

    sizes = ["systems=[TEACHER,HLKD]", "data.train_size=0", "data.valid_size=6", "data.test_size=6"]
    # where the split deals the 9th and 10th rows: it depends on the number of distinct pairs and the seed alone
    probe = split_pairs([Pair(str(i), str(i)) for i in range(50)], train_size=0, valid_size=6, test_size=6, seed=0)
    train_row, test_row = int(probe["train"][0].src), int(probe["test"][0].src)
    rng = random.Random(0)
    rows = [{"en": " ".join(rng.sample(WORDS, 5)) + f" {i}", "zh": f"句子{i}猫在桌子上"} for i in range(50)]
    rows[train_row] = {"en": long_line(), "zh": "猫在桌子上睡觉。" * 25_000}
    rows[test_row] = {"en": long_line(seed=1), "zh": "我们看到了。" * 30_000}
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    seen = []
    real = distillmt.models.train_bpe_tokenizer
    monkeypatch.setattr(distillmt.models, "train_bpe_tokenizer", lambda t, *a: seen.append(list(t)) or real(t, *a))
    cfg = micro_cfg(
        tmp_path, *sizes, "seed=0", "data.source=jsonl", f"data.path={corpus}", "data.max_chars=300000",
        "generate.max_source_tokens=40", "hard_kd.decoding.max_source_tokens=40",
    )  # fmt: skip
    with caplog.at_level(logging.WARNING):
        report = run_experiment(cfg, progress=False)
    assert set(report["systems"]) == {"TEACHER", "HLKD"}
    assert max(map(len, seen[0])) == TOKENIZER_TEXT_CHARS
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "2 of 76 tokenizer training texts were longer than 1000 characters and were cut to 1000" in warnings
    cuts = [w for w in warnings if "sources were longer than 40 tokens and were cut to 40" in w]
    assert len(cuts) == 3 and all(w.startswith("1 of ") for w in cuts)  # a label shard, two test translations
    translations = (tmp_path / "micro" / "translate_HLKD" / "translations.jsonl").read_text(encoding="utf-8")
    assert long_line(seed=1) in translations  # the source is written whole; only the model saw it cut


@pytest.mark.unit
def test_the_translate_command_on_a_200_kb_line_counts_the_cut_and_writes_every_row(tmp_path, caplog):
    from distillmt.cli import main
    from distillmt.models import build_scratch_model, train_bpe_tokenizer

    folder = tmp_path / "model"
    tok = train_bpe_tokenizer([" ".join(WORDS), "你好世界"] * 10, 300, folder)
    model = build_scratch_model(
        tok, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32, max_positions=128
    )
    model.save_pretrained(folder)
    src, out = tmp_path / "src.txt", tmp_path / "out.jsonl"
    src.write_text(f"the cat sat\n{long_line()}\n", encoding="utf-8")
    argv = ["translate", "--model", str(folder), "-i", str(src), "-o", str(out), "--no-progress"]
    with caplog.at_level(logging.WARNING, logger="distillmt.generate"):
        assert main([*argv, "--max-new-tokens", "2", "--max-source-tokens", "32"]) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["src"] for r in rows] == ["the cat sat", long_line()]
    assert "1 of 2 sources were longer than 32 tokens and were cut to 32 (max_source_tokens)" in caplog.messages
