"""COMET (Rei et al., 2020; wmt22-comet-da, 2022) through Unbabel's own ``unbabel-comet`` package.

The scores are the library's: its model classes, its tokenisation, pooling and estimator, its ``predict``. What is
done here, and why:

* **Loading.** A COMET checkpoint is a folder with ``hparams.yaml`` and ``checkpoints/model.ckpt`` (a Lightning
  checkpoint). ``comet.load_from_checkpoint`` hands the file to Lightning, which unpickles it with whatever
  ``torch.load`` defaults to; here the model is built from its hyper-parameters by COMET's own class and the weights
  come from ``torch.load(weights_only=True)``: a checkpoint that holds anything but tensors and plain data is refused,
  never executed. The weights in the checkpoint include the encoder's, so only its config and tokenizer are read from
  ``pretrained_model`` (``xlm-roberta-large`` for wmt22-comet-da), never its weights, and never remote code.
* **Offline.** The encoder's config and tokenizer are looked up in ``<checkpoint folder>/<pretrained_model>/`` first
  (so one folder carries everything), then in the Hugging Face cache, then on the hub. A hub id with no hub and
  nothing cached is refused by :func:`check` before any work, saying what was tried.
* **transformers 5.** COMET's XLM-R encoder unpacks three values (hidden states, pooler, all layers) from the
  model's tuple output; transformers 5 leaves the absent pooler out of the tuple, so that line fails. The encoder's
  ``forward`` is replaced, on the loaded model only, by the same computation through the model's named outputs
  (:func:`_named_outputs_forward`). unbabel-comet 2.2.7 (the newest) declares ``transformers<5``, ``numpy<2`` and
  ``torchmetrics<0.11``; it runs with the versions distillmt pins, so it is installed with ``--no-deps`` next to
  its other dependencies (the ``comet`` extra).
* **Scores.** COMET's convention: each segment's score as the model outputs it, the system score their mean (what
  ``comet-score`` prints), not scaled to 0–100. Being a mean of sentence scores, it gets the same paired bootstrap,
  CIs and significance tests as BERTScore.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import types
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distillmt.errors import DistillmtError
from distillmt.io import file_sha256

log = logging.getLogger("distillmt.comet")

PACKAGE = "unbabel-comet"
VERSION = "2.2.7"  # the version the comet extra installs and the tests run
INSTALL = f"pip install 'distillmt[comet]' && pip install --no-deps {PACKAGE}=={VERSION}"
# Reference-based regression models (wmt20/21/22-comet-da) are what distillmt runs and tests; the unified models
# (XCOMET, CometKiwi-XL) go through encoder code that transformers 5 breaks further.
SUPPORTED = ("regression_metric", "referenceless_regression_metric")
CHECKPOINT = Path("checkpoints") / "model.ckpt"
HPARAMS = "hparams.yaml"
DOWNLOAD_HINT = "download the checkpoint on a machine with the hub and set eval.comet_model to its folder"


@dataclass(frozen=True)
class Checkpoint:
    """A COMET checkpoint found on this machine: what the user named, its folder, and where its encoder's config and
    tokenizer come from (a folder, or a hub id read from the cache or the hub)."""

    name: str
    folder: Path
    encoder: str
    encoder_offline: bool  # the encoder files are local (folder or cache): no hub call

    @property
    def checkpoint(self) -> Path:
        return self.folder / CHECKPOINT


@dataclass(frozen=True)
class Scores:
    """Segment scores in input order, their mean, and the signature that says how they were made."""

    segments: list[float]
    system: float
    signature: str
    checkpoint_sha256: str


def require() -> str:
    """The installed unbabel-comet version; a DistillmtError saying how to install it when it is missing."""
    if importlib.util.find_spec("comet") is None or importlib.util.find_spec("pytorch_lightning") is None:
        raise DistillmtError(f"COMET needs the {PACKAGE} package, which is not installed: {INSTALL}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(PACKAGE)
    except PackageNotFoundError:  # another package named comet (a VOEvent broker has that name on PyPI)
        raise DistillmtError(f"the installed 'comet' module is not {PACKAGE}: {INSTALL}") from None


def check(model: str) -> None:
    """Fail in seconds, before any stage, when COMET cannot run with ``model`` (``eval.comet_model``): the package is
    missing, a local folder lacks the checkpoint files, or a hub id is neither cached nor reachable. A hub id that is
    not cached but reachable passes (the evaluate stage downloads it)."""
    require()
    resolve(model, download=False)


def resolve(model: str, *, download: bool = True) -> Checkpoint | None:
    """The checkpoint ``model`` names: a local folder (or its ``checkpoints/model.ckpt``), else a hub id in the
    Hugging Face cache, else (``download``) from the hub. None when it is on the hub but ``download`` is False."""
    from distillmt.models import hub_reachable

    path = Path(model).expanduser()
    if path.is_file() and path.name == CHECKPOINT.name:
        path = path.parents[1]
    if path.exists():
        return _checkpoint(model, path, download=download)
    if _looks_like_a_path(model):
        raise DistillmtError(f"eval.comet_model = {model!r}: no such folder")
    cached = _cached_snapshot(model)
    if cached is not None:
        return _checkpoint(model, cached, download=download)
    if not hub_reachable():
        raise DistillmtError(
            f"eval.comet_model = {model!r}: not a local folder, not in the Hugging Face cache, and the hub cannot be "
            f"reached (HF_HUB_OFFLINE or no network); {DOWNLOAD_HINT} (it holds {HPARAMS} and {CHECKPOINT})"
        )
    if not download:
        return None
    from huggingface_hub import snapshot_download

    log.warning("downloading COMET checkpoint %s from the hub", model)
    return _checkpoint(model, Path(snapshot_download(repo_id=model)), download=download)


def _looks_like_a_path(model: str) -> bool:
    return model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model


def _cached_snapshot(repo_id: str) -> Path | None:
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id=repo_id, local_files_only=True))
    except Exception:  # not cached, or not a valid repo id: either way not here
        return None
    return folder if (folder / CHECKPOINT).is_file() else None


def _checkpoint(name: str, folder: Path, *, download: bool) -> Checkpoint:
    where = f"eval.comet_model = {name!r}" + ("" if str(folder) == name else f" ({folder})")
    for needed in (HPARAMS, CHECKPOINT):
        if not (folder / needed).is_file():
            raise DistillmtError(
                f"{where}: {needed} is missing; a COMET checkpoint folder holds {HPARAMS} and {CHECKPOINT}"
            )
    hparams = _read_hparams(folder)
    kind = hparams.get("class_identifier")
    if kind not in SUPPORTED:
        raise DistillmtError(f"{where}: class_identifier {kind!r} in {HPARAMS}; distillmt runs {', '.join(SUPPORTED)}")
    encoder, offline = _encoder_source(where, folder, str(hparams.get("pretrained_model", "xlm-roberta-large")))
    return Checkpoint(name=name, folder=folder, encoder=encoder, encoder_offline=offline)


def _read_hparams(folder: Path) -> dict[str, Any]:
    import yaml

    try:
        hparams = yaml.safe_load((folder / HPARAMS).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise DistillmtError(f"{folder / HPARAMS}: cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(hparams, dict):
        raise DistillmtError(f"{folder / HPARAMS}: not a mapping of hyper-parameters")
    return hparams


def _encoder_source(where: str, folder: Path, pretrained: str) -> tuple[str, bool]:
    """Where the encoder's config and tokenizer come from: ``<folder>/<pretrained_model>``, an existing path, the
    Hugging Face cache, or the hub; (source, offline)."""
    from distillmt.models import hub_reachable

    for candidate in (folder / pretrained, Path(pretrained).expanduser()):
        if (candidate / "config.json").is_file():
            return str(candidate), True
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = [try_to_load_from_cache(pretrained, f) for f in ("config.json", "tokenizer.json")]
    except Exception:  # a name that is no repo id is simply not cached
        cached = []
    if cached and all(isinstance(c, str) for c in cached):
        return pretrained, True
    if hub_reachable():
        return pretrained, False
    raise DistillmtError(
        f"{where}: its encoder '{pretrained}' ('pretrained_model' in {HPARAMS}; COMET reads its config and tokenizer, "
        f"the weights are in the checkpoint) is not in {folder / pretrained}, not in the Hugging Face cache, and the "
        f"hub cannot be reached; on a machine with the hub: hf download {pretrained} config.json tokenizer.json "
        f"tokenizer_config.json --local-dir {folder / pretrained}"
    )


_SHA256: dict[tuple[str, int, int], str] = {}


def checkpoint_sha256(path: Path) -> str:
    """SHA-256 of the checkpoint file, computed once per process and file version (a real one is 2 GB)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA256:
        _SHA256[key] = file_sha256(path)
    return _SHA256[key]


