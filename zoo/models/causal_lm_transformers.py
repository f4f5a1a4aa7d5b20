"""A sliced ``slim_llama`` or ``slim_gpt2`` member as a transformers model: its ``config.json``
and its tensors under transformers' names, the mirror of the planners in ``causal_lm.py``.

The config is the source model's (recorded at conversion as ``metadata["transformers_config"]``:
its architecture, token ids, rope settings and every other field kept) with the member's sizes
written in: attention heads, key/value heads, head size, intermediate size, layers (fields
that hold one value per layer, ``layer_types``, keep the member's layers). A family built in
zoo, with no source, gets the config of its layout (``LlamaForCausalLM``, ``Qwen2ForCausalLM``
for q/k/v biases alone, ``GPT2LMHeadModel``).

A transformers config gives every layer the same sizes, so a member whose blocks differ in
heads or MLP units is refused in one line (it slices to zoo's own format and exports to ONNX).
GPT-2's attention fixes heads x head size to the width, so a GPT-2 member with fewer heads is
written with the dropped heads as zeros: a head whose queries, keys, values and output columns
are zero adds exactly nothing, so the folder computes the member. Low-rank layers are written
dense (``u @ v``). Nothing here imports transformers.
"""

from __future__ import annotations

import torch
from torch import nn

# zoo's module -> transformers' module inside block i of the Llama layout (Llama, Mistral, Qwen2)
LLAMA_NAMES = {
    "attn.q_proj": "self_attn.q_proj",
    "attn.k_proj": "self_attn.k_proj",
    "attn.v_proj": "self_attn.v_proj",
    "attn.o_proj": "self_attn.o_proj",
    "norm1": "input_layernorm",
    "norm2": "post_attention_layernorm",
    **{f"mlp.{p}": f"mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")},
}
# zoo's activation -> the name transformers' configs give it (Llama's, GPT-2's)
LLAMA_ACTIVATIONS = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
GPT2_ACTIVATIONS = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_new"}
PER_LAYER_FIELDS = ("layer_types",)  # config fields holding one value per layer


@torch.no_grad()
def dense(layer: nn.Module) -> torch.Tensor:
    """A linear layer's weight ``(out, in)``; a low-rank one's ``u @ v`` (a sliced member's
    factors are exactly its rank)."""
    if not getattr(layer, "low_rank", False):
        return layer.weight.detach()
    return (layer.u.double() @ layer.v.double()).float()


def _tensors(layer: nn.Module) -> dict[str, torch.Tensor]:
    """A layer's ``weight`` (dense) and ``bias`` if it has one."""
    found = {"weight": dense(layer) if hasattr(layer, "in_dim") else layer.weight.detach()}
    if getattr(layer, "bias", None) is not None:
        found["bias"] = layer.bias.detach()
    return found


def uniform_sizes(model: nn.Module, blocks: dict[int, nn.Module]) -> tuple[int, int, int]:
    """Query heads, key/value heads and MLP units, the same in every block (else a one-line error)."""
    sizes = {(b.attn.num_heads, b.attn.num_kv_heads, b.mlp.up_proj.active_out) for b in blocks.values()}
    if len(sizes) != 1:
        described = "; ".join(
            f"block {i}: {b.attn.num_heads} heads, {b.mlp.up_proj.active_out} MLP units" for i, b in blocks.items()
        )
        raise ValueError(
            f"{model.arch} member {model.largest}: its blocks differ ({described}); a transformers config.json gives "
            "every layer the same sizes: slice it to zoo's format (--out FILE.safetensors) or export it to ONNX"
        )
    return sizes.pop()


def _per_layer(config: dict, kept: list[int]) -> None:
    """Fields that hold one value per source layer (Qwen2's ``layer_types``) keep the member's layers."""
    for key in PER_LAYER_FIELDS:
        if isinstance(config.get(key), list):
            config[key] = [config[key][i] for i in kept]


def _base(source: dict | None, architecture: str, model_type: str) -> dict:
    config = dict(source or {"architectures": [architecture], "model_type": model_type})
    for key in ("_name_or_path", "torch_dtype", "transformers_version"):
        config.pop(key, None)
    config["dtype"] = "float32"
    return config


