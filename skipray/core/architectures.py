"""Architecture adapters: what differs between model families, one small class per family.

Contract: a family class is built from a Hugging Face causal LM and gives ``skipray.core.model.SkipModel``
the pieces of one decoder pass, each calling the Hugging Face module's own submodules (so LoRA and
``save_pretrained`` keep working): ``embed(tokens, positions)``, ``rope(h, positions)`` (``(cos, sin)``
or ``None``), ``attn_norm``, ``qkv`` (q, k, v as ``(b, heads, t, head_dim)`` and the attention scale),
``attn_out``, ``mlp`` and ``final`` (the norm before the lm_head); the attention shape (``num_heads``,
``kv_heads``, ``head_dim``); and ``linear_groups(layer)``: the tuples of linear layers that read one input,
exactly as those methods hand them to ``linears``. Linear layers go through the ``linears`` the model passes
in (a tuple of modules that read the same input -> their outputs, the skip adapter where ``adapter`` marks:
``skipray.core.weights.InferenceWeights``, built once, or the modules themselves through
``skipray.core.lora.masked_lora``). Adding a family means one class here and one ``FAMILIES`` entry.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# SkipModel.linears(): (modules that read one input, the input, the adapter mask) -> their outputs
Linears = Callable[[tuple[nn.Module, ...], torch.Tensor, "torch.Tensor | None"], list[torch.Tensor]]


HF_RMS_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"}


def rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` for a Hugging Face RMSNorm of the Llama family (Zhang & Sennrich 2019, arXiv 1910.07467:
    ``x / sqrt(mean(x^2) + eps) * weight``), in fp32 as one ``F.rms_norm`` instead of the module's eight
    tensor ops (the same numbers). Other dtypes and norm modules: ``norm(x)`` (in bf16 Hugging Face rounds
    the normalized value before the weight multiply, which ``F.rms_norm`` does not)."""
    if x.dtype != torch.float32 or type(norm).__name__ not in HF_RMS_NORMS:
        return norm(x)
    w = norm._parameters["weight"]  # not norm.weight: nn.Module.__getattr__ costs more than the norm's arithmetic
    return F.rms_norm(x, w.shape, w, norm.variance_epsilon)


