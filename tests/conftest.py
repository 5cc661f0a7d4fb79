"""Shared fixtures: tiny randomly initialised models (Llama with GQA, OPT) that run in milliseconds."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tiny_llama(num_layers: int = 6, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_opt(num_layers: int = 5, seed: int = 0):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    cfg = OPTConfig(
        vocab_size=97, hidden_size=32, ffn_dim=64, num_hidden_layers=num_layers, num_attention_heads=4,
        max_position_embeddings=256, word_embed_proj_dim=32, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return OPTForCausalLM(cfg).eval()


@pytest.fixture(params=["llama", "opt"])
def hf_model(request):
    return tiny_llama() if request.param == "llama" else tiny_opt()


@pytest.fixture
def llama():
    return tiny_llama()
