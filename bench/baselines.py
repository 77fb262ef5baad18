"""Cross-attention fusion baselines for the efficiency benchmark (``bench/fusion_efficiency.py``).

The Coupled Mamba paper (arXiv 2405.18014) compares its fusion against cross-attention fusion.
This module builds that kind of network with the same width and depth as a given
:class:`~model.CoupledMambaConfig`, so that the two can be timed side by side:

- MulT's formulation (Tsai et al., ACL 2019, "Multimodal Transformer for Unaligned Multimodal
  Language Sequences"): every modality attends to every other one through its own stack of
  *cross-modal transformer blocks*. For a target modality m and a source modality k != m the
  stream ``m <- k`` starts from m's projected input and, in each of ``n_layers`` blocks, does::

      x = x + Attention(q = LN(x), k = v = LN(Z_k))     # Z_k: k's projected input, every block
      x = x + FFN(LN(x))

  so a network over M modalities runs ``M * (M - 1)`` streams of ``n_layers`` blocks. Each
  target then concatenates the final states of its ``M - 1`` streams and projects them back to
  ``d_model``.
- Two attention kernels with the same weights:
  ``"materialized"`` computes ``softmax(Q K^T / sqrt(d_head)) V`` with the (batch, heads, L, L)
  weights as a tensor, as MulT and the models the paper compared against do;
  ``"sdpa"`` calls ``torch.nn.functional.scaled_dot_product_attention``, which picks a fused
  kernel (flash / memory-efficient attention) that never holds the full matrix.

What is the same as the Coupled Mamba model built from the config: modalities and feature sizes,
``d_model`` (the residual width of every modality), depth (``n_layers`` blocks per stream, one
coupled Mamba layer per modality in ours), an inner width of ``expand * d_model`` (our Mamba
``d_inner``; used as the FFN width here, where MulT used ``4 * d_model``), pre-norms, masked
mean pooling per modality, the gated fusion over modalities and the two heads (the code is
shared with ``model.mamba``).

Choices that make the baseline *cheaper* than MulT, so that a win over it is not inflated:
the FFN is ``expand * d_model`` wide instead of ``4 * d_model``; MulT's self-attention
transformer over each target's concatenated streams is left out (the concatenation is projected
by one Linear); the attention mask is skipped when no step is padded (which lets SDPA use its
fused kernel and spares the materialized path a masked fill of the L x L matrix); 4 heads of
``d_model / 4`` (``--heads`` in the benchmark; the materialized matrices grow linearly with the
head count, so few heads favour the baseline).

Shapes: b = batch, L = time steps, d = d_model, H = heads, d_h = d / H.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model import CoupledMambaConfig, SentimentOutput
from model.config import CLASS_NAMES
from model.mamba import Fusion, masked_pool

ATTENTION_KINDS = ("materialized", "sdpa")
"""``materialized``: explicit softmax(Q K^T / sqrt(d_h)) V; ``sdpa``: PyTorch's fused kernel."""


def materialized_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None) -> Tensor:
    """softmax(Q K^T / sqrt(d_h)) V with the attention weights held as a tensor.

    Args:
        q: (b, H, Lq, d_h); k, v: (b, H, Lk, d_h).
        key_mask: (b, Lk) bool, True at keys that may be attended to, or None for all.

    Returns:
        (b, H, Lq, d_h).
    """
    scores = q @ k.transpose(-2, -1) * (q.shape[-1] ** -0.5)  # (b, H, Lq, Lk)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    weights = torch.softmax(scores, dim=-1)  # (b, H, Lq, Lk)
    return weights @ v


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None) -> Tensor:
    """The same attention through ``F.scaled_dot_product_attention`` (fused when possible)."""
    mask = None if key_mask is None else key_mask[:, None, None, :]  # (b, 1, 1, Lk)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def attention_matrix_bytes(
    batch: int, length: int, n_heads: int, element_size: int = 4, copies: int = 2
) -> int:
    """Bytes of the (batch, heads, L, L) attention matrices a materialized block holds at once.

    ``copies = 2``: the scores and the softmax weights are both alive while the softmax runs.
    """
    return copies * batch * n_heads * length * length * element_size