def rope_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, signed_sin)`` for ``apply_rope``: ``signed_sin`` is ``sin`` with its first half negated."""
    half = sin.shape[-1] // 2
    return cos, torch.cat((-sin[..., :half], sin[..., half:]), -1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (RoFormer, Su et al. 2021, arXiv 2104.09864, eq. 34) in Hugging Face's
    half-split layout: ``x * cos + rotate_half(x) * sin``, where ``rotate_half(x) = cat(-x2, x1)``. As
    ``roll(x, d/2) * signed_sin`` is ``cat(x2 * -sin1, x1 * sin2)``, the same numbers (a sign flip is
    exact), it costs four tensor ops instead of six, once per layer for q and k."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


class LlamaFamily:
    """Llama family (Llama, SmolLM2, Mistral, Qwen2/3): RoPE, RMSNorm before attention and MLP, a gated
    MLP, Qwen3's q/k norms. Every method calls the Hugging Face module's own submodules."""

    def __init__(self, hf: nn.Module) -> None:
        cfg = hf.config
        self.body = hf.model
        self.num_heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.qk_norm = hasattr(hf.model.layers[0].self_attn, "q_norm")  # Qwen3
        self.silu = getattr(cfg, "hidden_act", None) == "silu"  # F.silu, not the module (a call's overhead per layer)

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.body.embed_tokens(tokens)

    def linear_groups(self, layer: nn.Module) -> list[tuple[nn.Module, ...]]:
        attn, mlp = layer.self_attn, layer.mlp
        return [(attn.q_proj, attn.k_proj, attn.v_proj), (attn.o_proj,), (mlp.gate_proj, mlp.up_proj), (mlp.down_proj,)]

    def rope(self, h: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        cos, sin = self.body.rotary_emb(h, positions)
        return cos[:, None], sin[:, None]

    def attn_norm(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(layer.input_layernorm, x)

    def qkv(self, layer: nn.Module, x: torch.Tensor, linears: Linears, adapter: torch.Tensor | None):
        """Normed input ``(b, t, d)`` -> q, k, v as ``(b, heads, t, head_dim)`` and the attention scale."""
        attn, (b, t, _) = layer.self_attn, x.shape
        q, k, v = (
            y.view(b, t, -1, self.head_dim) for y in linears((attn.q_proj, attn.k_proj, attn.v_proj), x, adapter)
        )
        v = v.transpose(1, 2)
        if self.qk_norm:
            q, k = attn.q_norm(q), attn.k_norm(k)
        return q.transpose(1, 2), k.transpose(1, 2), v, attn.scaling

    def attn_out(
        self, layer: nn.Module, o: torch.Tensor, linears: Linears, adapter: torch.Tensor | None
    ) -> torch.Tensor:
        return linears((layer.self_attn.o_proj,), o, adapter)[0]

    def mlp(self, layer: nn.Module, x: torch.Tensor, linears: Linears, adapter: torch.Tensor | None) -> torch.Tensor:
        mlp, x = layer.mlp, rms_norm(layer.post_attention_layernorm, x)
        gate, up = linears((mlp.gate_proj, mlp.up_proj), x, adapter)
        return linears((mlp.down_proj,), (F.silu(gate) if self.silu else mlp.act_fn(gate)) * up, adapter)[0]

    def final(self, h: torch.Tensor) -> torch.Tensor:
        """The final norm (the lm_head is the model's)."""
        return rms_norm(self.body.norm, h)


class OPTFamily:
    """OPT (pre-layer-norm variants): learned positions (offset 2), LayerNorms, q scaled before the product
    as Hugging Face does, fc1/fc2 MLP, optional input/output projections."""

    def __init__(self, hf: nn.Module) -> None:
        cfg = hf.config
        if not cfg.do_layer_norm_before:
            raise ValueError("OPT variants with post-layer-norm (opt-350m) are not supported")
        self.body = hf.model.decoder
        self.num_heads = self.kv_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = self.body.embed_tokens(tokens)
        if self.body.project_in is not None:
            h = self.body.project_in(h)
        pos = self.body.embed_positions
        return h + F.embedding(positions.clamp(min=0) + pos.offset, pos.weight)

    def rope(self, h: torch.Tensor, positions: torch.Tensor) -> None:
        return None

    def linear_groups(self, layer: nn.Module) -> list[tuple[nn.Module, ...]]:
        attn = layer.self_attn
        return [(attn.q_proj, attn.k_proj, attn.v_proj), (attn.out_proj,), (layer.fc1,), (layer.fc2,)]

    def attn_norm(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return layer.self_attn_layer_norm(x)

    def qkv(self, layer: nn.Module, x: torch.Tensor, linears: Linears, adapter: torch.Tensor | None):
        attn, (b, t, _) = layer.self_attn, x.shape
        q, k, v = (
            y.view(b, t, -1, self.head_dim) for y in linears((attn.q_proj, attn.k_proj, attn.v_proj), x, adapter)
        )
        v = v.transpose(1, 2)
        return (q * attn.scaling).transpose(1, 2), k.transpose(1, 2), v, 1.0

    def attn_out(
        self, layer: nn.Module, o: torch.Tensor, linears: Linears, adapter: torch.Tensor | None
    ) -> torch.Tensor:
        return linears((layer.self_attn.out_proj,), o, adapter)[0]

    def mlp(self, layer: nn.Module, x: torch.Tensor, linears: Linears, adapter: torch.Tensor | None) -> torch.Tensor:
        h = linears((layer.fc1,), layer.final_layer_norm(x), adapter)[0]
        return linears((layer.fc2,), layer.activation_fn(h), adapter)[0]

    def final(self, h: torch.Tensor) -> torch.Tensor:
        if self.body.final_layer_norm is not None:
            h = self.body.final_layer_norm(h)
        if self.body.project_out is not None:
            h = self.body.project_out(h)
        return h


FAMILIES = {
    "llama": LlamaFamily,
    "mistral": LlamaFamily,
    "qwen2": LlamaFamily,
    "qwen3": LlamaFamily,
    "opt": OPTFamily,
}  # Hugging Face model_type -> its family
