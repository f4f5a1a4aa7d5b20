"""Nested causal language models of the Llama and GPT-2 layouts, what ``zoo.from_transformers`` makes.

One decoder covers both layouts, chosen by a few arguments the variants fix:

* ``slim_llama`` (Llama, Mistral, Qwen2): RMSNorm, rotary position embeddings (rotate-half
  pairing, as transformers computes them), grouped-query attention (``num_kv_heads``: each key
  and value head serves ``num_heads / num_kv_heads`` query heads), a gated MLP
  ``down(act(gate(x)) * up(x))``, optional q/k/v biases (Qwen2) and output bias (Llama's
  ``attention_bias``), tied or untied embeddings.
* ``slim_gpt2``: LayerNorm, learned positions, multi-head attention and a GELU (tanh) MLP, every
  projection with a bias, the lm_head tied to the token embedding.

Elastic axes, per block: ``heads`` in units of key/value groups (a member keeps whole groups,
each query head with the key/value head it reads; heads move as wholes, never a dimension inside
one, since the rotary embedding pairs them), ``mlp`` the hidden units (gate, up and down
coupled), ``blocks`` the blocks kept, and with ``low_rank=True`` ``rank`` (every q/k/v/o and MLP
projection factorized). The residual width, embeddings, norms and lm_head are fixed.

A tied lm_head reads the token embedding's weight (:class:`TiedHead`), so the tensor is stored
once (safetensors stores no shared tensors). The rotary angles are computed in ``forward`` from
``rope_theta``: a model built on the meta device and loaded from a file has no buffer to fill.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..base import ElasticModel
from ..convert_lm import LMPlan, Source, converts_transformers, require, require_class
from ..importance import Coupling, out_units
from ..layers import ElasticBlocks, LayerFactory
from ..space import DEFAULT_GRID, Space, fixed
from ._builder import build, register_family
from .causal_lm_transformers import LLAMA_NAMES, gpt2_parts, llama_parts
from .transformer import trunc_normal

# attention of queries over keys and values with a mask added to the scores (export passes its own)
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}
NORMS = ("rms", "layer")
POSITIONS = ("rope", "learned")


class RMSNorm(nn.Module):
    """Root-mean-square norm as transformers' Llama computes it (in float32, then scaled)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def rotary_angles(positions: int, head_dim: int, theta: float, device: torch.device) -> tuple[torch.Tensor, ...]:
    """cos and sin ``(positions, head_dim)`` of the rotary embedding (the two halves repeat)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=device) / head_dim))
    freqs = torch.arange(positions, dtype=torch.float, device=device)[:, None] * inv_freq
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + head_dim / 2) of every head of ``x`` ``(B, H, T, head_dim)``."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


class Attention(nn.Module):
    """Causal grouped-query attention over the active key/value groups."""

    def __init__(
        self,
        f: LayerFactory,
        dim: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        qkv_bias: bool,
        o_bias: bool,
        dropout: float,
    ):
        super().__init__()
        self.head_dim, self.group_size, self.dropout = head_dim, num_heads // num_kv_heads, dropout
        queries = f.dim(num_kv_heads, unit_size=self.group_size * head_dim, axis="heads")
        keys = f.dim(num_kv_heads, unit_size=head_dim, axis="heads")
        self.q_proj = f.linear(fixed(dim), queries, bias=qkv_bias, init=trunc_normal)
        self.k_proj = f.linear(fixed(dim), keys, bias=qkv_bias, init=trunc_normal)
        self.v_proj = f.linear(fixed(dim), keys, bias=qkv_bias, init=trunc_normal)
        self.o_proj = f.linear(queries, fixed(dim), bias=o_bias, init=trunc_normal)

    @property
    def num_heads(self) -> int:
        """Query heads the active member runs."""
        return self.q_proj.active_out // self.head_dim

    @property
    def num_kv_heads(self) -> int:
        return self.k_proj.active_out // self.head_dim

    def project(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, ...]:
        """Queries ``(B, heads, T, head_dim)``, keys and values ``(B, kv_heads, T, head_dim)``, rotated."""
        q, k, v = (
            p(x).unflatten(-1, (-1, self.head_dim)).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        if rope is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)
        return q, k, v

    def per_query_head(self, kv: torch.Tensor) -> torch.Tensor:
        """Keys or values repeated for the query heads they serve: key/value head j serves query
        heads j * group_size ... (j + 1) * group_size - 1 (``repeat_interleave``, as an expand)."""
        if self.group_size == 1:
            return kv
        return kv[:, :, None].expand(-1, -1, self.group_size, -1, -1).flatten(1, 2)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        q, k, v = self.project(x, rope)
        k, v = self.per_query_head(k), self.per_query_head(v)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.o_proj(out.transpose(1, 2).flatten(2))


class Mlp(nn.Module):
    """``down(act(gate(x)) * up(x))`` (gated) or ``down(act(up(x)))``; the hidden units are elastic."""

    def __init__(self, f: LayerFactory, dim: int, hidden: int, gated: bool, activation: str, bias: bool):
        super().__init__()
        units = f.dim(hidden, axis="mlp")
        self.gate_proj = f.linear(fixed(dim), units, bias=bias, init=trunc_normal) if gated else None
        self.up_proj = f.linear(fixed(dim), units, bias=bias, init=trunc_normal)
        self.down_proj = f.linear(units, fixed(dim), bias=bias, init=trunc_normal)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = ACTIVATIONS[self.activation]
        hidden = act(self.up_proj(x)) if self.gate_proj is None else act(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(hidden)


class Block(nn.Module):
    """``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``."""

    def __init__(self, norm: Callable[[], nn.Module], attn: Attention, mlp: Mlp):
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = norm(), attn, norm(), mlp

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))


class TiedHead(nn.Module):
    """The lm_head of tied embeddings: logits against the token embedding's weight. The embedding
    is not a submodule of the head, so its weight is one tensor in the state dict."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self.__dict__["embedding"] = embedding
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.embedding.weight)


