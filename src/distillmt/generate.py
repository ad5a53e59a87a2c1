"""Batched translation: left-padded, length-sorted batches through ``model.generate`` with the KV cache; the prompt
prefix every source shares (a chat template's system prompt and instruction) is run once, not once per sentence.

Greedy, beam search and sampling all come from the same arguments; with several candidates per source, one is chosen
by the model's own length-normalised log-probability or by MBR with chrF between candidates.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from distillmt.errors import DistillmtError
from distillmt.forward import PrefixCache, common_prefix, prefix_cache
from distillmt.io import file_lock
from distillmt.prompts import (
    CHARS_PER_TOKEN,
    DEFAULT_PROMPT,
    Prompt,
    build_prompt,
    cut_source,
    pad_left,
    stop_token_ids,
    strip_output,
)
from distillmt.sections import GenerateConfig

log = logging.getLogger("distillmt.generate")


@dataclass
class TranslationResult:
    """Hypotheses in input order. A result of one process's shard (``shard=(rank, world)``) holds None and no
    candidates for the sources of the other shards; :func:`merge_shards` puts the shards together."""

    hypotheses: list[str]
    candidates: list[list[str]]  # every candidate per source (one when num_return_sequences == 1)
    generated_tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else float("nan")

    def summary(self) -> dict[str, float]:
        """Speed figures for a results row."""
        return {
            "generated_tokens": self.generated_tokens,
            "seconds": self.seconds,
            "tokens_per_s": self.tokens_per_second,
            "sentences_per_s": len(self.hypotheses) / max(self.seconds, 1e-9),
        }


def merge_shards(parts: list[TranslationResult]) -> TranslationResult:
    """One result from the shards that several processes translated (each hypothesis from the shard that has it);
    tokens add up, and the seconds are the slowest shard's (the processes ran side by side)."""
    hyps = [
        next((p.hypotheses[i] for p in parts if p.hypotheses[i] is not None), None)
        for i in range(len(parts[0].hypotheses))
    ]
    if None in hyps:
        raise DistillmtError(f"sentence {hyps.index(None)} was translated by no process")
    cands = [next(p.candidates[i] for p in parts if p.hypotheses[i] is not None) for i in range(len(hyps))]
    return TranslationResult(hyps, cands, sum(p.generated_tokens for p in parts), max(p.seconds for p in parts))


def source_prompts(
    tokenizer: Any, sources: list[str], max_source_tokens: int, *, warn: bool = True, prompt: Prompt = DEFAULT_PROMPT
) -> list[str]:
    """The prompts (``prompt`` in the tokenizer's template) of ``sources``, each source first cut to ``max_source_tokens`` tokens: a line of any length
    asks for a bounded attention matrix, and the template around it stays whole, its generation prompt last. One
    warning counts the sources cut."""
    # One batched call clears the sources that fit (nearly all): cut_source, one call per source, only for the rest.
    heads = [s[: max_source_tokens * CHARS_PER_TOKEN] for s in sources]
    counts = [len(x) for x in tokenizer(heads, add_special_tokens=False)["input_ids"]] if sources else []
    cut = [
        (s, False) if n <= max_source_tokens and len(h) == len(s) else cut_source(tokenizer, s, max_source_tokens)
        for s, h, n in zip(sources, heads, counts, strict=True)
    ]
    n = sum(was_cut for _, was_cut in cut)
    if n and warn:
        log.warning(
            "%d of %d sources were longer than %d tokens and were cut to %d (max_source_tokens)",
            n, len(sources), max_source_tokens, max_source_tokens,
        )  # fmt: skip
    return [build_prompt(tokenizer, s, prompt) for s, _ in cut]


def process_shard(processes: Any) -> tuple[int, int]:
    """``(rank, world)`` of this process among accelerate's ``processes`` running together; ``(0, 1)`` for None."""
    return (processes.process_index, processes.num_processes) if processes is not None else (0, 1)


def _check_shard(shard: tuple[int, int]) -> tuple[int, int]:
    rank, world = shard
    if not 0 <= rank < world:
        raise ValueError(f"shard must be (rank, world) with 0 <= rank < world, got {shard}")
    return rank, world


