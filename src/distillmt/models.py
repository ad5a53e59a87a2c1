"""Loading, building and saving models and tokenizers: hub ids, local folders, the model store, models built from a
config for training from scratch, BPE tokenizers trained on the data, and LoRA adapters through peft.

Weights are read and written as safetensors only, and remote code is never trusted.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NoReturn

import torch

from distillmt.errors import DistillmtError

log = logging.getLogger("distillmt.models")

SPECIAL_TOKENS = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>", "bos_token": "<s>"}


def available_devices() -> list[str]:
    """The device names that work on this machine, for error messages: auto, cpu, cuda / cuda:N, mps."""
    names = ["auto", "cpu"]
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        names += ["cuda"] + [f"cuda:{i}" for i in range(n)]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        names.append("mps")
    return names


def pick_device(name: str = "auto") -> torch.device:
    """``name`` as a torch device, refused at once (with what is available) when this machine does not have it: torch
    would otherwise fail later, deep inside model loading, with a traceback."""
    if name != "auto":
        available = ", ".join(available_devices())
        try:
            device = torch.device(name)
        except (RuntimeError, ValueError, TypeError):
            raise DistillmtError(f"device {name!r} is not a device name; available here: {available}") from None
        if device.type == "cpu":
            return device
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise DistillmtError(
                    f"device {name!r} is not available: no CUDA GPU found; available here: {available}"
                )
            count = torch.cuda.device_count()
            if device.index is not None and device.index >= count:
                raise DistillmtError(
                    f"device {name!r} is not available: this machine has {count} CUDA GPU(s) "
                    f"(cuda:0 to cuda:{count - 1}); available here: {available}"
                )
            return device
        if device.type == "mps":
            if "mps" not in available_devices():
                raise DistillmtError(f"device {name!r} is not available on this machine; available here: {available}")
            return device
        raise DistillmtError(f"device {name!r} is not supported; use one of: {available}")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(name: str, device: torch.device, *, scratch: bool) -> torch.dtype:
    """auto: fp32 for models trained from scratch (tiny, and bf16 hurts their optimisation); bf16 for pretrained
    models, where it halves memory and, on CPUs with native bf16 (avx512_bf16, AMX), more than doubles generation
    speed; fp32 on a CPU without it, where bf16 is emulated and slower."""
    if name == "auto":
        if scratch:
            return torch.float32
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            return torch.float16
        from distillmt.engines import cpu_has_bf16

        if device.type == "cpu" and not cpu_has_bf16():
            return torch.float32
        return torch.bfloat16
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def resolve_ref(ref: str) -> str:
    """store:NAME → the imported folder; hub ids and local folders unchanged."""
    if ref.startswith("store:"):
        from distillmt.store import resolve_model

        return resolve_model(ref)
    return ref


_HUB_REACHABLE: bool | None = None


def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP probe of the hub per process, so an offline machine fails in seconds instead of retrying for a
    minute inside huggingface_hub."""
    global _HUB_REACHABLE
    if _HUB_REACHABLE is None:
        import os
        import socket
        from urllib.parse import urlparse

        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
            _HUB_REACHABLE = False
        else:
            host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
            try:
                socket.create_connection((host, 443), timeout=timeout).close()
                _HUB_REACHABLE = True
            except OSError:
                _HUB_REACHABLE = False
    return _HUB_REACHABLE


def check_loadable(ref: str) -> None:
    """Raise a clear DistillmtError now if ``ref`` is neither a local folder, nor in the HF cache, nor reachable."""
    if Path(ref).exists() or hub_reachable():
        return
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(ref, "config.json"), str):
            return
    except Exception:  # a malformed repo id is simply "not cached"
        pass
    raise _hub_error(ref, ConnectionError("hub unreachable"))


def _hub_error(ref: str, err: Exception) -> DistillmtError:
    if Path(ref).exists():
        return DistillmtError(f"could not load '{ref}': {type(err).__name__}: {str(err).splitlines()[0]}")
    return DistillmtError(
        f"could not load model '{ref}': it is not a local folder and the Hugging Face hub did not answer "
        f"({type(err).__name__}). Offline, import a model with `distillmt models import NAME` and use store:NAME, "
        "or point to a local folder."
    )