def llama_parts(model: nn.Module, blocks: dict[int, nn.Module], source: dict | None) -> tuple[dict, dict, None]:
    """``config.json`` and tensors of a Llama-layout member (Llama, Mistral, Qwen2); no note."""
    heads, kv_heads, units = uniform_sizes(model, blocks)
    first = next(iter(blocks.values()))
    qkv_bias, o_bias = first.attn.q_proj.bias is not None, first.attn.o_proj.bias is not None
    mlp_bias = first.mlp.up_proj.bias is not None
    qwen2 = qkv_bias and not o_bias and not mlp_bias  # Qwen2: biases on q, k and v alone
    if source is None and qkv_bias != o_bias and not qwen2:
        raise ValueError(f"{model.arch}: its biases (q/k/v, output, MLP) match no transformers architecture")
    config = _base(source, "Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM", "qwen2" if qwen2 else "llama")
    _per_layer(config, list(blocks))
    config.update(
        vocab_size=model.vocab_size,
        hidden_size=model.embed_dim,
        num_hidden_layers=len(blocks),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=model.head_dim,
        intermediate_size=units,
        max_position_embeddings=model.context_length,
        tie_word_embeddings=model.tie_embeddings,
    )
    rope = dict(config.get("rope_parameters") or {"rope_type": "default"})
    config["rope_parameters"] = {**rope, "rope_theta": model.rope_theta}
    config.pop("rope_theta", None)
    if source is None:
        config.update(rms_norm_eps=model.norm.eps, hidden_act=LLAMA_ACTIVATIONS[first.mlp.activation])
        if not qwen2:
            config.update(attention_bias=qkv_bias, mlp_bias=mlp_bias)
    tensors = {
        "model.embed_tokens.weight": model.tok_embed.weight.detach(),
        "model.norm.weight": model.norm.weight.detach(),
    }
    if not model.tie_embeddings:
        tensors["lm_head.weight"] = dense(model.lm_head)
    for j, block in enumerate(blocks.values()):
        for ours, theirs in LLAMA_NAMES.items():
            if ours == "mlp.gate_proj" and block.mlp.gate_proj is None:
                continue
            for name, tensor in _tensors(block.get_submodule(ours)).items():
                tensors[f"model.layers.{j}.{theirs}.{name}"] = tensor
    return config, tensors, None


def _padded(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` with zero rows appended up to ``rows``."""
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])]) if t.shape[0] < rows else t


def gpt2_parts(model: nn.Module, blocks: dict[int, nn.Module], source: dict | None) -> tuple[dict, dict, str | None]:
    """``config.json`` and tensors of a GPT-2 member (Conv1D weights are ``(in, out)``; fewer
    heads than the width are padded with zero heads, see above), and a note saying so."""
    heads, _, units = uniform_sizes(model, blocks)
    width, activation = model.embed_dim, next(iter(blocks.values())).mlp.activation
    config = _base(source, "GPT2LMHeadModel", "gpt2")
    _per_layer(config, list(blocks))
    config.update(
        vocab_size=model.vocab_size,
        n_embd=width,
        n_layer=len(blocks),
        n_head=width // model.head_dim,
        n_inner=units,
        n_positions=model.context_length,
        tie_word_embeddings=model.tie_embeddings,
    )
    if source is None:
        config.update(layer_norm_epsilon=model.norm.eps, activation_function=GPT2_ACTIVATIONS[activation])
    t = {
        "transformer.wte.weight": model.tok_embed.weight.detach(),
        "transformer.wpe.weight": model.pos_embed.weight.detach(),
        "transformer.ln_f.weight": model.norm.weight.detach(),
        "transformer.ln_f.bias": model.norm.bias.detach(),
    }
    if not model.tie_embeddings:
        t["lm_head.weight"] = dense(model.lm_head)
    for j, block in enumerate(blocks.values()):
        h, attn, mlp = f"transformer.h.{j}", block.attn, block.mlp
        for ours, theirs in ((block.norm1, "ln_1"), (block.norm2, "ln_2")):
            t.update({f"{h}.{theirs}.weight": ours.weight.detach(), f"{h}.{theirs}.bias": ours.bias.detach()})
        qkv = [_tensors(p) for p in (attn.q_proj, attn.k_proj, attn.v_proj)]
        t[f"{h}.attn.c_attn.weight"] = torch.cat([_padded(p["weight"], width) for p in qkv]).T
        t[f"{h}.attn.c_attn.bias"] = torch.cat([_padded(p["bias"], width) for p in qkv])
        t[f"{h}.attn.c_proj.weight"] = _padded(dense(attn.o_proj).T, width)
        t[f"{h}.attn.c_proj.bias"] = attn.o_proj.bias.detach()
        t[f"{h}.mlp.c_fc.weight"], t[f"{h}.mlp.c_fc.bias"] = dense(mlp.up_proj).T, mlp.up_proj.bias.detach()
        t[f"{h}.mlp.c_proj.weight"], t[f"{h}.mlp.c_proj.bias"] = dense(mlp.down_proj).T, mlp.down_proj.bias.detach()
    dropped = config["n_head"] - heads
    note = (
        f"GPT-2's config fixes heads x head size to the width: each block's {dropped} dropped heads are written "
        "as zeros (they add nothing)"
    )
    return config, t, note if dropped else None