def _positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class SlimCausalLM(ElasticModel):
    """A causal decoder whose key/value groups, MLP units, blocks (and ranks) are elastic."""

    input_kind = "tokens"

    def __init__(
        self,
        vocab_size: int = 256,
        hidden_size: int = 128,
        num_layers: int = 4,
        num_heads: int = 4,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        intermediate_size: int | None = None,
        context_length: int = 256,
        norm: str = "rms",
        norm_eps: float = 1e-6,
        position: str = "rope",
        rope_theta: float = 10000.0,
        gated_mlp: bool = True,
        activation: str = "silu",
        qkv_bias: bool = False,
        o_bias: bool = False,
        mlp_bias: bool = False,
        tie_embeddings: bool = False,
        dropout: float = 0.0,
        low_rank: bool = False,
        widths: Iterable[float] = DEFAULT_GRID,
        ranks: Iterable[float] | None = None,
        max_member: dict | None = None,
        extra_members: Iterable[dict] = (),
    ):
        for name, value in (("vocab_size", vocab_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
            _positive(name, value)
        _positive("num_heads", num_heads)
        _positive("context_length", context_length)
        num_kv_heads = _positive("num_kv_heads", num_heads if num_kv_heads is None else num_kv_heads)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
        if head_dim is None and hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_heads {num_heads}; give head_dim")
        head_dim = _positive("head_dim", hidden_size // num_heads if head_dim is None else head_dim)
        if position == "rope" and head_dim % 2:
            raise ValueError(f"rotary embeddings pair a head's dimensions: head_dim {head_dim} must be even")
        for name, value, choices in (
            ("norm", norm, NORMS),
            ("position", position, POSITIONS),
            ("activation", activation, tuple(ACTIVATIONS)),
        ):
            if value not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        intermediate_size = _positive("intermediate_size", intermediate_size or 4 * hidden_size)
        space = Space("block", num_layers, ("heads", "mlp"), low_rank, skip_blocks=True)
        super().__init__(
            space=space,
            low_rank=low_rank,
            widths=widths,
            ranks=ranks,
            max_member=max_member,
            extra_members=extra_members,
        )
        f = self._layer_factory(8)
        self.num_classes = self.vocab_size = vocab_size
        self.context_length = context_length
        self.num_features = self.embed_dim = hidden_size
        self.head_dim, self.rope_theta = head_dim, float(rope_theta)
        self.tok_embed = nn.Embedding(vocab_size, hidden_size)
        trunc_normal(self.tok_embed.weight)
        self.pos_embed = nn.Embedding(context_length, hidden_size) if position == "learned" else None
        if self.pos_embed is not None:
            trunc_normal(self.pos_embed.weight)
        self.drop = nn.Dropout(dropout)

        def make_norm() -> nn.Module:
            return RMSNorm(hidden_size, norm_eps) if norm == "rms" else nn.LayerNorm(hidden_size, eps=norm_eps)

        blocks = {}
        for i in self.max_values["blocks"]:
            g = f.at(i)
            attn = Attention(g, hidden_size, num_heads, num_kv_heads, head_dim, qkv_bias, o_bias, dropout)
            mlp = Mlp(g, hidden_size, intermediate_size, gated_mlp, activation, mlp_bias)
            blocks[i] = Block(make_norm, attn, mlp)
        self.blocks = ElasticBlocks(blocks, "blocks")
        self.norm = make_norm()
        self.lm_head = self._head(tie_embeddings)
        self.tie_embeddings = tie_embeddings
        self.pretrained_cfg = {
            "input_size": (context_length,),
            "num_classes": vocab_size,
            "vocab_size": vocab_size,
            "context_length": context_length,
            "classifier": "lm_head",
        }
        self._finish_init()

    def _head(self, tied: bool) -> nn.Module:
        if tied:
            return TiedHead(self.tok_embed)
        dims = fixed(self.embed_dim), fixed(self.vocab_size)
        return self._factory.linear(*dims, bias=False, factorize=False, init=trunc_normal)

    def forward_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> normalised hidden states (B, T, hidden_size)."""
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"{self._name} takes integer token ids of shape (batch, seq_len), "
                f"got {tokens.dtype} {tuple(tokens.shape)}"
            )
        length = tokens.shape[1]
        if length > self.context_length:
            raise ValueError(f"{self._name}: sequence length {length} exceeds context_length {self.context_length}")
        x = self.tok_embed(tokens)
        rope = None
        if self.pos_embed is not None:
            x = x + self.pos_embed.weight[:length]
        else:
            rope = rotary_angles(length, self.head_dim, self.rope_theta, tokens.device)
            rope = rope[0].to(x.dtype), rope[1].to(x.dtype)
        x = self.drop(x)
        for name, block in self.blocks.items():  # in order; ElasticBlocks.forward takes one argument
            if name in self.blocks.active:
                x = block(x, rope)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Hidden states -> next-token logits (B, T, vocab_size)."""
        return x if pre_logits else self.lm_head(x)

    def _active_blocks(self) -> list[Block]:
        return [block for name, block in self.blocks.items() if name in self.blocks.active]

    def cache_shapes(self, past: int = 0) -> list[tuple[int, ...]]:
        """The shape of every active block's cached keys and values, ``(1, kv_heads, past, head_dim)``:
        one entry per key/value head (grouped-query attention caches the groups, not the query heads)."""
        return [(1, b.attn.num_kv_heads, past, self.head_dim) for b in self._active_blocks() for _ in range(2)]

    def forward_cached(
        self, tokens: torch.Tensor, past: tuple[torch.Tensor, ...] | None, attend: Attend
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """What ``export/kv_cache.py`` exports: the logits of ``tokens`` placed after the ``past``
        positions whose keys and values ``past`` holds (key, value per active block, as
        :meth:`cache_shapes`, broadcast to the batch), and every block's keys and values so far;
        with ``past=None`` the logits alone. The rotary angles (or learned positions) of
        ``tokens`` start at the past length. ``attend(q, k, v, hidden)`` is the attention with
        ``hidden`` (0 or -inf per query and key) added to the scores."""
        batch, sequence = tokens.shape
        cached = 0 if past is None else past[0].shape[2]
        x = self.tok_embed(tokens)
        rope = None
        if self.pos_embed is not None:
            x = x + self.pos_embed.weight[cached : cached + sequence]
        else:
            cos, sin = rotary_angles(cached + sequence, self.head_dim, self.rope_theta, tokens.device)
            rope = cos[cached:].to(x.dtype), sin[cached:].to(x.dtype)
        positions = torch.arange(cached + sequence, device=tokens.device)
        visible = positions[None, :] <= positions[cached:, None]  # query at p sees keys at <= p
        hidden = torch.zeros(visible.shape, dtype=x.dtype, device=x.device).masked_fill(~visible, float("-inf"))
        present = []
        for i, block in enumerate(self._active_blocks()):
            attn = block.attn
            q, k, v = attn.project(block.norm1(x), rope)
            if past is not None:
                k = torch.cat([past[2 * i].expand(batch, -1, -1, -1), k], dim=2)
                v = torch.cat([past[2 * i + 1].expand(batch, -1, -1, -1), v], dim=2)
                present += [k, v]
            out = attend(q, attn.per_query_head(k), attn.per_query_head(v), hidden)
            x = x + attn.o_proj(out.transpose(1, 2).flatten(2))
            x = x + block.mlp(block.norm2(x))
        logits = self.lm_head(self.norm(x))
        return logits if past is None else (logits, *present)

    def transformers_parts(self, source: dict | None = None) -> tuple[dict, dict[str, torch.Tensor], str | None]:
        """This sliced member as a transformers model: ``config.json``'s fields (``source``: the
        converted model's config), tensors by transformers' names, and a note on how it was written
        (None: nothing to say). See :mod:`zoo.models.causal_lm_transformers`."""
        if self.active_member != self.largest:
            raise ValueError(f"{self._name}: write a sliced member (zoo.slice), not a family running a member")
        blocks = {int(name): block for name, block in self.blocks.items() if name in self.blocks.active}
        return (llama_parts if self.pos_embed is None else gpt2_parts)(self, blocks, source)

    def couplings(self) -> list[Coupling]:
        """Each block's key/value groups (a group's query heads' rows of q and columns of o, its
        key and value head's rows of k and v) and its MLP units (rows of gate and up, columns of
        down). The residual width is not elastic, so it is never permuted."""
        found = []
        for index, block in self.blocks.items():
            attn, mlp = block.attn, block.mlp
            groups = out_units(attn.k_proj) // attn.head_dim
            writers = [attn.q_proj, attn.k_proj, attn.v_proj]
            found.append(Coupling(f"blocks.{index} heads", groups, writers=writers, readers=[attn.o_proj]))
            gated = [mlp.gate_proj] if mlp.gate_proj is not None else []
            found.append(
                Coupling(
                    f"blocks.{index} mlp",
                    out_units(mlp.up_proj),
                    writers=[*gated, mlp.up_proj],
                    readers=[mlp.down_proj],
                )
            )
        return found

    def get_classifier(self) -> nn.Module:
        return self.lm_head

    def reset_classifier(self, num_classes: int) -> None:
        """Re-initialise an untied lm_head; its outputs are the vocabulary and cannot change."""
        if num_classes != self.vocab_size:
            raise ValueError(
                f"{self._name} predicts the next token: its lm_head has {self.vocab_size} outputs, "
                f"got num_classes={num_classes}"
            )
        if not self.tie_embeddings:
            self.lm_head = self._head(False)
            self.set_member(self.active_member)


_LLAMA = dict(norm="rms", position="rope", gated_mlp=True)
_GPT2 = dict(norm="layer", position="learned", gated_mlp=False, num_kv_heads=None)
_GPT2.update(qkv_bias=True, o_bias=True, mlp_bias=True, head_dim=None)


@register_family("causal_lm", SlimCausalLM, _LLAMA, dict(num_kv_heads=2, intermediate_size=352), timm=False)
def slim_llama(pretrained: bool = False, **kwargs) -> SlimCausalLM:
    """The Llama layout (Llama, Mistral, Qwen2): by default dim 128, 4 blocks, 4 heads in 2
    key/value groups, a 256-token vocabulary (bytes); ``zoo.from_transformers`` sets its sizes."""
    return build("slim_llama", pretrained, kwargs)


@register_family(
    "causal_lm", SlimCausalLM, _GPT2, dict(norm_eps=1e-5, activation="gelu_tanh", tie_embeddings=True), timm=False
)
def slim_gpt2(pretrained: bool = False, **kwargs) -> SlimCausalLM:
    """GPT-2's layout: by default dim 128, 4 blocks, 4 heads, a 256-token vocabulary (bytes)."""
    return build("slim_gpt2", pretrained, kwargs)


# ----- conversion from transformers ---------------------------------------------------------
# transformers' activation names -> the ones this family computes (gelu_new is GELU's tanh form)
HF_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
}
_LLAMA_PREFIX = {"LlamaForCausalLM": "Llama", "MistralForCausalLM": "Mistral", "Qwen2ForCausalLM": "Qwen2"}


def _activation(source: Source, name: str) -> str:
    require(name in HF_ACTIVATIONS, source, f"the activation {name!r}")
    return HF_ACTIVATIONS[name]


def _has_bias(layers, source: Source, *paths: str) -> bool:
    """Whether the linear layers at ``paths`` (in every block) have biases: all of them or none."""
    found = {layer.get_submodule(p).bias is not None for layer in layers for p in paths}
    require(len(found) == 1, source, f"biases on some of {', '.join(paths)} but not others")
    return found.pop()


def _tied(source: Source, head: str, embedding: str) -> bool:
    state = source.state
    return head not in state or state[head].data_ptr() == state[embedding].data_ptr()


def _context(source: Source, positions: int) -> int:
    """The context this family takes: the positions the model was configured for. A sliding window
    at least that long never hides a token (a query at i sees keys j > i - window), so it cannot
    matter; a shorter one would, and is refused."""
    config = source.config
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:  # Qwen2: the window applies to the sliding layers only
        unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
        require(not unknown, source, f"the attention types {unknown}")
        window = getattr(config, "sliding_window", None) if "sliding_attention" in layer_types else None
    else:  # Mistral: to every layer
        window = getattr(config, "sliding_window", None)
    require(window is None or window >= positions, source, f"a sliding window of {window} tokens (context {positions})")
    return positions


@converts_transformers("LlamaForCausalLM", "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM")
@converts_transformers("MistralForCausalLM", "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM")
@converts_transformers("Qwen2ForCausalLM", "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM")
def _plan_llama(source: Source) -> LMPlan:
    """Llama, Mistral and Qwen2: the same decoder, told apart by biases and sliding windows."""
    model, config = source.model, source.config
    prefix = _LLAMA_PREFIX[type(model).__name__]
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    require(rope_type == "default", source, f"rope scaling of type {rope_type!r}")
    require(model.lm_head.bias is None, source, "an lm_head with a bias")
    layers = list(model.model.layers)
    for i, layer in enumerate(layers):
        at = f"model.layers.{i}"
        require_class(layer, f"{prefix}DecoderLayer", source, at)
        require_class(layer.self_attn, f"{prefix}Attention", source, f"{at}.self_attn")
        require_class(layer.mlp, f"{prefix}MLP", source, f"{at}.mlp")
        for norm in ("input_layernorm", "post_attention_layernorm"):
            require_class(getattr(layer, norm), f"{prefix}RMSNorm", source, f"{at}.{norm}")
    require_class(model.model.norm, f"{prefix}RMSNorm", source, "model.norm")
    heads, kv_heads = (
        config.num_attention_heads,
        getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
    )
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    args = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=config.intermediate_size,
        context_length=_context(source, config.max_position_embeddings),
        norm_eps=float(config.rms_norm_eps),
        rope_theta=float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))),
        activation=_activation(source, config.hidden_act),
        qkv_bias=_has_bias(layers, source, "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        o_bias=_has_bias(layers, source, "self_attn.o_proj"),
        mlp_bias=_has_bias(layers, source, "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
        tie_embeddings=_tied(source, "lm_head.weight", "model.embed_tokens.weight"),
    )
    tensors = {
        "tok_embed.weight": source.take("model.embed_tokens.weight"),
        "norm.weight": source.take("model.norm.weight"),
    }
    if not args["tie_embeddings"]:
        tensors["lm_head.weight"] = source.take("lm_head.weight")
    for i in range(len(layers)):
        for ours, theirs in LLAMA_NAMES.items():
            for p in ("weight", "bias"):
                if f"model.layers.{i}.{theirs}.{p}" in source.state:
                    tensors[f"blocks.{i}.{ours}.{p}"] = source.take(f"model.layers.{i}.{theirs}.{p}")
    return LMPlan("slim_llama", args, tensors)


@converts_transformers("GPT2LMHeadModel", "GPT2LMHeadModel")
def _plan_gpt2(source: Source) -> LMPlan:
    """GPT-2: its Conv1D layers hold weights as (in, out), transposed here; c_attn is split into q, k, v."""
    model, config = source.model, source.config
    require(config.scale_attn_weights, source, "attention without scaling (scale_attn_weights=False)")
    require(
        not config.scale_attn_by_inverse_layer_idx,
        source,
        "attention scaled by layer (scale_attn_by_inverse_layer_idx)",
    )
    require(not config.add_cross_attention, source, "cross-attention")
    require(model.lm_head.bias is None, source, "an lm_head with a bias")
    layers = list(model.transformer.h)
    for i, layer in enumerate(layers):
        at = f"transformer.h.{i}"
        require_class(layer, "GPT2Block", source, at)
        require_class(layer.attn, "GPT2Attention", source, f"{at}.attn")
        require_class(layer.mlp, "GPT2MLP", source, f"{at}.mlp")
        for part in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            require_class(layer.get_submodule(part), "Conv1D", source, f"{at}.{part}")
        for norm in ("ln_1", "ln_2"):
            require_class(getattr(layer, norm), "LayerNorm", source, f"{at}.{norm}")
    require_class(model.transformer.ln_f, "LayerNorm", source, "transformer.ln_f")
    hidden = config.n_embd
    args = dict(
        vocab_size=config.vocab_size,
        hidden_size=hidden,
        num_layers=config.n_layer,
        num_heads=config.n_head,
        intermediate_size=config.n_inner or 4 * hidden,
        context_length=config.n_positions,
        norm_eps=float(config.layer_norm_epsilon),
        activation=_activation(source, config.activation_function),
        tie_embeddings=_tied(source, "lm_head.weight", "transformer.wte.weight"),
    )
    t = {
        "tok_embed.weight": source.take("transformer.wte.weight"),
        "pos_embed.weight": source.take("transformer.wpe.weight"),
    }
    t.update({"norm.weight": source.take("transformer.ln_f.weight"), "norm.bias": source.take("transformer.ln_f.bias")})
    if not args["tie_embeddings"]:
        t["lm_head.weight"] = source.take("lm_head.weight")
    for i in range(len(layers)):
        h, b = f"transformer.h.{i}", f"blocks.{i}"
        for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
            t.update({f"{b}.{ours}.{p}": source.take(f"{h}.{theirs}.{p}") for p in ("weight", "bias")})
        qkv, qkv_bias = (
            source.take(f"{h}.attn.c_attn.weight").T.split(hidden),
            source.take(f"{h}.attn.c_attn.bias").split(hidden),
        )
        for part, weight, bias in zip(("q_proj", "k_proj", "v_proj"), qkv, qkv_bias):
            t.update({f"{b}.attn.{part}.weight": weight, f"{b}.attn.{part}.bias": bias})
        for ours, theirs in (
            ("attn.o_proj", "attn.c_proj"),
            ("mlp.up_proj", "mlp.c_fc"),
            ("mlp.down_proj", "mlp.c_proj"),
        ):
            t.update(
                {
                    f"{b}.{ours}.weight": source.take(f"{h}.{theirs}.weight").T,
                    f"{b}.{ours}.bias": source.take(f"{h}.{theirs}.bias"),
                }
            )
    return LMPlan("slim_gpt2", args, t)