def mbr_select(candidates: list[str]) -> int:
    """Index of the candidate with the highest mean chrF against the others (minimum Bayes risk with chrF)."""
    from sacrebleu.metrics import CHRF

    if len(candidates) == 1:
        return 0
    chrf = CHRF()
    best, best_score = 0, float("-inf")
    for i, hyp in enumerate(candidates):
        others = [c for j, c in enumerate(candidates) if j != i]
        score = sum(chrf.sentence_score(hyp, [o]).score for o in others) / len(others)
        if score > best_score:
            best, best_score = i, score
    return best


def reference_select(candidates: list[str], reference: str) -> int:
    """Index of the candidate with the highest sentence chrF against ``reference`` (the first on a tie): Kim & Rush's
    Seq-Inter selection (2016, section 3.2), which keeps the teacher's translation closest to the human one."""
    from sacrebleu.metrics import CHRF

    chrf = CHRF()
    scores = [chrf.sentence_score(c, [reference]).score for c in candidates]
    return max(range(len(candidates)), key=lambda i: (scores[i], -i))


@torch.no_grad()
def translate(
    model: Any,
    tokenizer: Any,
    sources: list[str],
    cfg: GenerateConfig | None = None,
    *,
    num_return_sequences: int = 1,
    selection: str = "score",
    seed: int = 0,
    progress: bool = True,
    desc: str = "translate",
    shard: tuple[int, int] = (0, 1),
    share_prefix: bool = True,
    prompt: Prompt = DEFAULT_PROMPT,
) -> TranslationResult:
    """Translate ``sources``, each in ``prompt``, with the decoding settings of ``cfg`` (its defaults when None); outputs come back in
    input order whatever the batching did. Batches hold up to ``cfg.batch_size`` sources of similar length; with
    ``cfg.max_batch_tokens`` also at most that many tokens (each row counted at the batch's longest prompt plus
    ``max_new_tokens``, times the beams), so short sentences go in larger batches. ``num_return_sequences``
    candidates per source, one kept by ``selection`` (``score`` or ``mbr``). A source longer than
    ``cfg.max_source_tokens`` tokens is cut to that many (:func:`source_prompts`).

    ``shard=(rank, world)``: translate only every ``world``-th batch from ``rank`` on (one of several processes; see
    :func:`merge_shards`). The batches and, when sampling, each batch's seed (``seed`` + its index) are the same
    whatever the number of processes, so the merged output equals one process's.

    ``share_prefix``: the keys and values of the prompt prefix all sources share (Qwen's chat template: 38 tokens of
    a Tatoeba prompt's 52) are computed once and handed to every batch, which then runs its prompts' prefill on the
    rest alone (:func:`distillmt.prompts.pad_left`); the same outputs up to rounding. Prefixes under
    :data:`distillmt.forward.MIN_SHARED_PREFIX` tokens are not shared."""
    from transformers import GenerationConfig

    g = cfg or GenerateConfig()
    model.eval()
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"  # generation continues from the right end of every row
    rank, world = _check_shard(shard)
    prompts = source_prompts(tokenizer, sources, g.max_source_tokens, warn=rank == 0, prompt=prompt)  # all ranks: all
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    lengths = [len(x) for x in ids]
    prefix = PrefixCache(prompt_prefix(ids) if share_prefix else [])
    rows_per_source = max(g.num_beams, num_return_sequences)  # generate's own expansion (beams, candidates)
    order = sorted(
        range(len(prompts)), key=lambda i: -lengths[i]
    )  # longest first: OOM shows up at once, not at the end
    stop_ids = stop_token_ids(tokenizer, model)
    gen_config = GenerationConfig(
        max_new_tokens=g.max_new_tokens,
        num_beams=g.num_beams,
        length_penalty=g.length_penalty,
        do_sample=g.do_sample,
        temperature=g.temperature if g.do_sample else None,
        top_k=g.top_k if g.do_sample else None,  # 0 = off: None would be filled in (the model's own, else 50)
        top_p=g.top_p if g.do_sample else None,
        num_return_sequences=num_return_sequences,
        eos_token_id=stop_ids,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
        return_dict_in_generate=True,
        output_scores=num_return_sequences > 1 and selection == "score",
    )
    batches = token_budget_batches(order, lengths, g.batch_size, g.max_batch_tokens, (g.max_new_tokens, g.num_beams))
    mine = list(range(rank, len(batches), world))
    candidates: list[list[str]] = [[] for _ in sources]
    scores: list[list[float]] = [[] for _ in sources]
    generated = 0
    start = time.perf_counter()
    bar = tqdm(total=sum(len(batches[b]) for b in mine), desc=desc, unit="sent", disable=not progress, leave=False)
    for b in mine:
        idx = batches[b]
        torch.manual_seed(seed + b)
        enc = pad_left([ids[i] for i in idx], tokenizer.pad_token_id, shared=len(prefix.ids))
        enc = {k: v.to(device) for k, v in enc.items()}
        past = prefix.past(model, enc["input_ids"])
        cache = {"cache": prefix_cache(past[1], len(idx) * rows_per_source)} if past is not None else {}
        out = model.generate(**enc, **cache, generation_config=gen_config)
        new = out.sequences[:, enc["input_ids"].shape[1] :]
        not_pad = new.ne(tokenizer.pad_token_id)
        for sid in stop_ids:  # count up to and including the stop token only
            not_pad &= torch.cumsum(new.eq(sid), dim=1).le(1) | ~new.eq(sid)
        generated += int(not_pad.sum())
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        seq_scores = _sequence_scores(model, out, g.num_beams) if gen_config.output_scores else None
        for k, text in enumerate(texts):
            src_i = idx[k // num_return_sequences]
            candidates[src_i].append(strip_output(text))
            if seq_scores is not None:
                scores[src_i].append(float(seq_scores[k]))
        bar.update(len(idx))
    bar.close()
    seconds = time.perf_counter() - start
    hyps = [_choose(cands, scores[i], selection) for i, cands in enumerate(candidates)]
    return TranslationResult(hyps, candidates, generated, seconds)


def prompt_prefix(ids: list[list[int]]) -> list[int]:
    """The start all prompts share (:func:`distillmt.forward.common_prefix`), short of each one's last token, whose
    logits give the first new token."""
    return common_prefix(ids, min(map(len, ids), default=0) - 1)


def _choose(candidates: list[str], scores: list[float], selection: str) -> str | None:
    """A source's hypothesis among its candidates: by MBR or by score; None for another shard's source."""
    if not candidates:
        return None
    if len(candidates) == 1:
        return candidates[0]
    if selection == "mbr":
        return candidates[mbr_select(candidates)]
    return candidates[max(range(len(candidates)), key=lambda j: scores[j])]


def token_budget_batches(
    order: list[int], lengths: list[int], batch_size: int, max_tokens: int, new: tuple[int, int] = (0, 1)
) -> list[list[int]]:
    """Consecutive batches of ``order`` (longest first): at most ``batch_size`` items, and with ``max_tokens`` > 0 at
    most that many tokens, a row counting ``(longest length in the batch + new[0]) * new[1]`` (new tokens, beams). A
    single item over the budget still gets a batch of its own."""
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < batch_size:
            width = (max(lengths[j] for j in (*batches[-1], i)) + new[0]) * new[1]
            if not max_tokens or width * (len(batches[-1]) + 1) <= max_tokens:
                batches[-1].append(i)
                continue
        batches.append([i])
    return batches


def _sequence_scores(model: Any, out: Any, num_beams: int) -> torch.Tensor:
    """Length-normalised log-probability of each returned sequence under the model that generated it."""
    if num_beams > 1 and getattr(out, "sequences_scores", None) is not None:
        return out.sequences_scores
    trans = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
    valid = torch.isfinite(trans)
    length = valid.sum(dim=1).clamp(min=1)
    return torch.where(valid, trans, torch.zeros_like(trans)).sum(dim=1) / length


def translate_ct2(
    model_dir: str,
    tokenizer: Any,
    sources: list[str],
    cfg: GenerateConfig | None = None,
    *,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
    desc: str = "translate (ct2)",
    shard: tuple[int, int] = (0, 1),
    share_prefix: bool = True,
    prompt: Prompt = DEFAULT_PROMPT,
) -> TranslationResult:
    """:func:`translate` with a CTranslate2 model folder (``distillmt export --format ct2``): the same prompts, stop
    tokens and output cleaning, CTranslate2's own batching inside each group of ``batch_size`` sources; one
    candidate per source. ``shard`` as for :func:`translate`, by groups instead of batches: greedy and beam output
    equal one process's, sampled output does not (CTranslate2 samples from per-thread generators that
    ``set_random_seed`` does not reset between calls). ``share_prefix``: the prompt prefix all sources share is
    CTranslate2's ``static_prompt``, whose decoder state it computes once and caches."""
    try:
        import ctranslate2
    except ImportError:
        raise DistillmtError(f"{model_dir} is a CTranslate2 model: pip install 'distillmt[ct2]'") from None

    g = cfg or GenerateConfig()
    batch_size, max_new_tokens, max_batch_tokens = g.batch_size, g.max_new_tokens, g.max_batch_tokens
    rank, world = _check_shard(shard)
    # as many threads as torch may use (the `threads` setting), not CTranslate2's own default
    threads = {"intra_threads": torch.get_num_threads()} if device == "cpu" else {}
    generator = ctranslate2.Generator(str(model_dir), device=device, **threads)
    ctranslate2.set_random_seed(seed)
    stop = stop_token_ids(tokenizer)
    prompt_texts = source_prompts(tokenizer, sources, g.max_source_tokens, warn=rank == 0, prompt=prompt)
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in prompt_texts]
    p = len(prompt_prefix(ids)) if share_prefix else 0
    prompts = [tokenizer.convert_ids_to_tokens(x[p:]) for x in ids]
    options = {"max_length": max_new_tokens, "beam_size": g.num_beams, "length_penalty": g.length_penalty}
    if p:
        options["static_prompt"] = tokenizer.convert_ids_to_tokens(ids[0][:p])
    if g.do_sample:
        options.update(sampling_temperature=g.temperature, sampling_topk=g.top_k or 0, sampling_topp=g.top_p)
    hyps: list[str | None] = [None] * len(sources)
    generated = 0
    start = time.perf_counter()
    groups = list(range(0, len(prompts), batch_size))[rank::world]
    bar = tqdm(total=sum(len(prompts[b : b + batch_size]) for b in groups), desc=desc, unit="sent",
               disable=not progress, leave=False)  # fmt: skip
    for b in groups:
        results = generator.generate_batch(
            prompts[b : b + batch_size],
            max_batch_size=max_batch_tokens or batch_size,
            batch_type="tokens" if max_batch_tokens else "examples",
            include_prompt_in_result=False,
            end_token=[tokenizer.convert_ids_to_tokens(i) for i in stop],
            **options,
        )
        for k, r in enumerate(results):
            ids = r.sequences_ids[0]
            generated += len(ids) + (len(ids) < max_new_tokens)  # the stop token counts, as in translate()
            hyps[b + k] = strip_output(tokenizer.decode(ids, skip_special_tokens=True))
        bar.update(len(results))
    bar.close()
    return TranslationResult(hyps, [[] if h is None else [h] for h in hyps], generated, time.perf_counter() - start)


