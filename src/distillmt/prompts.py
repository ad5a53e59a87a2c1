"""One prompt format for every model, and the label mask that goes with it.

A tokenizer with a chat template (Qwen's) gets its own template; one without gets a plain two-line template. Labels
are -100 on the prompt and on padding, so the loss (CE or KD) only ever sees the target tokens and the EOS.
"""

from __future__ import annotations

from typing import Any

import torch

IGNORE_INDEX = -100
DEFAULT_INSTRUCTION = "Translate the following English text into Chinese. Reply with the translation only."
PLAIN_TEMPLATE = "English: {src}\nChinese:\n"
# Characters the tokenizer is shown per token wanted: more than ordinary text of any language spends per token, so
# a line of hundreds of kilobytes is never tokenised whole to keep its first few hundred tokens.
CHARS_PER_TOKEN = 8


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def build_prompt(tokenizer: Any, src: str, instruction: str = DEFAULT_INSTRUCTION) -> str:
    """The text the model sees before its translation, generation prompt included."""
    if has_chat_template(tokenizer):
        messages = [{"role": "user", "content": f"{instruction}\n\n{src}"}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return PLAIN_TEMPLATE.format(src=src)


def end_token_id(tokenizer: Any) -> int:
    """The token that ends a translation: the chat template's end-of-turn for chat models, else EOS."""
    if has_chat_template(tokenizer):
        im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end != tokenizer.unk_token_id and im_end is not None:
            return im_end
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no EOS token; set one before training")
    return tokenizer.eos_token_id


def encode_example(
    tokenizer: Any,
    src: str,
    tgt: str,
    *,
    max_source_tokens: int = 128,
    max_target_tokens: int = 128,
    instruction: str = DEFAULT_INSTRUCTION,
) -> dict[str, list[int]]:
    """Token ids and labels for one pair: labels are IGNORE_INDEX on the prompt, the target ids plus EOS after it.

    Prompt and target are tokenised separately so the boundary is exact; both templates end the prompt with a newline
    so no BPE merge could have crossed it anyway. The tokenizer never sees more of a very long line than those
    limits can keep (``CHARS_PER_TOKEN`` characters per token), so a line of any length costs the same.
    """
    src, tgt = _head_and_tail(src, max_source_tokens), tgt[: max_target_tokens * CHARS_PER_TOKEN]
    prompt_ids = tokenizer(build_prompt(tokenizer, src, instruction), add_special_tokens=False)["input_ids"]
    if len(prompt_ids) > max_source_tokens:
        # Cut the middle of the source, not the template's tail: the generation prompt must stay intact.
        prompt_ids = prompt_ids[: max_source_tokens // 2] + prompt_ids[-(max_source_tokens - max_source_tokens // 2) :]
    target_ids = tokenizer(tgt, add_special_tokens=False)["input_ids"][: max_target_tokens - 1]
    target_ids = target_ids + [end_token_id(tokenizer)]
    return {
        "input_ids": prompt_ids + target_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + target_ids,
    }


def _head_and_tail(text: str, max_tokens: int) -> str:
    """``text`` with its middle left out when it is too long for ``max_tokens`` tokens to reach from either end
    into it: the prompt is then cut in the middle anyway, and the tokens kept, far from the join, are those of the
    whole text."""
    keep = max_tokens * CHARS_PER_TOKEN
    return text if len(text) <= 2 * keep else text[:keep] + text[-keep:]


def cut_source(tokenizer: Any, text: str, max_tokens: int) -> tuple[str, bool]:
    """``text`` cut where its token ``max_tokens`` + 1 starts, and whether it was cut: its first ``max_tokens``
    tokens, give or take one where byte tokens spell a character across the cut. The tokenizer is shown
    ``CHARS_PER_TOKEN`` characters per token wanted, twice as many each time those hold no more than ``max_tokens``
    tokens: a huge line costs a short prefix of it, or at worst (tokens of dozens of characters) two passes."""
    chars, fast = max_tokens * CHARS_PER_TOKEN, bool(getattr(tokenizer, "is_fast", False))
    while True:
        head = text[:chars]
        enc = tokenizer(head, add_special_tokens=False, return_offsets_mapping=fast)
        ids = enc["input_ids"]
        if len(ids) > max_tokens:
            if not fast:  # no offsets: the kept tokens' own text
                return tokenizer.decode(ids[:max_tokens]), True
            # where the first token left out starts: a character split over several byte tokens goes whole
            return text[: enc["offset_mapping"][max_tokens][0]], True
        if len(head) == len(text):
            return text, False
        chars *= 2


def pad_batch(examples: list[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch for training: attention_mask 0 and labels IGNORE_INDEX on padding."""
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def pad_left(ids: list[list[int]], pad_token_id: int, shared: int = 0) -> dict[str, torch.Tensor]:
    """Left-pad prompts for generation (it continues from the right edge of every row): ``input_ids`` and
    ``attention_mask``, 0 on the padding. With ``shared`` > 0 the rows' first ``shared`` tokens, the same in every
    row, stay first and only the rest is left-padded: generate takes position ids from the mask, so every row's
    positions are those of its unpadded prompt, and the shared start can come from a cache."""
    width = max(len(x) for x in ids) - shared
    input_ids = torch.full((len(ids), shared + width), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    mask[:, :shared] = 1
    for r, x in enumerate(ids):
        input_ids[r, :shared] = torch.tensor(x[:shared], dtype=torch.long)
        rest = x[shared:]
        input_ids[r, shared + width - len(rest) :] = torch.tensor(rest, dtype=torch.long)
        mask[r, shared + width - len(rest) :] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def strip_output(text: str) -> str:
    """Remove chat scaffolding a model may emit around its answer; keep the translation itself untouched."""
    for marker in ("<|im_end|>", "<|endoftext|>", "<|im_start|>"):
        text = text.split(marker)[0] if marker != "<|im_start|>" else text.replace(marker, "")
    text = text.lstrip()  # before the prefix check: "assistant\n" alone (an empty answer) must not become "assistant"
    if text.startswith("assistant\n"):
        text = text[len("assistant\n") :]
    return text.strip()
