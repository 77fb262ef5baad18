"""Coupled Mamba for multimodal sentiment (Li et al., arXiv 2405.18014), in one file.

Read top to bottom:

1. ``MambaMixer``: one modality's Mamba-1 mixer, everything around the scan.
2. ``CoupledMambaLayer``: the per-modality pre-norm mixers of one layer, whose selective scans
   run as ONE coupled scan: ``h[m,t] = exp(dt[m,t] A[m]) sum_k W[m,k] h[k,t-1] + dt B u``.
3. ``FeatureMixing``: the released code's between-layer Linear mix (ablation only).
4. Pooling and fusion: masked pooling over time per modality, then a gate over modalities.
5. ``CoupledMambaForSentiment``: input projections, layers, pooling, fusion, the two heads.

Chunked inference. Without gradients, a sequence longer than ``inference_chunk_size`` steps (a
runtime setting of the model, not of the checkpoint) runs through all layers one chunk of time
at a time: each layer carries its conv inputs (the last d_conv - 1 steps) and its scan state
(``LayerState``) to the next chunk, and pooling accumulates over chunks, so activation memory is
bounded by the chunk, not by L. The answer equals the unchunked one up to float rounding.
Training (gradients on) always runs the whole sequence at once.

Shapes: b = batch, L = time steps (shared by all modalities), M = modalities,
d = d_model, D = d_inner = expand * d_model, N = d_state, R = dt_rank.

Masks. Every modality has a (b, L) mask, True at valid steps. Padding and absent modalities
must never change an answer, so a masked step carries no signal anywhere:
- the mixer's input is zeroed before the causal conv (nothing leaks forward through the conv);
- the conv output u and the step size dt are zeroed, so the scan neither decays nor writes the
  state at a masked step (dt = 0 means exp(dt A) = 1 and dt B u = 0): the state is carried over
  the gap, mixed with the other modalities' states through W like at any other step;
- the residual stream is zeroed at masked steps after every layer;
- pooling reads valid steps only, and fusion gives absent modalities zero weight.
Trailing padding cannot reach earlier steps (everything is causal in time and per-sample), so a
clip's answer does not depend on what it is batched with.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Self, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import CLASS_NAMES, CoupledMambaConfig
from model.ops.fast_path import (
    ConvFn,
    FastPath,
    causal_conv_rows,
    check_scan_backend_name,
    choose_fast_path,
    stack_modalities,
)
from model.ops.mamba_kernels import KernelChoice

if TYPE_CHECKING:
    from model.streaming import StreamState


@dataclass
class SentimentOutput:
    """What the model answers for a batch.

    Attributes:
        score: (b,) regression score on the config's label scale.
        logits: (b, 3) class logits, order negative, neutral, positive.
        probabilities: (b, 3) softmax of ``logits``.
        modality_weights: (b, M) fusion weight of each modality (zero where absent), in
            ``config.modalities`` order.
        present: (b, M) bool, whether the modality has at least one valid step.
        emotion_logits: (b, E) logits of the emotion head in ``config.emotion_classes``
            order, or None when the network has no emotion head.
        emotion_probabilities: (b, E) softmax of ``emotion_logits``, or None.
    """

    score: Tensor
    logits: Tensor
    probabilities: Tensor
    modality_weights: Tensor
    present: Tensor
    emotion_logits: Tensor | None = None
    emotion_probabilities: Tensor | None = None

    def labels(self) -> list[str]:
        """The most probable class name of each sample."""
        return [CLASS_NAMES[i] for i in self.probabilities.argmax(dim=-1).tolist()]


DEFAULT_INFERENCE_CHUNK = 256
"""Time steps per chunk of chunked inference (see the module docstring); None turns it off."""


@dataclass
class LayerState:
    """What one layer carries from a chunk of time to the next in chunked inference.

    Attributes:
        conv: (M, b, D, d_conv - 1) the last d_conv - 1 conv inputs of every modality (masked,
            zeros before the first step).
        ssm: (M, b, D, N) the scan's last state (float32, float64 for a float64 model).
    """

    conv: Tensor
    ssm: Tensor


def _make_norm(config: CoupledMambaConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.d_model, eps=config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps)


# ---------------------------------------------------------------------------------------------
# 1. One modality's Mamba-1 mixer
# ---------------------------------------------------------------------------------------------


class MambaMixer(nn.Module):
    """Mamba-1 mixer of one modality, split around the scan so that a layer can couple scans.

    ``scan_inputs`` does in_proj -> (u, z), causal depthwise conv + SiLU, x_proj -> (dt, B, C),
    dt = softplus(dt_proj(dt) + bias); the layer runs the coupled scan; ``out_proj`` maps back.
    """

    def __init__(self, config: CoupledMambaConfig) -> None:
        super().__init__()
        d, D, N, R = config.d_model, config.d_inner, config.d_state, config.resolved_dt_rank
        self.d_inner, self.d_state, self.dt_rank = D, N, R
        self.in_proj = nn.Linear(d, 2 * D, bias=False)
        # Depthwise and causal: pad k-1 on both sides, keep the first L outputs.
        self.conv1d = nn.Conv1d(D, D, config.d_conv, groups=D, padding=config.d_conv - 1)
        self.x_proj = nn.Linear(D, R + 2 * N, bias=False)
        self.dt_proj = nn.Linear(R, D, bias=True)
        # S4D-real init: A[:, n] = -(n + 1), stored as log so that A stays negative.
        A = torch.arange(1, N + 1, dtype=torch.float32).repeat(D, 1)  # (D, N)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(D))
        self.out_proj = nn.Linear(D, d, bias=False)
        self._init_dt(config)

    @torch.no_grad()
    def _init_dt(self, config: CoupledMambaConfig) -> None:
        # Mamba's dt init: the weight keeps dt_proj's output at unit scale; the bias is the
        # inverse softplus of a dt drawn log-uniformly in [dt_min, dt_max], so that
        # softplus(bias) starts in that range.
        bound = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -bound, bound)
        log_dt = torch.rand(self.d_inner) * (
            math.log(config.dt_max) - math.log(config.dt_min)
        ) + math.log(config.dt_min)
        dt = torch.exp(log_dt).clamp(min=config.dt_init_floor)
        inv_softplus_dt = dt + torch.log(-torch.expm1(-dt))  # softplus^-1(dt)
        self.dt_proj.bias.copy_(inv_softplus_dt)

    def A(self) -> Tensor:
        """The continuous-time state matrix (diagonal per channel), (D, N), all negative."""
        return -torch.exp(self.A_log.float())

    def scan_inputs(
        self,
        x: Tensor,
        mask: Tensor,
        conv_state: Tensor | None = None,
        carry: bool = False,
        conv: ConvFn = causal_conv_rows,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        """Everything before the scan, for the L steps of ``x`` (a whole sequence, or one chunk
        of time of a longer one).

        Args:
            x: (b, L, d) normed hidden states.
            mask: (b, L) float, 1 at valid steps and 0 elsewhere.
            conv_state: (b, D, d_conv - 1) the conv inputs of the steps just before ``x``
                (None: ``x`` starts the sequence, zeros before it).
            carry: also return the conv state to hand to the next chunk.
            conv: the model's conv (``FastPath.conv``; default: the torch conv).

        Returns:
            u, dt, z: (b, L, D); B, C: (b, L, N), as rows of time steps; u and dt are zero at
            masked steps. Then the next conv state (b, D, d_conv - 1) when ``carry`` or
            ``conv_state`` is given, else None.
        """
        u, z = self.in_proj(x).chunk(2, dim=-1)  # (b, L, D) each
        u = u * mask[..., None]  # padding must not leak into later steps through the conv
        u, next_state = conv(u, self.conv1d.weight[:, 0, :], self.conv1d.bias, conv_state, carry)
        u = u * mask[..., None]  # (b, L, D)
        dt, B, C = self.x_proj(u).split(
            [self.dt_rank, self.d_state, self.d_state], dim=-1
        )  # (b, L, R), (b, L, N), (b, L, N)
        dt = F.softplus(self.dt_proj(dt)) * mask[..., None]  # (b, L, D), 0 at masked steps
        return u, dt, B, C, z, next_state


# ---------------------------------------------------------------------------------------------
# 2. One coupled layer
# ---------------------------------------------------------------------------------------------


def fixed_coupling(kind: str, n_modalities: int) -> Tensor | None:
    """The coupling matrix W of a non-learned ``state_coupling`` (None = identity)."""
    M = n_modalities
    if kind == "none":
        return None
    if kind == "mean":
        return torch.full((M, M), 1.0 / M)
    if kind == "sum":
        # The paper's literal "sum of states": the transition can reach M per step, so the
        # state grows geometrically wherever exp(dt A) > 1/M. Kept as an ablation.
        return torch.ones(M, M)
    raise ValueError(f"no fixed coupling for state_coupling={kind!r}")


class CoupledMambaLayer(nn.Module):
    """Pre-norm Mamba mixers, one per modality, whose scans are coupled through W (M, M)."""

    def __init__(self, config: CoupledMambaConfig) -> None:
        super().__init__()
        self.modalities = config.modalities
        self.state_coupling = config.state_coupling
        M = config.n_modalities
        self.norms = nn.ModuleDict({m: _make_norm(config) for m in self.modalities})
        self.mixers = nn.ModuleDict({m: MambaMixer(config) for m in self.modalities})
        self.dropout = nn.Dropout(config.dropout)
        if config.state_coupling == "learned":
            # softmax of equal logits = ones / M: starts at mean coupling, stays row-stochastic.
            self.coupling_logits = nn.Parameter(torch.zeros(M, M))
        else:
            W = fixed_coupling(config.state_coupling, M)
            self.register_buffer("coupling_fixed", W, persistent=False)

    def coupling(self) -> Tensor | None:
        """W (M, M) as used by the scan; None stands for the identity."""
        if self.state_coupling == "learned":
            return torch.softmax(self.coupling_logits.float(), dim=-1)
        W = self.coupling_fixed
        return W if isinstance(W, Tensor) else None

    def forward(
        self,
        hidden: Tensor,
        mask: Tensor,
        path: FastPath,
        state: LayerState | None = None,
        carry: bool = False,
    ) -> tuple[Tensor, LayerState | None]:
        """The layer on a sequence, or on one chunk of time that follows ``state``.

        Args:
            hidden: (M, b, L, d) the residual stream.
            mask: (M, b, L) float, 1 at valid steps.
            path: the model's conv and scan (``CoupledMambaForSentiment.fast_path``).
            state: what the previous chunk left (None: the sequence starts here).
            carry: also return the state after these steps, for the next chunk.

        Returns:
            (M, b, L, d) and, when ``carry`` or ``state`` is given, the state after the steps.
        """
        want_state = carry or state is not None
        mixers = [cast(MambaMixer, self.mixers[m]) for m in self.modalities]
        parts = [
            mixers[i].scan_inputs(
                self.norms[m](hidden[i]),
                mask[i],
                state.conv[i] if state is not None else None,
                want_state,
                path.conv,
            )
            for i, m in enumerate(self.modalities)
        ]
        fields: list[list[Tensor | None]] = [list(f) for f in zip(*parts, strict=True)]
        del parts  # free each modality's pieces as soon as they are stacked
        inputs = []
        for k in range(5):
            inputs.append(path.scan.stack(cast(list[Tensor], fields[k])))
            fields[k] = []
        u, dt, B, C, z = inputs  # the scan's layout: rows (M, b, L, X) or (M, b, X, L)
        del inputs
        A = torch.stack([mx.A() for mx in mixers])  # (M, D, N)
        D = torch.stack([mx.D.float() for mx in mixers])  # (M, D)
        y, last = path.scan(
            u, dt, A, B, C, D, z, self.coupling(), state.ssm if state is not None else None,
            want_state,
        )  # fmt: skip
        del u, dt, B, C, z
        next_state = None
        if want_state:
            assert last is not None
            conv = torch.stack(cast(list[Tensor], fields[5]))  # (M, b, D, k-1)
            next_state = LayerState(conv=conv, ssm=last)
        # y: (M, b, L, D)
        out = stack_modalities([mx.out_proj(y[i]) for i, mx in enumerate(mixers)], copy=False)
        del y
        return (hidden + self.dropout(out)) * mask[..., None], next_state


# ---------------------------------------------------------------------------------------------
# 3. The released code's feature mixing (ablation)
# ---------------------------------------------------------------------------------------------


class FeatureMixing(nn.Module):
    """Between layers, each modality adds a Linear map of the other modalities' outputs.

    This is what the paper's released code does instead of coupling states; it is kept as an
    option so that the two can be compared. Absent modalities contribute zeros.
    """

    def __init__(self, config: CoupledMambaConfig) -> None:
        super().__init__()
        M, d = config.n_modalities, config.d_model
        self.modalities = config.modalities
        self.mix = nn.ModuleDict({m: nn.Linear((M - 1) * d, d) for m in self.modalities})

    def forward(self, hidden: Tensor, mask: Tensor) -> Tensor:
        """hidden: (M, b, L, d); mask: (M, b, L) float. Returns (M, b, L, d)."""
        out = []
        for i, m in enumerate(self.modalities):
            others = torch.cat([hidden[k] for k in range(len(self.modalities)) if k != i], -1)
            out.append(hidden[i] + self.mix[m](others))
        return torch.stack(out) * mask[..., None]


# ---------------------------------------------------------------------------------------------
# 4. Pooling over time and fusion over modalities
# ---------------------------------------------------------------------------------------------


def masked_pool(hidden: Tensor, mask: Tensor, kind: str) -> Tensor:
    """Pool (..., L, d) over valid steps of a (..., L) bool mask; all-masked rows give zeros."""
    present = mask.any(dim=-1, keepdim=True)  # (..., 1)
    if kind == "mean":
        weights = mask.to(hidden.dtype)
        total = (hidden * weights[..., None]).sum(dim=-2)
        return total / weights.sum(dim=-1, keepdim=True).clamp_min(1.0)
    if kind == "last":
        length = mask.shape[-1]
        steps = torch.arange(length, device=mask.device)
        last = torch.where(mask, steps, -1).amax(dim=-1).clamp_min(0)  # (...,)
        index = last[..., None, None].expand(*last.shape, 1, hidden.shape[-1])
        picked = hidden.gather(-2, index).squeeze(-2)
        return picked * present.to(hidden.dtype)
    if kind == "max":
        filled = hidden.masked_fill(~mask[..., None], float("-inf")).amax(dim=-2)
        return torch.where(present, filled, torch.zeros_like(filled))
    raise ValueError(f"unknown pooling {kind!r}")


class StreamingPool:
    """``masked_pool`` over time, fed one chunk of steps at a time.

    ``add`` each chunk in time order, then ``result()`` equals ``masked_pool`` of the whole
    sequence ("last" and "max" exactly; "mean" up to the order of the float additions).
    """

    def __init__(self, kind: str) -> None:
        if kind not in ("mean", "last", "max"):
            raise ValueError(f"unknown pooling {kind!r}")
        self.kind = kind
        self._value: Tensor | None = None  # (..., d): running sum, last or max
        self._count: Tensor | None = None  # (..., 1): valid steps so far (mean)
        self._present: Tensor | None = None  # (..., 1) bool: any valid step so far

    def add(self, hidden: Tensor, mask: Tensor) -> None:
        """hidden: (..., c, d) a chunk of steps; mask: (..., c) bool."""
        present = mask.any(dim=-1, keepdim=True)  # (..., 1)
        if self.kind == "mean":
            weights = mask.to(hidden.dtype)
            value = (hidden * weights[..., None]).sum(dim=-2)
            count = weights.sum(dim=-1, keepdim=True)
            if self._value is not None and self._count is not None:
                value, count = self._value + value, self._count + count
            self._count = count
        elif self.kind == "last":
            value = masked_pool(hidden, mask, "last")  # zeros where the chunk has no valid step
            if self._value is not None:
                value = torch.where(present, value, self._value)
        else:
            value = hidden.masked_fill(~mask[..., None], float("-inf")).amax(dim=-2)
            if self._value is not None:
                value = torch.maximum(self._value, value)
        self._value = value
        self._present = present if self._present is None else self._present | present

    def result(self) -> Tensor:
        """The pooled (..., d); all-masked rows give zeros."""
        if self._value is None or self._present is None:
            raise RuntimeError("StreamingPool.result() before any add()")
        if self.kind == "mean":
            assert self._count is not None
            return self._value / self._count.clamp_min(1.0)
        if self.kind == "last":
            return self._value * self._present.to(self._value.dtype)
        return torch.where(self._present, self._value, torch.zeros_like(self._value))


def masked_softmax(logits: Tensor, present: Tensor) -> Tensor:
    """Softmax over the last axis among ``present`` entries; absent entries get exactly 0 and a
    row with nothing present gets all zeros."""
    logits = logits.masked_fill(~present, torch.finfo(logits.dtype).min)
    weights = torch.softmax(logits, dim=-1) * present.to(logits.dtype)
    return weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(logits.dtype).tiny)


class Fusion(nn.Module):
    """Combine pooled modalities (b, M, d) into one vector (b, d) and per-modality weights."""

    def __init__(self, config: CoupledMambaConfig) -> None:
        super().__init__()
        M, d = config.n_modalities, config.d_model
        self.kind = config.fusion
        if self.kind == "gate":
            # Content score per modality plus a learned per-modality prior (a shared bias would
            # be redundant: softmax ignores a constant shift).
            self.gate = nn.Linear(d, 1, bias=False)
            self.prior = nn.Parameter(torch.zeros(M))
        elif self.kind == "concat":
            self.proj = nn.Linear(M * d, d)

    def forward(self, pooled: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        """pooled: (b, M, d); present: (b, M) bool. Returns fused (b, d), weights (b, M)."""
        if self.kind == "gate":
            logits = self.gate(pooled).squeeze(-1) + self.prior  # (b, M)
            weights = masked_softmax(logits, present)
        else:
            count = present.sum(dim=-1, keepdim=True).clamp_min(1)
            weights = present.to(pooled.dtype) / count
        if self.kind == "concat":
            zeroed = pooled * present[..., None].to(pooled.dtype)
            return self.proj(zeroed.flatten(1)), weights
        return (weights[..., None] * pooled).sum(dim=1), weights


# ---------------------------------------------------------------------------------------------
# 5. The model
# ---------------------------------------------------------------------------------------------


class CoupledMambaForSentiment(nn.Module):
    """Coupled Mamba fusion network with a regression head and a 3-class head.

    ``forward(features, masks)`` takes per-modality features (b, L, F_m) on one shared time
    grid and (b, L) bool masks, and returns a :class:`SentimentOutput`. A modality missing
    from the dicts is absent (fully masked).

    The fast path (scan backend, conv and optional kernels: ``model.ops.fast_path``) is chosen
    once for the device the parameters are on, and logged: by :meth:`set_scan_backend` (which
    ``load_checkpoint`` calls on the final device), else at first use. Moving the model to
    another device (``.to``, ``.cuda``, ``.cpu``) drops the choice, and the same request
    ("auto" or a name) is resolved again for the new device at its first use.
    """

    def __init__(self, config: CoupledMambaConfig, scan_backend: str = "auto") -> None:
        super().__init__()
        config.validate()
        self.config = config
        d = config.d_model
        self.modalities = config.modalities
        self.input_proj = nn.ModuleDict(
            {m: nn.Linear(config.feature_dims[m], d) for m in self.modalities}
        )
        self.input_dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(CoupledMambaLayer(config) for _ in range(config.n_layers))
        self.feature_mixing = (
            nn.ModuleList(FeatureMixing(config) for _ in range(config.n_layers - 1))
            if config.feature_mixing and config.n_modalities > 1
            else None
        )
        self.final_norms = nn.ModuleDict({m: _make_norm(config) for m in self.modalities})
        self.fusion = Fusion(config)
        self.regression_head = nn.Sequential(
            nn.Linear(d, d), nn.GELU(), nn.Dropout(config.dropout), nn.Linear(d, 1)
        )
        self.class_head = nn.Sequential(
            nn.Linear(d, d), nn.GELU(), nn.Dropout(config.dropout), nn.Linear(d, len(CLASS_NAMES))
        )
        n_emotions = len(config.emotion_classes)
        self.emotion_head = (
            nn.Sequential(
                nn.Linear(d, d), nn.GELU(), nn.Dropout(config.dropout), nn.Linear(d, n_emotions)
            )
            if n_emotions
            else None
        )
        self._rescale_residual_outputs()
        check_scan_backend_name(scan_backend)  # an unknown name fails here, not at first use
        self._scan_request = scan_backend
        self._fast_path: FastPath | None = None
        self.inference_chunk_size: int | None = DEFAULT_INFERENCE_CHUNK

    @torch.no_grad()
    def _rescale_residual_outputs(self) -> None:
        # GPT-2 / Mamba pre-norm trick: keep the residual stream's variance independent of depth.
        for layer in self.layers:
            assert isinstance(layer, CoupledMambaLayer)
            for mixer in layer.mixers.values():
                assert isinstance(mixer, MambaMixer)
                mixer.out_proj.weight /= math.sqrt(self.config.n_layers)

    # -- scan backend ---------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def fast_path(self) -> FastPath:
        """The conv and scan every layer runs, chosen for the parameters' device (at first use
        unless :meth:`set_scan_backend` chose it)."""
        if self._fast_path is None:
            self._fast_path = choose_fast_path(
                self.device, self.config.state_coupling, self._scan_request
            )
        return self._fast_path

    @property
    def scan_backend(self) -> str:
        """The concrete scan backend in use (a name of ``model.ops.BACKENDS``)."""
        return self.fast_path.scan_backend

    @property
    def kernels(self) -> KernelChoice:
        """The optional kernels in use (``model.ops.mamba_kernels``)."""
        return self.fast_path.kernels

    def set_scan_backend(self, name: str = "auto") -> str:
        """Choose the fast path for the model's current device; returns the scan backend.

        ``name`` is "auto" (the best for the device) or a name of ``model.ops.BACKENDS``. Also
        chooses the optional kernels (causal-conv1d's conv and, for uncoupled layers on the GPU
        kernel, mamba-ssm's scan, where they import). The choice and its reasons are logged;
        ``describe()`` reports it. Raises ValueError for an unknown name.
        """
        self._fast_path = choose_fast_path(self.device, self.config.state_coupling, name)
        self._scan_request = name
        return self._fast_path.scan_backend

    def set_kernels(self, conv: str = "torch", uncoupled_scan: str | None = None) -> KernelChoice:
        """Force the optional kernels (benchmarks, tests); ``set_scan_backend`` chooses them.
        The scan backend stays; a move to another device chooses again.

        Raises ValueError for an unknown name and RuntimeError when a kernel does not import.
        """
        choice = KernelChoice(conv, uncoupled_scan)
        self._fast_path = choose_fast_path(
            self.device, self.config.state_coupling, self.scan_backend, kernels=choice
        )
        return choice

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Self:
        # Every device move (.to, .cuda, .cpu) runs through here: a fast path chosen for the
        # old device is dropped, and chosen again for the new one at its first use.
        out = super()._apply(fn, recurse)
        if self._fast_path is not None and self._fast_path.device != self.device:
            self._fast_path = None
        return out

    def set_inference_chunk_size(self, steps: int | None) -> None:
        """Steps per chunk of chunked inference (None: never chunk). A runtime setting: it
        changes memory and speed, not the answer (beyond float rounding), and is not saved."""
        if steps is not None and (
            not isinstance(steps, int) or isinstance(steps, bool) or steps < 1
        ):
            raise ValueError(f"inference chunk size must be a positive int or None, got {steps!r}")
        self.inference_chunk_size = steps

    # -- forward --------------------------------------------------------------------------------

    def _validate_inputs(
        self, features: dict[str, Tensor], masks: dict[str, Tensor]
    ) -> tuple[int, int, Tensor]:
        """Validate the dicts; return batch, L and the masks (M, b, L) bool on the model's
        device (all False for an absent modality)."""
        unknown = sorted(set(features) - set(self.modalities))
        if unknown:
            raise ValueError(
                f"features has modalities {unknown} the model has no branch for "
                f"(it has {self.modalities})"
            )
        without_features = sorted(set(masks) - set(features))
        if without_features:
            raise ValueError(f"masks given for modalities without features: {without_features}")
        if not features:
            raise ValueError("features is empty: give at least one modality")
        shapes = {m: tuple(f.shape) for m, f in features.items()}
        first = next(iter(shapes.values()))
        if any(len(s) != 3 for s in shapes.values()) or any(
            s[:2] != first[:2] for s in shapes.values()
        ):
            raise ValueError(
                f"features must be (batch, L, F) with one shared batch and L, got {shapes}"
            )
        batch, length = first[0], first[1]
        if length == 0:
            raise ValueError("features have L = 0 time steps")
        device = next(self.parameters()).device
        valid = []
        for m in self.modalities:
            if m not in features:  # absent modality: fully masked
                valid.append(torch.zeros(batch, length, dtype=torch.bool, device=device))
                continue
            feature = features[m]
            if feature.shape[-1] != self.config.feature_dims[m]:
                raise ValueError(
                    f"features[{m!r}] has {feature.shape[-1]} features, the model "
                    f"expects {self.config.feature_dims[m]}"
                )
            mask = masks.get(m)
            if mask is None:
                mask = torch.ones(batch, length, dtype=torch.bool, device=feature.device)
            if tuple(mask.shape) != (batch, length) or mask.dtype != torch.bool:
                raise ValueError(
                    f"masks[{m!r}] must be a bool tensor of shape "
                    f"({batch}, {length}), got {mask.dtype} {tuple(mask.shape)}"
                )
            valid.append(mask.to(device))
        return batch, length, torch.stack(valid)

    def _project(self, features: dict[str, Tensor], valid: Tensor, start: int, end: int) -> Tensor:
        """Projected inputs (M, b, end - start, d) of steps [start, end), zero where masked."""
        param = next(self.parameters())
        inputs = []
        for i, m in enumerate(self.modalities):
            mask = valid[i, :, start:end]  # (b, c)
            if m not in features:  # absent modality: zeros
                inputs.append(param.new_zeros(*mask.shape, self.config.d_model))
                continue
            # where, not multiply: masked steps may hold inf/NaN (MOSI audio has -inf).
            feature = torch.where(mask[..., None], features[m][:, start:end].to(param), 0.0)
            inputs.append(self.input_proj[m](feature) * mask[..., None])
        return stack_modalities(inputs, copy=False)

    def _time_chunks(self, length: int) -> list[tuple[int, int]]:
        """[start, end) of each chunk of time the layers run on: one chunk under autograd, when
        chunking is off or when L fits in one; else ``inference_chunk_size`` steps each."""
        size = self.inference_chunk_size
        if torch.is_grad_enabled() or size is None or length <= size:
            return [(0, length)]
        return [(start, min(length, start + size)) for start in range(0, length, size)]

    def _encode_chunks(
        self,
        features: dict[str, Tensor],
        valid: Tensor,
        chunks: list[tuple[int, int]],
        states: list[LayerState | None] | None = None,
    ) -> Iterator[Tensor]:
        """Run the layers over the chunks in time order, carrying each layer's state; yield
        each chunk's hidden states (M, b, c, d) after the final norms, zero at masked steps.

        ``states``, when given, holds each layer's state before the first chunk (None: the
        sequence starts here) and is updated in place to the state after the last chunk (the
        streaming step, ``model.streaming``)."""
        carry = len(chunks) > 1 or states is not None
        path = self.fast_path
        if states is None:
            states = [None] * len(self.layers)
        for start, end in chunks:
            hidden = self._project(features, valid, start, end)  # (M, b, c, d)
            maskf = valid[:, :, start:end].to(hidden.dtype)  # (M, b, c)
            hidden = self.input_dropout(hidden) * maskf[..., None]
            for i, layer in enumerate(self.layers):
                assert isinstance(layer, CoupledMambaLayer)
                hidden, states[i] = layer(hidden, maskf, path, states[i], carry)
                if self.feature_mixing is not None and i < len(self.feature_mixing):
                    hidden = self.feature_mixing[i](hidden, maskf)
            hidden = stack_modalities(
                [self.final_norms[m](hidden[i]) for i, m in enumerate(self.modalities)],
                copy=False,
            )
            yield hidden * maskf[..., None]

    def encode(
        self, features: dict[str, Tensor], masks: dict[str, Tensor]
    ) -> tuple[Tensor, Tensor]:
        """Run the layers; return hidden states (M, b, L, d), after the final norms and zero
        at masked steps, and the masks (M, b, L) bool."""
        _, length, valid = self._validate_inputs(features, masks)
        chunks = self._time_chunks(length)
        if len(chunks) == 1:
            return next(self._encode_chunks(features, valid, chunks)), valid
        out: Tensor | None = None
        for (start, end), hidden in zip(
            chunks, self._encode_chunks(features, valid, chunks), strict=True
        ):
            if out is None:
                out = hidden.new_empty(*hidden.shape[:2], length, hidden.shape[-1])
            out[:, :, start:end] = hidden
        assert out is not None
        return out, valid

    def forward(self, features: dict[str, Tensor], masks: dict[str, Tensor]) -> SentimentOutput:
        """Score a batch.

        Args:
            features: {modality: float tensor (b, L, F_m)}, one shared b and L.
            masks: {modality: bool tensor (b, L)}, True at valid steps; a modality with
                features but no mask is taken as valid at every step.

        Returns:
            :class:`SentimentOutput` (score on ``config.label_scale``).
        """
        _, length, mask = self._validate_inputs(features, masks)  # mask: (M, b, L)
        chunks = self._time_chunks(length)
        if len(chunks) == 1:
            hidden = next(self._encode_chunks(features, mask, chunks))  # (M, b, L, d)
            pooled = masked_pool(hidden, mask, self.config.pooling)  # (M, b, d)
        else:  # chunked inference: pool as the chunks come, never hold (M, b, L, d)
            pool = StreamingPool(self.config.pooling)
            for (start, end), hidden in zip(
                chunks, self._encode_chunks(features, mask, chunks), strict=True
            ):
                pool.add(hidden, mask[:, :, start:end])
            pooled = pool.result()
        return self._heads(pooled, mask.any(dim=-1))

    def _heads(self, pooled: Tensor, present: Tensor) -> SentimentOutput:
        """Fusion and heads on pooled hidden states (M, b, d) and presence (M, b) bool."""
        pooled = pooled.transpose(0, 1)  # (b, M, d)
        present = present.transpose(0, 1)  # (b, M)
        fused, weights = self.fusion(pooled, present)  # (b, d), (b, M)
        low, high = self.config.label_scale
        raw = self.regression_head(fused).squeeze(-1)  # (b,)
        score = (low + high) / 2 + (high - low) / 2 * torch.tanh(raw)
        logits = self.class_head(fused)  # (b, 3)
        emotion_logits = self.emotion_head(fused) if self.emotion_head is not None else None
        return SentimentOutput(
            score=score,
            logits=logits,
            probabilities=torch.softmax(logits, dim=-1),
            modality_weights=weights,
            present=present,
            emotion_logits=emotion_logits,
            emotion_probabilities=(
                torch.softmax(emotion_logits, dim=-1) if emotion_logits is not None else None
            ),
        )

    # -- streaming ------------------------------------------------------------------------------

    def init_stream_state(self, batch: int = 1) -> StreamState:
        """The state of ``batch`` streams before their first step (``model.streaming``)."""
        from model.streaming import init_stream_state

        return init_stream_state(self, batch)

    def step(
        self,
        features: dict[str, Tensor],
        masks: dict[str, Tensor],
        state: StreamState,
        lengths: Tensor | list[int] | None = None,
    ) -> tuple[SentimentOutput, StreamState]:
        """Advance ``state`` by the next steps of each stream and answer on all steps so far.

        Args:
            features: {modality: (b, c, F_m)} the streams' next steps, as in ``forward``.
            masks: {modality: (b, c) bool}, True at valid steps; as in ``forward``.
            state: the streams' state after their earlier steps (``init_stream_state``).
            lengths: (b,) steps of each stream in this chunk (the rest is padding and is
                ignored entirely); None: all c. A stream with 0 steps keeps its state.

        Returns:
            The answer of each stream on everything it has seen (what ``forward`` on the whole
            sequence gives, up to float rounding), and the new state (``state`` is unchanged).
        """
        from model.streaming import stream_step

        return stream_step(self, features, masks, state, lengths)

    # -- metadata -------------------------------------------------------------------------------

    def count_parameters(self, trainable_only: bool = False) -> int:
        """Number of parameters (buffers excluded)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def coupling_matrices(self) -> list[list[list[float]]]:
        """Each layer's W (M x M) as nested lists (identity for ``none``)."""
        out = []
        for layer in self.layers:
            assert isinstance(layer, CoupledMambaLayer)
            W = layer.coupling()
            if W is None:
                W = torch.eye(self.config.n_modalities)
            out.append(W.detach().cpu().tolist())
        return out

    def describe(self) -> dict[str, object]:
        """A JSON-ready architecture summary (for model metadata endpoints and logs)."""
        c = self.config
        param = next(self.parameters())
        return {
            "architecture": "CoupledMambaForSentiment",
            "paper": "arXiv:2405.18014",
            "config_version": c.to_dict()["config_version"],
            "modalities": list(c.modalities),
            "feature_profile": c.feature_profile,
            "feature_dims": dict(c.feature_dims),
            "d_model": c.d_model,
            "d_inner": c.d_inner,
            "d_state": c.d_state,
            "d_conv": c.d_conv,
            "dt_rank": c.resolved_dt_rank,
            "n_layers": c.n_layers,
            "state_coupling": c.state_coupling,
            "coupling_matrices": self.coupling_matrices(),
            "feature_mixing": c.feature_mixing,
            "pooling": c.pooling,
            "fusion": c.fusion,
            "norm": c.norm,
            "label_scale": list(c.label_scale),
            "classes": list(CLASS_NAMES),
            "emotion_classes": list(c.emotion_classes),
            "neutral_band": c.neutral_band,
            "parameters": self.count_parameters(),
            "scan_backend": self.scan_backend,
            "conv_kernel": self.kernels.conv,
            "uncoupled_scan_kernel": self.kernels.uncoupled_scan,
            "inference_chunk_size": self.inference_chunk_size,
            "device": str(param.device),
            "dtype": str(param.dtype).removeprefix("torch."),
        }

    def dummy_inputs(
        self, batch_size: int = 1, length: int = 8, seed: int = 0
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Random features and all-valid masks on the model's device, e.g. for a warm-up."""
        generator = torch.Generator().manual_seed(seed)
        param = next(self.parameters())
        features = {
            m: torch.randn(batch_size, length, self.config.feature_dims[m], generator=generator).to(
                param
            )
            for m in self.modalities
        }
        masks = {
            m: torch.ones(batch_size, length, dtype=torch.bool, device=param.device)
            for m in self.modalities
        }
        return features, masks