def convert_to_ct2(model: Any, tokenizer: Any, out_dir: str | Path, quantization: str) -> Path:
    """Save ``model`` (a Hugging Face causal LM, LoRA merged) and convert it to a CTranslate2 folder ``out_dir``
    with the tokenizer beside it; written beside the target and renamed into place when complete."""
    try:
        import ctranslate2.converters
    except ImportError:
        raise DistillmtError("the ct2 engine and format need CTranslate2: pip install 'distillmt[ct2]'") from None
    out_dir = Path(out_dir)
    hf_dir, tmp = out_dir.parent / f".{out_dir.name}.hf", out_dir.parent / f".{out_dir.name}.tmp"
    for folder in (hf_dir, tmp):
        shutil.rmtree(folder, ignore_errors=True)
    try:
        model.save_pretrained(str(hf_dir), safe_serialization=True)
        tokenizer.save_pretrained(str(hf_dir))
        ctranslate2.converters.TransformersConverter(str(hf_dir)).convert(str(tmp), quantization=quantization)
        tokenizer.save_pretrained(str(tmp))
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(hf_dir, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


@dataclass(frozen=True)
class SavedModel:
    """Where a model's weights lie on disk, for an engine that loads them itself (vLLM): a folder of full weights,
    the LoRA adapter folder trained on top of it (or None) and the dtype to run in."""

    folder: str
    adapter: str | None
    dtype: str


def translate_with_engine(
    model: Any,
    tokenizer: Any,
    sources: list[str],
    cfg: GenerateConfig,
    *,
    work_dir: str | Path,
    saved: SavedModel | None = None,
    **run: Any,
) -> tuple[TranslationResult, str]:
    """Translate with ``cfg.engine``: transformers (``hf``, the reference), CTranslate2 (``ct2``: ``model`` is converted once into
    ``work_dir/ct2-model`` and reused on later calls, e.g. the next label shard) or vLLM (``vllm``, GPU only: with
    ``saved``, vLLM loads the weights from there, a LoRA adapter through its own LoRA support, and ``model`` may be
    None; without, the model, LoRA merged, is saved once into ``work_dir/vllm-model``). Returns the result and the
    engine with its precision (``hf float32``, ``ct2 int8``, ``vllm bfloat16``, ``vllm bfloat16 + LoRA``).
    CTranslate2 and vLLM give one candidate per source. Several processes (``shard``) convert once: the first holds a
    lock on the folder, the others wait and reuse it. ``run``: the other keyword arguments of :func:`translate`."""
    engine, quantization = cfg.engine, cfg.quantization
    if engine != "hf":  # one candidate per source
        for key in ("num_return_sequences", "selection"):
            run.pop(key, None)
    if engine == "vllm" and saved is not None:
        res = translate_vllm(saved.folder, tokenizer, sources, cfg, adapter=saved.adapter, dtype=saved.dtype, **run)
        return res, f"vllm {saved.dtype}" + (" + LoRA" if saved.adapter else "")
    if model is None:
        raise ValueError(f"engine {engine} translates a loaded model: model is None")
    dtype = str(next(model.parameters()).dtype)[6:]
    if engine == "hf":
        return translate(model, tokenizer, sources, cfg, **run), f"hf {dtype}"
    if engine == "vllm":
        vllm_dir = Path(work_dir) / "vllm-model"
        with file_lock(Path(work_dir) / ".vllm-model.lock"):
            if not (vllm_dir / "config.json").is_file():
                tmp = vllm_dir.parent / f".{vllm_dir.name}.tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                model.save_pretrained(str(tmp), safe_serialization=True)
                tokenizer.save_pretrained(str(tmp))
                tmp.rename(vllm_dir)
        return translate_vllm(str(vllm_dir), tokenizer, sources, cfg, dtype=dtype, **run), f"vllm {dtype}"
    ct2_dir = Path(work_dir) / "ct2-model"
    with file_lock(Path(work_dir) / ".ct2-model.lock"):
        if not (ct2_dir / "model.bin").is_file():
            convert_to_ct2(model, tokenizer, ct2_dir, quantization)
    device = next(model.parameters()).device.type
    return translate_ct2(str(ct2_dir), tokenizer, sources, cfg, device=device, **run), f"ct2 {quantization}"


def translate_vllm(
    model_dir: str,
    tokenizer: Any,
    sources: list[str],
    cfg: GenerateConfig | None = None,
    *,
    adapter: str | None = None,
    dtype: str = "bfloat16",
    seed: int = 0,
    progress: bool = True,
    desc: str = "translate (vllm)",
    shard: tuple[int, int] = (0, 1),
    prompt: Prompt = DEFAULT_PROMPT,
) -> TranslationResult:
    """:func:`translate` with vLLM on a GPU (the engine TRL uses for on-policy generation): the same prompts, stop
    tokens and output cleaning; vLLM schedules the batches itself (``batch_size`` and ``max_batch_tokens`` are not
    used). Greedy or sampling; beam search is refused (vLLM's sampler has none). ``adapter``: a peft LoRA adapter
    folder that vLLM applies itself (its LoRA support, the rank rounded up to one vLLM accepts), so no merged copy of
    the model is written. ``shard=(rank, world)``: every ``world``-th source from ``rank`` on."""
    g = cfg or GenerateConfig()
    if g.num_beams > 1:
        raise DistillmtError("engine vllm does not do beam search: use num_beams=1, or engine hf or ct2")
    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        raise DistillmtError("engine vllm needs vLLM and a GPU: pip install vllm (on a CUDA machine)") from None
    stop = stop_token_ids(tokenizer)
    params = SamplingParams(
        max_tokens=g.max_new_tokens,
        temperature=g.temperature if g.do_sample else 0.0,
        top_k=(g.top_k or -1) if g.do_sample else -1,
        top_p=g.top_p if g.do_sample else 1.0,
        seed=seed,
        stop_token_ids=stop,
    )
    rank, world = _check_shard(shard)
    lora, request = {}, {}
    if adapter is not None:
        from vllm.lora.request import LoRARequest

        lora = {"enable_lora": True, "max_lora_rank": vllm_lora_rank(adapter)}
        lora_id = _VLLM_LORA_IDS.setdefault(str(adapter), len(_VLLM_LORA_IDS) + 1)  # vLLM caches adapters by id
        request = {"lora_request": LoRARequest(f"adapter-{lora_id}", lora_id, str(adapter))}
    key = (str(model_dir), dtype, tuple(sorted(lora.items())))
    if key not in _VLLM_ENGINE:
        release_vllm()  # one engine at a time: a second would not fit beside the first in GPU memory
        _VLLM_ENGINE[key] = LLM(model=str(model_dir), dtype=dtype, seed=0, trust_remote_code=False, **lora)
    llm = _VLLM_ENGINE[key]
    mine = list(range(rank, len(sources), world))
    prompts = source_prompts(tokenizer, [sources[i] for i in mine], g.max_source_tokens, prompt=prompt)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=progress, **request)
    seconds = time.perf_counter() - start
    hyps: list[str | None] = [None] * len(sources)
    for i, o in zip(mine, outputs, strict=True):
        hyps[i] = strip_output(o.outputs[0].text)
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    return TranslationResult(hyps, [[] if h is None else [h] for h in hyps], generated, seconds)


_VLLM_ENGINE: dict[tuple, Any] = {}  # this process's vLLM engine, reused by the next call on the same weights
_VLLM_LORA_IDS: dict[str, int] = {}


def release_vllm() -> None:
    """Shut down this process's vLLM engine, if any, and hand its GPU memory back (to the next stage's training, or
    to an engine on other weights). vLLM starts in tens of seconds, so the label shards of one stage share one
    engine; every stage releases it when done."""
    if not _VLLM_ENGINE:
        return
    _VLLM_ENGINE.clear()
    _VLLM_LORA_IDS.clear()
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM's LoRAConfig accepts


def vllm_lora_rank(adapter: str | Path) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds the adapter's rank (``r`` in adapter_config.json)."""
    path = Path(adapter) / "adapter_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        rank = max([int(config["r"]), *(int(r) for r in (config.get("rank_pattern") or {}).values())])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DistillmtError(f"{path}: not a readable LoRA adapter config ({e})") from None
    fits = [r for r in VLLM_LORA_RANKS if r >= rank]
    if not fits:
        raise DistillmtError(f"{path}: LoRA rank {rank} is above vLLM's largest, {VLLM_LORA_RANKS[-1]}")
    return fits[0]
