"""Model helpers: LoRA adapters save/load, merging for inference keeps the outputs, tokenizer checks."""

import pytest
import torch
from conftest import build_tiny_qwen

from distillmt.errors import DistillmtError
from distillmt.models import apply_lora, check_same_tokenizer, load_trained, save_trained, train_bpe_tokenizer

pytestmark = pytest.mark.unit


def test_saved_adapter_loads_unmerged_and_merged_with_same_logits(tmp_path):
    base = build_tiny_qwen(50, num_layers=2, max_positions=32)
    base.save_pretrained(tmp_path / "base")
    model = apply_lora(base, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    with torch.no_grad():  # a non-trivial adapter (B starts at zero)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    model.eval()
    x = torch.randint(0, 50, (2, 7))
    expected = model(x).logits
    save_trained(model, None, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    for merge in (False, True):
        loaded = load_trained(
            str(tmp_path / "base"), tmp_path / "adapter", dtype=torch.float32, device=torch.device("cpu"), merge=merge
        ).eval()
        assert torch.allclose(loaded(x).logits, expected, atol=1e-5)
        assert type(loaded).__name__ == ("Qwen2ForCausalLM" if merge else "PeftModelForCausalLM")


def test_lora_on_missing_modules_is_a_clear_error():
    with pytest.raises(DistillmtError, match="c_attn"):
        apply_lora(build_tiny_qwen(20, hidden_size=8), r=2, alpha=4, dropout=0.0, target_modules=["c_attn"])


def test_different_tokenizers_are_refused_before_kd(tmp_path):
    a = train_bpe_tokenizer(["hello world", "你好世界"] * 20, 300, tmp_path / "a")
    b = train_bpe_tokenizer(["completely other text", "再见"] * 20, 300, tmp_path / "b")
    check_same_tokenizer(a, a)
    with pytest.raises(DistillmtError, match="tokenizers differ"):
        check_same_tokenizer(a, b)


def test_bpe_training_waits_interruptibly_and_passes_on_the_workers_error(tmp_path, monkeypatch):
    """The tokenizer trains in a worker thread while the main thread waits in short joins, where Ctrl-C or SIGTERM
    (KeyboardInterrupt) is raised at once; an error inside the training reaches the caller."""
    import threading

    from distillmt.models import train_bpe_tokenizer

    def texts():
        yield "hello world"
        raise ValueError("bad text")

    with pytest.raises(ValueError, match="bad text"):
        train_bpe_tokenizer(texts(), 300, tmp_path / "bad")
    real_join = threading.Thread.join

    def interrupted(self, timeout=None):
        if self.name == "BPE training":
            raise KeyboardInterrupt
        return real_join(self, timeout)

    real_alive = threading.Thread.is_alive
    monkeypatch.setattr(threading.Thread, "join", interrupted)
    # still running when the wait starts, however fast this machine trains 50 words (else no join, no interrupt)
    monkeypatch.setattr(threading.Thread, "is_alive", lambda self: self.name == "BPE training" or real_alive(self))
    with pytest.raises(KeyboardInterrupt):
        train_bpe_tokenizer(["hello world"] * 50, 300, tmp_path / "stopped")
    assert not (tmp_path / "stopped").exists()  # nothing saved from an interrupted training


@pytest.mark.parametrize(
    ("flags", "native"),
    [
        ("fpu avx512f avx512_bf16 avx512_vnni", True),  # AMD EPYC of this project's machines
        ("fpu avx512f amx_bf16 amx_int8 amx_tile", True),  # Intel Xeon with AMX
        ("fpu avx2 fma", False),  # an older x86 CPU: bf16 would be emulated
        ("fp asimd bf16 i8mm", True),  # arm64 (Graviton 3, Apple M2)
    ],
)
def test_auto_dtype_gives_pretrained_models_bf16_only_on_cpus_that_compute_it(monkeypatch, flags, native):
    import torch

    from distillmt import engines
    from distillmt.models import pick_dtype

    monkeypatch.setattr(engines, "_cpuinfo", lambda: ("some CPU", set(flags.split())))
    cpu = torch.device("cpu")
    assert engines.cpu_has_bf16() is native
    assert pick_dtype("auto", cpu, scratch=False) == (torch.bfloat16 if native else torch.float32)
    assert pick_dtype("auto", cpu, scratch=True) == torch.float32
    assert pick_dtype("bfloat16", cpu, scratch=False) == torch.bfloat16  # a dtype set by hand is kept


def test_cpu_flags_are_read_from_this_machine():
    from distillmt.engines import _cpuinfo, cpu_name

    model, flags = _cpuinfo()
    assert model and cpu_name().startswith(model)