# The class a tokenizer saved as its own tokenizer.json declares (a BPE tokenizer distillmt trained is one).
GENERIC_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(ref: str) -> Any:
    """A tokenizer from a hub id, a local folder or store:NAME. A local folder whose tokenizer_config.json declares
    the generic class loads as that class: AutoTokenizer would load it beside a Qwen2 model's config.json (an exported
    or trained scratch model's folder) as Qwen2's own tokenizer, whose pre-tokenizer replaces the trained one (numbers
    split digit by digit), so prompts with numbers would tokenize unlike the run's."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = resolve_ref(ref)
    check_loadable(path)
    try:
        declared = _declared_tokenizer_class(path)
        if declared in GENERIC_TOKENIZERS and (Path(path) / "tokenizer.json").is_file():
            tok = PreTrainedTokenizerFast.from_pretrained(path)
        else:
            tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise _hub_error(path, e) from None
    if tok.pad_token is None:
        # Qwen has no pad token of its own; EOS as pad is safe because labels mask padding by position, not by id.
        tok.pad_token = tok.eos_token
    return tok


def _declared_tokenizer_class(path: str) -> str | None:
    """The ``tokenizer_class`` a local folder's tokenizer_config.json declares, or None."""
    import json

    try:
        config = json.loads((Path(path) / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config.get("tokenizer_class") if isinstance(config, dict) else None


def load_model(
    ref: str, *, dtype: torch.dtype, device: torch.device, adapter: str | Path | None = None, merge: bool = False
) -> Any:
    """A causal LM from a hub id, a local folder or store:NAME; with ``adapter``, a saved LoRA adapter on top of it.

    ``merge`` folds the adapter into the weights in memory (nothing is written): for inference only, where the
    unmerged adapter's extra matmuls and dtype casts cost more than the merge itself."""
    from transformers import AutoModelForCausalLM

    if adapter is not None:
        check_adapter_dir(adapter)
    path = resolve_ref(ref)
    check_loadable(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=False, use_safetensors=True)
    except Exception as e:
        _raise_load_error(path, e)
    if adapter is not None:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, str(adapter))
        except Exception as e:
            _raise_load_error(str(adapter), e)
        if merge:
            # The model object that went through peft decodes much slower on CPU (same weights, same forward speed,
            # slow inside generate), while a freshly loaded copy holding the merged weights does not: so only the
            # merged weights are kept.
            merged = model.merge_and_unload().state_dict()
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, trust_remote_code=False, use_safetensors=True
            )
            model.load_state_dict(merged)
            del merged
    return model.to(device)


def _raise_load_error(path: str, err: Exception) -> NoReturn:
    """Why ``path`` did not load, as one line naming the file where it is a damaged weights file (safetensors and
    transformers would otherwise raise their own errors without the path); other errors as before."""
    damaged = damaged_safetensors(path)
    if damaged is not None:
        raise damaged from None
    if isinstance(err, (OSError, ValueError)):
        raise _hub_error(path, err) from None
    raise err


def damaged_safetensors(folder: str | Path) -> DistillmtError | None:
    """The error to raise for the first ``*.safetensors`` file of ``folder`` whose header does not read or whose size
    disagrees with its header (a truncated or overwritten file), or None. Only headers are read."""
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors")) if Path(folder).is_dir() else []
    for file in files:
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except Exception as e:  # safetensors' own error type, or an OSError reading the file
            return _damaged_error(file, e)
    return None


def _damaged_error(file: Path, err: Exception) -> DistillmtError:
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return DistillmtError(f"{file} is damaged or not a safetensors file ({reason}): re-export or re-download it")


def check_adapter_dir(path: str | Path, what: str = "adapter") -> None:
    """Refuse at once a LoRA adapter folder that does not exist or holds no adapter_config.json (peft would otherwise
    take the path for a hub id, retry the hub for half a minute and end in a traceback)."""
    p = Path(path)
    if not p.exists():
        raise DistillmtError(f"{what} {path}: folder not found")
    if not p.is_dir():
        raise DistillmtError(f"{what} {path}: not a folder (a LoRA adapter is a folder with adapter_config.json)")
    if not (p / "adapter_config.json").is_file():
        raise DistillmtError(f"{what} {path}: not a LoRA adapter folder (no adapter_config.json)")


def load_trained(
    base_ref: str, trained_dir: str | Path, *, dtype: torch.dtype, device: torch.device, merge: bool = False
) -> Any:
    """What a training stage saved: a LoRA adapter (loaded on its base model, no merged copy on disk) or full weights."""
    trained_dir = Path(trained_dir)
    if (trained_dir / "adapter_config.json").exists():
        return load_model(base_ref, dtype=dtype, device=device, adapter=trained_dir, merge=merge)
    return load_model(str(trained_dir), dtype=dtype, device=device)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path) -> Any:
    """Byte-level BPE (as Qwen's) trained on the given texts: no unknown characters, Chinese merges into whole
    characters and words once they are frequent."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    _interruptible(lambda: tok.train_from_iterator(texts, trainer=trainer), "BPE training")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
    fast.save_pretrained(str(out_dir))
    return fast


def _interruptible(fn: Any, name: str) -> None:
    """Run ``fn`` in a worker thread while this one waits in short joins: a long call into Rust (tokenizers) holds
    the main thread where no signal handler runs, so Ctrl-C or SIGTERM (KeyboardInterrupt) would wait for its end.
    The worker is a daemon: an interrupted process exits without it. Its exception, if any, is raised here."""
    import threading

    failed: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as e:  # handed to the waiting thread, which raises it
            failed.append(e)

    worker = threading.Thread(target=run, name=name, daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.2)
    if failed:
        raise failed[0]


def build_scratch_model(
    tokenizer: Any,
    *,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    intermediate_size: int,
    max_positions: int = 512,
    seed: int = 0,
) -> Any:
    """A Qwen2-architecture model built from its config, randomly initialised (seeded), tied embeddings."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


