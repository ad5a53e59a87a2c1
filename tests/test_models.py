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

    monkeypatch.setattr(threading.Thread, "join", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_bpe_tokenizer(["hello world"] * 50, 300, tmp_path / "stopped")
    assert not (tmp_path / "stopped").exists()  # nothing saved from an interrupted training
