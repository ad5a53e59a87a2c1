"""The language pair as configuration: prompt words, each chat model's own end of turn, the choices that follow the
target language, and the stage keys a prompt enters."""

from __future__ import annotations

import pytest
from conftest import planned_keys

from distillmt import languages
from distillmt.config import load_config
from distillmt.errors import DistillmtError
from distillmt.prompts import (
    DEFAULT_PROMPT,
    build_prompt,
    encode_example,
    end_token_id,
    make_prompt,
    stop_token_ids,
)
from distillmt.sections import PromptConfig

pytestmark = pytest.mark.unit

# Chat templates of three model families, cut to what a one-turn conversation uses.
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
SPECIAL = ["<s>", "</s>", "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
           "<|eot_id|>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"]  # fmt: skip


@pytest.fixture(scope="module")
def make_tokenizer(tmp_path_factory):
    """A tiny BPE tokenizer with the special tokens of three chat-model families, given a template, BOS and EOS."""
    from distillmt.models import train_bpe_tokenizer

    texts = ["hello world", "Translate the following English text into German.", "Guten Tag"] * 5
    base = train_bpe_tokenizer(texts, 200, tmp_path_factory.mktemp("tok"))
    base.add_special_tokens({"additional_special_tokens": SPECIAL})

    def make(template: str, bos: str, eos: str):
        tok = base.__class__(tokenizer_object=base.backend_tokenizer, bos_token=bos, eos_token=eos, pad_token="<pad>")
        tok.add_special_tokens({"additional_special_tokens": SPECIAL})
        tok.chat_template = template
        return tok

    return make


@pytest.mark.parametrize(
    ("template", "bos", "eos", "end"),
    [
        (LLAMA3, "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"),
        (GEMMA, "<bos>", "<eos>", "<end_of_turn>"),
        (MISTRAL, "<s>", "</s>", "</s>"),
    ],
    ids=["llama3", "gemma", "mistral"],
)
def test_each_chat_model_ends_a_translation_with_its_own_end_of_turn(make_tokenizer, template, bos, eos, end):
    tok = make_tokenizer(template, bos, eos)
    end_id = tok.convert_tokens_to_ids(end)
    assert end_token_id(tok) == end_id
    assert set(stop_token_ids(tok)) == {end_id, tok.eos_token_id}
    ex = encode_example(tok, "hello world", "Guten Tag", prompt=make_prompt(PromptConfig(), "en", "de"))
    assert ex["labels"][-1] == ex["input_ids"][-1] == end_id  # the student learns to stop where its template does


def test_a_model_generation_config_adds_its_stop_tokens(make_tokenizer, tiny_qwen):
    tok = make_tokenizer(LLAMA3, "<|begin_of_text|>", "<|end_of_text|>")
    model = tiny_qwen(len(tok))
    model.generation_config.eos_token_id = [tok.convert_tokens_to_ids("<eos>"), tok.eos_token_id]
    assert set(stop_token_ids(tok, model)) == {
        tok.convert_tokens_to_ids(t) for t in ("<|eot_id|>", "<|end_of_text|>", "<eos>")
    }


def test_the_prompt_names_the_pair_in_the_chat_template_and_the_plain_one(make_tokenizer):
    prompt = make_prompt(PromptConfig(), "en", "de")
    chat = build_prompt(make_tokenizer(LLAMA3, "<|begin_of_text|>", "<|end_of_text|>"), "hello world", prompt)
    assert "Translate the following English text into German. Reply with the translation only.\n\nhello world" in chat
    assert chat.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert prompt.plain.replace("{text}", "hello") == "English: hello\nGerman:\n"
    assert make_prompt(PromptConfig(), "zh-Hant", "pt-BR").plain == "Chinese: {text}\nPortuguese:\n"


def test_the_default_prompt_is_the_studys_and_keys_nothing():
    assert DEFAULT_PROMPT.chat == (
        "Translate the following English text into Chinese. Reply with the translation only.\n\n{text}"
    )
    assert DEFAULT_PROMPT.plain == "English: {text}\nChinese:\n"
    assert DEFAULT_PROMPT.settings() == {}
    assert make_prompt(PromptConfig(), "zh", "en").settings() == {
        "chat": "Translate the following Chinese text into English. Reply with the translation only.\n\n{text}",
        "plain": "Chinese: {text}\nEnglish:\n",
    }


def test_prompt_words_are_configurable_and_checked():
    cfg = PromptConfig(instruction="{src_lang} → {tgt_lang}:\n{text}", template="<{src_lang}> {text} <{tgt_lang}>")
    prompt = make_prompt(cfg, "de", "fr")
    assert (prompt.chat, prompt.plain) == ("German → French:\n{text}", "<German> {text} <French>")
    named = make_prompt(PromptConfig(src_name="Swiss German"), "gsw", "en")
    assert named.plain.startswith("Swiss German: ")
    with pytest.raises(DistillmtError, match=r"'data.src_lang' = 'gsw'.*prompt.src_name"):
        make_prompt(PromptConfig(), "gsw", "en")
    with pytest.raises(DistillmtError, match=r"'prompt.template' has the placeholder \{source\}"):
        make_prompt(PromptConfig(template="{source}\n"), "en", "de")
    with pytest.raises(DistillmtError, match=r"'prompt.instruction' must hold \{text\}"):
        make_prompt(PromptConfig(instruction="Translate into {tgt_lang}."), "en", "de")


def test_a_source_with_braces_is_not_a_template():
    prompt = make_prompt(PromptConfig(), "en", "de")
    assert build_prompt(object(), "x = {src_lang} {text}", prompt) == "English: x = {src_lang} {text}\nGerman:\n"


def test_bleu_tokenizer_follows_the_target_language(tmp_path):
    assert [languages.bleu_tokenizer(c) for c in ("zh", "zh-Hant", "de", "en", "ar")] == [
        "zh",
        "zh",
        "13a",
        "13a",
        "13a",
    ]
    cfg = load_config(None, [f"output_dir={tmp_path}", "data.src_lang=zh", "data.tgt_lang=en"])
    assert cfg.eval.bleu_tokenize == "13a"
    assert load_config(None, [f"output_dir={tmp_path}", "eval.bleu_tokenize=char"]).eval.bleu_tokenize == "char"


def test_a_missing_optional_bleu_tokenizer_is_an_error_before_any_work(tmp_path):
    pytest.importorskip("sacrebleu")
    try:
        languages.bleu_tokenizer("ja")
    except DistillmtError:
        pass
    else:
        pytest.skip("sacrebleu's Japanese tokenizer is installed here")
    with pytest.raises(DistillmtError, match=r"'ja'.*ja-mecab.*pip install 'sacrebleu\[ja\]'"):
        load_config(None, [f"output_dir={tmp_path}", "data.source=jsonl", "data.path=c.jsonl", "data.tgt_lang=ja"])


def test_bad_language_codes_name_their_key(tmp_path):
    with pytest.raises(DistillmtError, match=r"'data.tgt_lang' = 'German' is not a BCP-47 language code"):
        load_config(None, [f"output_dir={tmp_path}", "data.tgt_lang=German"])


def test_a_prompt_keys_every_stage_that_prompts_a_model_and_no_other(tmp_path):
    default = planned_keys(load_config(None, [f"output_dir={tmp_path}"]))
    other = planned_keys(load_config(None, [f"output_dir={tmp_path}", "prompt.template={src_lang} | {text} |\n"]))
    assert [k for k in default if default[k] == other[k]] == ["data", "tokenizer"]