def apply_lora(model: Any, *, r: int, alpha: int, dropout: float, target_modules: list[str]) -> Any:
    from peft import LoraConfig, get_peft_model

    names = {n.split(".")[-1] for n, _ in model.named_modules()}
    missing = [m for m in target_modules if m not in names]
    if missing:
        raise DistillmtError(
            f"LoRA target modules not found in the model: {missing}; the model has e.g. {sorted(names)[:12]}"
        )
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type="CAUSAL_LM"
    )
    return get_peft_model(model, config)


class MergedCopy:
    """A plain transformers copy of a LoRA model's current weights, each adapter merged as peft merges it (the same
    in-place add, so the same rounding as the row's merged model): for generation while the model trains, since the
    peft-wrapped model decodes several times slower on a CPU (see :func:`load_model`). ``base()`` loads the base model
    once; each call writes the adapted weights in again and returns the copy; the model passed in is left as it is.
    Only the adapted layers are written: the rest of a LoRA model is frozen, so the copy's base weights stay its own."""

    def __init__(self, base: Callable[[], Any]):
        self.base, self.plain = base, None

    @torch.no_grad()
    def __call__(self, model: Any) -> Any:
        from peft.tuners.lora import LoraLayer

        trained = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
        if trained:
            raise DistillmtError(f"MergedCopy merges LoRA adapters only; these weights train too: {trained[:3]}")
        if self.plain is None:
            self.plain = self.base().eval()
        params = dict(self.plain.named_parameters())
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer):
                weight = params[name.removeprefix("base_model.model.") + ".weight"]
                weight.copy_(module.get_base_layer().weight)
                for adapter in module.active_adapters:
                    weight += module.get_delta_weight(adapter)
        return self.plain


def save_trained(model: Any, tokenizer: Any, out_dir: str | Path, state_dict: dict | None = None) -> None:
    """Adapter only for a peft model, full weights otherwise; safetensors either way; tokenizer beside it.
    ``state_dict``: the weights to write instead of the model's own (those gathered from FSDP's shards)."""
    from distillmt.io import disk_full_error

    try:
        model.save_pretrained(str(out_dir), safe_serialization=True, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out_dir))
    except Exception as e:
        # safetensors reports a full disk in its own error type, without the path
        full = disk_full_error(e, out_dir)
        if full is not None:
            raise full from e
        raise


def count_parameters(model: Any) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}


def saved_parameter_count(folder: str | Path) -> int | None:
    """The parameters of a saved model, from its safetensors headers (nothing is loaded); None where the folder holds
    no safetensors (a hub id). A tied output layer is stored once, so it counts once, as in :func:`count_parameters`."""
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors")) if Path(folder).is_dir() else []
    if not files:
        return None
    total = 0
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    total += math.prod(f.get_slice(name).get_shape())
        except Exception as e:  # safetensors' own error type, or an OSError reading the file
            raise _damaged_error(file, e) from None
    return total


def tokenizer_difference(teacher_tok: Any, student_tok: Any) -> str | None:
    """How two tokenizers' vocabularies differ (token strings and ids), or None when they are the same. The
    tokenizers are compared, not the models' embedding matrices: Qwen2.5-7B's 152,064 rows and 0.5B's 151,936
    share one tokenizer, the padding rows being no tokens."""
    tv, sv = teacher_tok.get_vocab(), student_tok.get_vocab()
    if tv == sv:
        return None
    only_t = len(set(tv) - set(sv))
    only_s = len(set(sv) - set(tv))
    moved = sum(1 for k in set(tv) & set(sv) if tv[k] != sv[k])
    return (
        f"{len(tv)} vs {len(sv)} tokens; {only_t} only in the teacher, {only_s} only in the student, {moved} with "
        "different ids"
    )


def check_same_tokenizer(teacher_tok: Any, student_tok: Any) -> None:
    """Logit KD compared token by token needs one vocabulary: the two tokenizers must be identical."""
    difference = tokenizer_difference(teacher_tok, student_tok)
    if difference is not None:
        raise DistillmtError(
            f"teacher and student tokenizers differ ({difference}): logit KD token by token needs a shared "
            "tokenizer (soft_kd.cross_tokenizer=uld distils between different ones)"
        )
