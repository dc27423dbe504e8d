"""Sequence networks: ``transformer_ln``, ``llm_rms``, ``rnn_ln`` and ``seq_bn``.

Token models take ``tokens`` ``(N, L)`` int64, the others ``sequence`` ``(N, L, F)`` float32;
batch and sequence length are dynamic everywhere (token models up to ``max_len = 64``, the
size of their learned positional embedding).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normport import models
from normport.models.zoo._registry import register
from normport.models.zoo._spec import Interface

__all__ = [
    "DecoderLM",
    "GatedLinearRecurrence",
    "PreNormBlock",
    "RecurrentLN",
    "SEQUENCE_TO_SEQUENCE",
    "SelfAttention",
    "SequenceBN",
    "SwiGLU",
    "TOKENS_TO_LOGITS",
    "TransformerEncoder",
    "sequence_inputs",
    "token_inputs",
]

VOCAB = 64
MAX_LEN = 64
FEATURES = 8
OUT_FEATURES = 4

_SEQ_LEN = {"seq_len": 16}


def token_inputs(
    batch_size: int, generator: torch.Generator, *, seq_len: int, vocab: int = VOCAB
) -> tuple[Tensor]:
    """Uniform random token ids ``(N, L)`` int64 in ``[0, vocab)``."""
    return (torch.randint(vocab, (batch_size, seq_len), generator=generator),)


def sequence_inputs(
    batch_size: int, generator: torch.Generator, *, seq_len: int, features: int = FEATURES
) -> tuple[Tensor]:
    """A standard-normal ``(N, L, F)`` float32 sequence batch."""
    return (torch.randn(batch_size, seq_len, features, generator=generator),)


TOKENS_TO_LOGITS = Interface(
    input_fn=token_inputs,
    input_names=("tokens",),
    output_names=("logits",),
    dynamic_dims={"tokens": {0: "batch", 1: "seq_len"}},
    dims=_SEQ_LEN,
)
SEQUENCE_TO_SEQUENCE = Interface(
    input_fn=functools.partial(sequence_inputs, features=FEATURES),
    input_names=("sequence",),
    output_names=("output",),
    dynamic_dims={"sequence": {0: "batch", 1: "seq_len"}},
    dims=_SEQ_LEN,
)


class SelfAttention(nn.Module):
    """Multi-head self-attention written out: ``Linear -> q k^T / sqrt(d) -> softmax -> v``.

    With ``causal=True`` position ``t`` attends to positions ``<= t``; the mask is built from
    the input's (dynamic) length with ``arange``, not sliced from a fixed-size buffer.
    """

    def __init__(self, dim: int, heads: int, *, causal: bool = False, bias: bool = True) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.head_dim = dim // heads
        self.causal = causal
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        # (N, L, 3 * D) -> 3 x (N, heads, L, head_dim)
        qkv = self.qkv(x).unflatten(-1, (3, self.heads, self.head_dim)).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
        if self.causal:
            steps = torch.arange(x.shape[1], device=x.device)
            future = steps.unsqueeze(0) > steps.unsqueeze(1)  # (L, L): key after query
            scores = scores.masked_fill(future, float("-inf"))
        out = torch.matmul(torch.softmax(scores, dim=-1), v)
        return self.proj(out.transpose(1, 2).flatten(2))


class PreNormBlock(nn.Module):
    """``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``."""

    def __init__(
        self, norm: Callable[[int], nn.Module], attn: nn.Module, mlp: nn.Module, dim: int
    ) -> None:
        super().__init__()
        self.norm1 = norm(dim)
        self.attn = attn
        self.norm2 = norm(dim)
        self.mlp = mlp

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``, bias-free (LLaMA-style MLP)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class _TokenModel(nn.Module):
    """Token + learned positional embedding (sliced to the length), blocks, norm, head."""

    def __init__(
        self,
        blocks: list[nn.Module],
        final_norm: nn.Module,
        dim: int,
        *,
        head_bias: bool,
        vocab: int = VOCAB,
        max_len: int = MAX_LEN,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.blocks = nn.Sequential(*blocks)
        self.norm = final_norm
        self.head = nn.Linear(dim, vocab, bias=head_bias)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens) + self.pos.weight[: tokens.shape[1]]
        return self.head(self.norm(self.blocks(x)))


@register(
    "transformer_ln",
    TOKENS_TO_LOGITS,
    description="Pre-LN Transformer encoder (2 blocks, hand-written attention) with LayerNorm.",
)
class TransformerEncoder(_TokenModel):
    """Pre-LN Transformer encoder (bidirectional attention, GELU MLP) with LayerNorm."""

    def __init__(self, dim: int = 32, heads: int = 4, layers: int = 2) -> None:
        blocks = [
            PreNormBlock(
                models.LayerNorm,
                SelfAttention(dim, heads),
                nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)),
                dim,
            )
            for _ in range(layers)
        ]
        super().__init__(blocks, models.LayerNorm(dim), dim, head_bias=True)


@register(
    "llm_rms",
    TOKENS_TO_LOGITS,
    description="Tiny causal decoder LM with RMSNorm, hand-written causal attention, SwiGLU.",
)
class DecoderLM(_TokenModel):
    """Tiny causal decoder (LLaMA-like): pre-RMSNorm causal attention, SwiGLU MLP."""

    def __init__(self, dim: int = 32, heads: int = 4, layers: int = 2, eps: float = 1e-6) -> None:
        def norm(d: int) -> nn.Module:
            return models.RMSNorm(d, eps=eps)

        blocks = [
            PreNormBlock(
                norm, SelfAttention(dim, heads, causal=True, bias=False), SwiGLU(dim, 2 * dim), dim
            )
            for _ in range(layers)
        ]
        super().__init__(blocks, norm(dim), dim, head_bias=False)


class GatedLinearRecurrence(nn.Module):
    """Diagonal gated linear recurrence ``h_t = a_t * h_{t-1} + (1 - a_t) * c_t``, ``h_0 = 0``.

    ``a_t = sigmoid(W_a x_t)`` and ``c_t = tanh(W_c x_t)`` depend on the input only, so the
    recurrence unrolls to

    .. math::

        h_t = \\sum_{s \\le t} \\exp\\Big(\\sum_{r = s + 1}^{t} \\log a_r\\Big)\\,(1 - a_s)\\, c_s

    computed for all ``t`` at once with a ``cumsum`` of ``log a`` and an ``(L, L)`` causal
    mask (``-inf`` before the ``exp``, so no overflow): no Python loop over time, and the
    sequence length stays dynamic in an exported graph.  Memory is ``O(N L^2 H)``.
    """

    def __init__(self, in_features: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(in_features, hidden)
        self.candidate = nn.Linear(in_features, hidden)

    def forward(self, x: Tensor) -> Tensor:
        z = self.gate(x)
        log_a = F.logsigmoid(z)  # (N, L, H)
        inject = torch.sigmoid(-z) * torch.tanh(self.candidate(x))  # (1 - a_s) * c_s
        cum = torch.cumsum(log_a, dim=1)
        log_decay = cum.unsqueeze(2) - cum.unsqueeze(1)  # (N, L_t, L_s, H)
        steps = torch.arange(x.shape[1], device=x.device)
        future = (steps.unsqueeze(0) > steps.unsqueeze(1)).unsqueeze(-1)  # (L_t, L_s, 1)
        decay = torch.exp(log_decay.masked_fill(future, float("-inf")))
        return (decay * inject.unsqueeze(1)).sum(2)


@register(
    "rnn_ln",
    SEQUENCE_TO_SEQUENCE,
    description="Gated linear recurrence with one shared LayerNorm applied at every time step.",
)
class RecurrentLN(nn.Module):
    """Gated linear recurrence whose hidden state is layer-normalized at every time step.

    One shared :class:`models.LayerNorm` (one gain and bias for all steps) normalizes each
    ``h_t`` over its hidden features (statistics per sample and step), followed by a GELU MLP
    read-out per step.
    """

    def __init__(
        self, in_features: int = FEATURES, hidden: int = 32, out_features: int = OUT_FEATURES
    ) -> None:
        super().__init__()
        self.recurrence = GatedLinearRecurrence(in_features, hidden)
        self.norm = models.LayerNorm(hidden)
        self.readout = nn.Sequential(
            nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, out_features)
        )

    def forward(self, sequence: Tensor) -> Tensor:
        return self.readout(self.norm(self.recurrence(sequence)))


@register(
    "seq_bn",
    SEQUENCE_TO_SEQUENCE,
    description="Channel-last sequence MLP with SequenceBatchNorm over (N, L, C) and a residual.",
)
class SequenceBN(nn.Module):
    """Channel-last sequence MLP with :class:`models.SequenceBatchNorm` and a residual.

    ``h = gelu(bn1(in_proj(x)))``, ``y = gelu(h + bn2(mid(h)))``, ``head(y)``.  ``bn2`` uses
    ``momentum=None`` (cumulative moving average), ``bn1`` the default momentum.
    """

    def __init__(
        self, in_features: int = FEATURES, dim: int = 32, out_features: int = OUT_FEATURES
    ) -> None:
        super().__init__()
        self.in_proj = nn.Linear(in_features, dim)
        self.bn1 = models.SequenceBatchNorm(dim)
        self.mid = nn.Linear(dim, dim)
        self.bn2 = models.SequenceBatchNorm(dim, momentum=None)
        self.head = nn.Linear(dim, out_features)

    def forward(self, sequence: Tensor) -> Tensor:
        h = F.gelu(self.bn1(self.in_proj(sequence)))
        return self.head(F.gelu(h + self.bn2(self.mid(h))))
