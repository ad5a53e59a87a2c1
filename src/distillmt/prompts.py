"""The prompt every model sees before its translation, and the label mask that goes with it.

The words come from the config's ``prompt`` section with the language pair filled in (:func:`make_prompt`): a
tokenizer with a chat template gets the instruction inside its own template; one without gets the plain template.
Labels are -100 on the prompt and on padding, so the loss (CE or KD) only ever sees the target tokens and the end of
the turn (:func:`end_token_id`: the chat template's end-of-turn token, else EOS).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from distillmt import languages
from distillmt.errors import DistillmtError
from distillmt.sections import PromptConfig

IGNORE_INDEX = -100
# Characters the tokenizer is shown per token wanted: more than ordinary text of any language spends per token, so
# a line of hundreds of kilobytes is never tokenised whole to keep its first few hundred tokens.
CHARS_PER_TOKEN = 8
_PLACEHOLDER = re.compile(r"\{(\w*)\}")


@dataclass(frozen=True)
class Prompt:
    """A prompt with its languages filled in: ``chat`` is the user message of chat models, ``plain`` the text before
    the translation for the others; each still holds ``{text}``, where the source goes."""

    chat: str
    plain: str

    def settings(self) -> dict[str, str]:
        """What keys a stage that encodes or translates with this prompt: nothing for the default English→Chinese
        prompt (the keys of runs made before prompts were configurable stay valid), else both texts."""
        return {} if self == DEFAULT_PROMPT else {"chat": self.chat, "plain": self.plain}


def make_prompt(cfg: PromptConfig, src_lang: str, tgt_lang: str) -> Prompt:
    """The prompt of ``cfg`` for a language pair given as BCP-47 codes (names from :mod:`distillmt.languages` unless
    ``cfg`` names them); a placeholder other than {src_lang}, {tgt_lang} and {text}, or no {text}, is an error."""
    names = {
        "src_lang": languages.name(src_lang, cfg.src_name, "data.src_lang"),
        "tgt_lang": languages.name(tgt_lang, cfg.tgt_name, "data.tgt_lang"),
    }
    texts = {}
    for key in ("instruction", "template"):
        text = getattr(cfg, key)
        for found in _PLACEHOLDER.findall(text):
            if found not in ("src_lang", "tgt_lang", "text"):
                raise DistillmtError(
                    f"config key 'prompt.{key}' has the placeholder {{{found}}}; allowed: {{src_lang}}, {{tgt_lang}}, "
                    "{text}"
                )
        if text.count("{text}") != 1:
            raise DistillmtError(f"config key 'prompt.{key}' must hold {{text}} (where the source goes) exactly once")
        texts[key] = text.replace("{src_lang}", names["src_lang"]).replace("{tgt_lang}", names["tgt_lang"])
    return Prompt(chat=texts["instruction"], plain=texts["template"])


DEFAULT_PROMPT = make_prompt(PromptConfig(), "en", "zh")


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def build_prompt(tokenizer: Any, src: str, prompt: Prompt = DEFAULT_PROMPT) -> str:
    """The text the model sees before its translation, generation prompt included."""
    if has_chat_template(tokenizer):
        messages = [{"role": "user", "content": prompt.chat.replace("{text}", src)}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return prompt.plain.replace("{text}", src)


_MARK = "DISTILLMTANSWERMARK"


def end_token_id(tokenizer: Any) -> int:
    """The token that ends a translation: for a chat model, the first special token its chat template writes after an
    assistant answer (Qwen ``<|im_end|>``, Llama 3 ``<|eot_id|>``, Gemma ``<end_of_turn>``, Mistral ``</s>``);
    else EOS."""
    # encode_example asks once per example: remember the answer per template and EOS (tests change them in place)
    memo = getattr(tokenizer, "_distillmt_end_token_ids", None)
    if memo is None:
        memo = {}
        try:
            tokenizer._distillmt_end_token_ids = memo
        except AttributeError:  # a tokenizer that refuses new attributes is asked again each time
            pass
    key = (getattr(tokenizer, "chat_template", None), tokenizer.eos_token_id)
    if key not in memo:
        end = _end_of_turn(tokenizer) if has_chat_template(tokenizer) else None
        if end is None and tokenizer.eos_token_id is None:
            raise ValueError(
                "tokenizer has no EOS token and no chat template that ends a turn; set one before training"
            )
        memo[key] = end if end is not None else tokenizer.eos_token_id
    return memo[key]


def _end_of_turn(tokenizer: Any) -> int | None:
    """The first special token the chat template writes after an assistant answer, or None."""
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": _MARK}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # a template that cannot render an assistant turn (raise_exception in Jinja, ...)
        return None
    if _MARK not in text:
        return None
    tail = text.split(_MARK, 1)[1]
    special = set(tokenizer.all_special_ids) | {int(i) for i in getattr(tokenizer, "added_tokens_decoder", {})}
    return next((i for i in tokenizer(tail, add_special_tokens=False)["input_ids"] if i in special), None)


def stop_token_ids(tokenizer: Any, model: Any = None) -> list[int]:
    """Every token that ends a translation in generation: the end of the turn, EOS, and the model's generation config
    EOS ids (a list for some chat models)."""
    ids = {end_token_id(tokenizer), tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return sorted(ids - {None})


def encode_example(
    tokenizer: Any,
    src: str,
    tgt: str,
    *,
    max_source_tokens: int = 128,
    max_target_tokens: int = 128,
    prompt: Prompt = DEFAULT_PROMPT,
) -> dict[str, list[int]]:
    """Token ids and labels for one pair: :func:`encode_examples` of one."""
    limits = {"max_source_tokens": max_source_tokens, "max_target_tokens": max_target_tokens}
    return encode_examples(tokenizer, [(src, tgt)], **limits, prompt=prompt)[0]


def encode_examples(
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    *,
    max_source_tokens: int = 128,
    max_target_tokens: int = 128,
    prompt: Prompt = DEFAULT_PROMPT,
) -> list[dict[str, list[int]]]:
    """Token ids and labels for each ``(source, target)`` pair: labels are IGNORE_INDEX on the prompt, the target ids
    plus the end token after it.

    Prompt and target are tokenised separately so the boundary is exact; both templates end the prompt with a newline
    so no BPE merge could have crossed it anyway. The tokenizer never sees more of a very long line than those
    limits can keep (``CHARS_PER_TOKEN`` characters per token), so a line of any length costs the same. All prompts
    go to the tokenizer in one call, all targets in another: a fast tokenizer then encodes them in Rust, not one
    Python call per string (the same ids).
    """
    if not pairs:
        return []
    prompts = [build_prompt(tokenizer, _head_and_tail(src, max_source_tokens), prompt) for src, _ in pairs]
    targets = [tgt[: max_target_tokens * CHARS_PER_TOKEN] for _, tgt in pairs]
    end = end_token_id(tokenizer)
    all_prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    all_target_ids = tokenizer(targets, add_special_tokens=False)["input_ids"]
    out = []
    for prompt_ids, target_ids in zip(all_prompt_ids, all_target_ids, strict=True):
        if len(prompt_ids) > max_source_tokens:
            # Cut the middle of the source, not the template's tail: the generation prompt must stay intact.
            prompt_ids = (
                prompt_ids[: max_source_tokens // 2] + prompt_ids[-(max_source_tokens - max_source_tokens // 2) :]
            )
        target_ids = target_ids[: max_target_tokens - 1] + [end]
        out.append({"input_ids": prompt_ids + target_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + target_ids})
    return out


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


def pad_batch(examples: list[dict[str, list[int]]], pad_token_id: int, multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Right-pad a batch for training: attention_mask 0 and labels IGNORE_INDEX on padding, to the longest example's
    length rounded up to ``multiple_of``."""
    width = -(-max(len(e["input_ids"]) for e in examples) // multiple_of) * multiple_of
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
