import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def build_tiny_qwen(
    vocab_size: int = 40,
    *,
    hidden_size: int = 16,
    num_layers: int = 1,
    intermediate_size: int = 32,
    max_positions: int = 64,
    seed: int = 0,
    **config,
):
    """A randomly initialised (seeded) Qwen2 causal LM small enough for a unit test, built offline from its config."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=max_positions,
        **config,
    )
    return Qwen2ForCausalLM(cfg)


@pytest.fixture(scope="session")
def tiny_qwen():
    """The :func:`build_tiny_qwen` factory, for tests that build several models."""
    return build_tiny_qwen