def sinusoidal_positions(length: int, dim: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Transformer sinusoidal position encodings (L, dim), as MulT adds to its inputs."""
    position = torch.arange(length, device=device, dtype=torch.float32)[:, None]  # (L, 1)
    half = dim // 2
    freq = torch.exp(
        torch.arange(half, device=device, dtype=torch.float32) * (-math.log(10000.0) / half)
    )  # (half,)
    angles = position * freq  # (L, half)
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)  # (L, 2 * half)
    if table.shape[-1] < dim:
        table = F.pad(table, (0, dim - table.shape[-1]))
    return table.to(dtype)


class CrossModalBlock(nn.Module):
    """One MulT cross-modal transformer block: the target stream attends to a source, then FFN.

    Pre-norm, as in MulT: ``x + Attn(LN(x), LN(src))`` then ``x + FFN(LN(x))``, ReLU FFN.
    """

    def __init__(
        self, d_model: int, n_heads: int, ffn_dim: int, attention: str, dropout: float
    ) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not a multiple of n_heads {n_heads}")
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {attention!r}")
        self.n_heads = n_heads
        self.attention = attention
        self.norm_q = nn.LayerNorm(d_model)
        self.norm_kv = nn.LayerNorm(d_model)
        self.q_proj = nn.Linear(d_model, d_model)
        self.kv_proj = nn.Linear(d_model, 2 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.norm_ffn = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(
            nn.Linear(d_model, ffn_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn_dim, d_model)
        )
        self.dropout = nn.Dropout(dropout)

    def _heads(self, x: Tensor) -> Tensor:
        b, length, d = x.shape
        return x.view(b, length, self.n_heads, d // self.n_heads).transpose(1, 2)  # (b, H, L, d_h)

    def forward(self, x: Tensor, source: Tensor, key_mask: Tensor | None) -> Tensor:
        """x: (b, Lq, d) target stream; source: (b, Lk, d); key_mask: (b, Lk) bool or None.
        Returns the updated stream (b, Lq, d)."""
        q = self._heads(self.q_proj(self.norm_q(x)))  # (b, H, Lq, d_h)
        k, v = (self._heads(t) for t in self.kv_proj(self.norm_kv(source)).chunk(2, dim=-1))
        attend = materialized_attention if self.attention == "materialized" else sdpa_attention
        a = attend(q, k, v, key_mask)  # (b, H, Lq, d_h)
        a = a.transpose(1, 2).reshape(x.shape)  # (b, Lq, d)
        x = x + self.dropout(self.out_proj(a))
        return x + self.dropout(self.ffn(self.norm_ffn(x)))


class CrossAttentionFusion(nn.Module):
    """MulT-style cross-attention fusion network with the interface of our model.

    ``forward(features, masks)`` takes what :class:`model.CoupledMambaForSentiment` takes and
    answers a :class:`model.SentimentOutput`. Build it with :meth:`from_config` to get the
    same width and depth as a Coupled Mamba config.
    """

    def __init__(
        self,
        config: CoupledMambaConfig,
        attention: str = "materialized",
        n_heads: int = 4,
        ffn_dim: int | None = None,
    ) -> None:
        super().__init__()
        config.validate()
        if config.n_modalities < 2:
            raise ValueError("cross-modal attention needs at least two modalities")
        self.config = config
        self.attention = attention
        self.n_heads = n_heads
        d, M = config.d_model, config.n_modalities
        self.ffn_dim = ffn_dim if ffn_dim is not None else config.d_inner
        self.modalities = config.modalities
        self.input_proj = nn.ModuleDict(
            {m: nn.Linear(config.feature_dims[m], d) for m in self.modalities}
        )
        self.input_dropout = nn.Dropout(config.dropout)
        # One stream of n_layers blocks per ordered pair (target <- source).
        self.pairs = [(m, k) for m in self.modalities for k in self.modalities if k != m]
        self.streams = nn.ModuleDict(
            {
                f"{m}<-{k}": nn.ModuleList(
                    CrossModalBlock(d, n_heads, self.ffn_dim, attention, config.dropout)
                    for _ in range(config.n_layers)
                )
                for m, k in self.pairs
            }
        )
        self.stream_norms = nn.ModuleDict({f"{m}<-{k}": nn.LayerNorm(d) for m, k in self.pairs})
        self.merge = nn.ModuleDict({m: nn.Linear((M - 1) * d, d) for m in self.modalities})
        self.final_norms = nn.ModuleDict({m: nn.LayerNorm(d) for m in self.modalities})
        self.fusion = Fusion(config)
        self.regression_head = nn.Sequential(
            nn.Linear(d, d), nn.GELU(), nn.Dropout(config.dropout), nn.Linear(d, 1)
        )
        self.class_head = nn.Sequential(
            nn.Linear(d, d), nn.GELU(), nn.Dropout(config.dropout), nn.Linear(d, len(CLASS_NAMES))
        )

    @classmethod
    def from_config(
        cls, config: CoupledMambaConfig, attention: str = "materialized", n_heads: int = 4
    ) -> CrossAttentionFusion:
        """The baseline with the width (d_model, inner width d_inner) and depth (n_layers) of
        ``config``."""
        return cls(config, attention=attention, n_heads=n_heads, ffn_dim=config.d_inner)

    @property
    def depth(self) -> int:
        """Cross-modal blocks per stream (= ``config.n_layers``)."""
        first = cast(nn.ModuleList, next(iter(self.streams.values())))
        return len(first)

    def count_parameters(self) -> int:
        """Number of parameters."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, features: dict[str, Tensor], masks: dict[str, Tensor]) -> SentimentOutput:
        """Score a batch.

        Args:
            features: {modality: (b, L, F_m)}, every modality of the config, one shared b and L.
            masks: {modality: (b, L) bool}, True at valid steps; a missing mask = all valid.
        """
        param = next(self.parameters())
        first = features[self.modalities[0]]
        batch, length = first.shape[0], first.shape[1]
        pos = sinusoidal_positions(length, self.config.d_model, param.device, param.dtype)
        scale = math.sqrt(self.config.d_model)  # MulT's embed_scale
        inputs: dict[str, Tensor] = {}
        valid: dict[str, Tensor] = {}
        for m in self.modalities:
            mask = masks.get(m)
            if mask is None:
                mask = torch.ones(batch, length, dtype=torch.bool, device=param.device)
            mask = mask.to(param.device)
            feature = torch.where(mask[..., None], features[m].to(param), 0.0)
            x = scale * self.input_proj[m](feature) + pos  # (b, L, d)
            inputs[m] = self.input_dropout(x) * mask[..., None]
            valid[m] = mask
        # Key masks: None where nothing is padded (lets SDPA take its fused kernel). A sample
        # with no valid key at all attends everywhere and has its output zeroed below.
        key_masks: dict[str, Tensor | None] = {}
        present = {m: valid[m].any(dim=-1) for m in self.modalities}  # (b,) each
        for m in self.modalities:
            if bool(valid[m].all()):
                key_masks[m] = None
            else:
                key_masks[m] = valid[m] | ~present[m][:, None]

        hidden = []
        for m in self.modalities:
            outs = []
            for k in self.modalities:
                if k == m:
                    continue
                x = inputs[m]
                for block in cast(nn.ModuleList, self.streams[f"{m}<-{k}"]):
                    x = block(x, inputs[k], key_masks[k])  # (b, L, d)
                x = self.stream_norms[f"{m}<-{k}"](x) * present[k][:, None, None]
                outs.append(x)
            merged = self.merge[m](torch.cat(outs, dim=-1))  # (b, L, d)
            hidden.append(self.final_norms[m](merged) * valid[m][..., None])
        stacked = torch.stack(hidden)  # (M, b, L, d)
        mask_stack = torch.stack([valid[m] for m in self.modalities])  # (M, b, L)
        pooled = masked_pool(stacked, mask_stack, "mean").transpose(0, 1)  # (b, M, d)
        present_bm = mask_stack.any(dim=-1).transpose(0, 1)  # (b, M)
        fused, weights = self.fusion(pooled, present_bm)
        low, high = self.config.label_scale
        raw = self.regression_head(fused).squeeze(-1)
        score = (low + high) / 2 + (high - low) / 2 * torch.tanh(raw)
        logits = self.class_head(fused)
        return SentimentOutput(
            score=score,
            logits=logits,
            probabilities=torch.softmax(logits, dim=-1),
            modality_weights=weights,
            present=present_bm,
        )