@contextmanager
def _quiet() -> Iterator[None]:
    """Lightning's banner (accelerator, tips) and its deprecation warnings on every predict; comet's own INFO
    lines; and ``import comet``'s ``logging.basicConfig``, which would reconfigure the application's root logger."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    names = ("pytorch_lightning", "lightning", "lightning_fabric", "lightning.pytorch", "comet")
    levels = {name: logging.getLogger(name).level for name in names}
    try:
        for name in names:
            logging.getLogger(name).setLevel(logging.WARNING)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", message=r".*(LeafSpec|num_workers|does not have many workers).*")
            yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, old in levels.items():
            logging.getLogger(name).setLevel(old)


def _named_outputs_forward(self: Any, input_ids: Any, attention_mask: Any, **kwargs: Any) -> dict[str, Any]:
    """COMET's ``XLMREncoder.forward`` (same inputs, same outputs), reading the model's named outputs instead of
    unpacking a tuple whose length changed in transformers 5."""
    out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, return_dict=True)
    return {
        "sentemb": out.last_hidden_state[:, 0, :],
        "wordemb": out.last_hidden_state,
        "all_layers": out.hidden_states,
        "attention_mask": attention_mask,
    }


def load(ckpt: Checkpoint) -> Any:
    """The COMET model of ``ckpt``, built by its own class from its hyper-parameters, with the checkpoint's weights
    loaded by ``torch.load(weights_only=True)``. A parameter the checkpoint lacks is an error (it would score with
    random weights); keys the model does not have (buffers older transformers saved) are ignored, as COMET does."""
    import torch

    path = ckpt.checkpoint
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DistillmtError(
            f"{path}: cannot be loaded with torch.load(weights_only=True), which distillmt requires "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None
    weights = state.get("state_dict", state) if isinstance(state, dict) else None
    if not isinstance(weights, dict):
        raise DistillmtError(f"{path}: holds no state_dict")
    hparams = _read_hparams(ckpt.folder)
    if isinstance(state.get("hyper_parameters"), dict):  # Lightning builds the model from the checkpoint's own
        hparams.update(state["hyper_parameters"])
    with _quiet():
        from comet.encoders.xlmr import XLMREncoder
        from comet.models import str2model

        cls = str2model[hparams["class_identifier"]]
        accepted = inspect.signature(cls.__init__).parameters
        kwargs = {k: v for k, v in hparams.items() if k in accepted}
        kwargs.update(pretrained_model=ckpt.encoder, load_pretrained_weights=False)
        kwargs["local_files_only"] = ckpt.encoder_offline
        model = cls(**kwargs)
        if type(model.encoder).forward is XLMREncoder.forward:
            model.encoder.forward = types.MethodType(_named_outputs_forward, model.encoder)
    result = model.load_state_dict(weights, strict=False)
    parameters = dict(model.named_parameters())
    missing = [k for k in result.missing_keys if k in parameters]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DistillmtError(f"{path}: the checkpoint lacks {len(missing)} weights of the model: {shown}")
    if result.unexpected_keys:
        log.info("%s: %d checkpoint keys the model has no use for (ignored)", path, len(result.unexpected_keys))
    return model.eval()


_LOADED: dict[tuple[Any, ...], Any] = {}


def _model(ckpt: Checkpoint) -> Any:
    """One loaded model per process (a run evaluates every row with the same one)."""
    stat = ckpt.checkpoint.stat()
    key = (str(ckpt.checkpoint.resolve()), stat.st_size, stat.st_mtime_ns, ckpt.encoder)
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = load(ckpt)
    return _LOADED[key]


def score(
    sources: list[str],
    hyps: list[str],
    refs: list[str] | None,
    *,
    model: str,
    batch_size: int = 16,
    device: str | None = None,
) -> Scores:
    """COMET scores of ``hyps`` (with their ``sources`` and ``refs``; a reference-free model takes None) through
    the model's own ``predict``: segment scores in input order and their mean. ``device``: ``cuda[:N]`` runs on
    that GPU, anything else on the CPU."""
    version = require()
    ckpt = resolve(model)
    assert ckpt is not None  # resolve downloads when it may
    if len(sources) != len(hyps) or (refs is not None and len(refs) != len(hyps)):
        raise DistillmtError(f"COMET: {len(sources)} sources, {len(hyps)} hypotheses and "
                             f"{len(refs) if refs is not None else 'no'} references: they must pair up")  # fmt: skip
    comet_model = _model(ckpt)
    needs_refs = comet_model.requires_references()
    if needs_refs and refs is None:
        raise DistillmtError(f"COMET model {model} scores against references, and none were given")
    samples = [{"src": s, "mt": h, **({"ref": r} if needs_refs else {})} for s, h, r in
               zip(sources, hyps, refs if refs is not None else hyps, strict=True)]  # fmt: skip
    gpus, devices = 0, None
    if device and device.startswith("cuda"):
        gpus, devices = 1, [int(device.split(":", 1)[1])] if ":" in device else None
    with _quiet():
        out = comet_model.predict(
            samples, batch_size=batch_size, gpus=gpus, devices=devices, progress_bar=False, num_workers=0
        )
    segments = [float(s) for s in out.scores]
    sha = checkpoint_sha256(ckpt.checkpoint)
    encoder = Path(ckpt.encoder).name if ckpt.encoder_offline and Path(ckpt.encoder).is_dir() else ckpt.encoder
    signature = f"model:{model}|sha256:{sha[:16]}|encoder:{encoder}|bs:{batch_size}|version:{version}"
    return Scores(segments=segments, system=sum(segments) / len(segments), signature=signature, checkpoint_sha256=sha)
