"""Streaming inference: score a sequence as its steps arrive, from a state of fixed size.

``CoupledMambaForSentiment.step`` runs the layers over the new steps of several streams at
once, starting from each stream's :class:`StreamState` (every layer's conv inputs and coupled
scan state, and the running pooling statistics), and answers for every stream on everything it
has seen so far. Stepping a sequence in any chunking gives the answer of one forward over the
whole sequence, up to float rounding; the state's size does not depend on the stream's length.

Streams of different chunk lengths share one step without padding through the scan. Padding
at the end of a chunk would not be harmless here: at a step where every modality is masked,
dt = 0 keeps each state but the coupling W still mixes the modalities' states, so a padded step
would change the carried state. Instead the step runs in segments of time between the distinct
chunk lengths, each on the streams that still have steps there (the batch shrinks as the short
chunks end), exactly like chunked inference continues a scan.

Shapes: b = streams, c = steps in the chunk, M = modalities, d = d_model, D = d_inner,
N = d_state, k = d_conv.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from model.mamba import LayerState, SentimentOutput

if TYPE_CHECKING:
    from model.mamba import CoupledMambaForSentiment


@dataclass
class StreamState:
    """What a batch of streams carries from one step to the next.

    Attributes:
        layers: per layer, conv (M, b, D, k - 1) and scan state (M, b, D, N).
        pool_value: (M, b, d) running sum ("mean"), last valid step ("last") or max ("max").
        pool_count: (M, b, 1) valid steps pooled so far.
        steps: (b,) int64 steps seen so far (valid or not).
    """

    layers: list[LayerState]
    pool_value: Tensor
    pool_count: Tensor
    steps: Tensor

    @property
    def batch_size(self) -> int:
        return int(self.steps.shape[0])

    @property
    def present(self) -> Tensor:
        """(M, b) bool: modalities with at least one valid step so far."""
        return self.pool_count[..., 0] > 0

    def select(self, index: Tensor | list[int]) -> StreamState:
        """The streams at ``index`` (a new state; the tensors are copies)."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.steps.device)
        return StreamState(
            layers=[
                LayerState(conv=s.conv.index_select(1, index), ssm=s.ssm.index_select(1, index))
                for s in self.layers
            ],
            pool_value=self.pool_value.index_select(1, index),
            pool_count=self.pool_count.index_select(1, index),
            steps=self.steps.index_select(0, index),
        )

    @staticmethod
    def cat(states: list[StreamState]) -> StreamState:
        """The streams of ``states`` one after the other in one batch."""
        if not states:
            raise ValueError("StreamState.cat of no states")
        n_layers = len(states[0].layers)
        return StreamState(
            layers=[
                LayerState(
                    conv=torch.cat([s.layers[i].conv for s in states], dim=1),
                    ssm=torch.cat([s.layers[i].ssm for s in states], dim=1),
                )
                for i in range(n_layers)
            ],
            pool_value=torch.cat([s.pool_value for s in states], dim=1),
            pool_count=torch.cat([s.pool_count for s in states], dim=1),
            steps=torch.cat([s.steps for s in states]),
        )

    def split(self) -> list[StreamState]:
        """One state per stream (batch of 1 each)."""
        return [self.select([i]) for i in range(self.batch_size)]

    def nbytes(self) -> int:
        """Bytes held by the state's tensors."""
        tensors = [self.pool_value, self.pool_count, self.steps]
        tensors += [t for s in self.layers for t in (s.conv, s.ssm)]
        return sum(t.numel() * t.element_size() for t in tensors)


def init_stream_state(model: CoupledMambaForSentiment, batch: int) -> StreamState:
    """The state of ``batch`` streams before their first step (zeros: nothing seen)."""
    config = model.config
    param = next(model.parameters())
    M, D, N, k = config.n_modalities, config.d_inner, config.d_state, config.d_conv
    scan_dtype = torch.float64 if param.dtype == torch.float64 else torch.float32
    layers = [
        LayerState(
            conv=param.new_zeros(M, batch, D, k - 1),
            ssm=torch.zeros(M, batch, D, N, dtype=scan_dtype, device=param.device),
        )
        for _ in model.layers
    ]
    # "max" starts at -inf so that the first valid step wins; read through pool_count.
    start = float("-inf") if config.pooling == "max" else 0.0
    return StreamState(
        layers=layers,
        pool_value=param.new_full((M, batch, config.d_model), start),
        pool_count=param.new_zeros(M, batch, 1),
        steps=torch.zeros(batch, dtype=torch.long, device=param.device),
    )


def _pool_chunk(kind: str, value: Tensor, count: Tensor, hidden: Tensor, mask: Tensor) -> Tensor:
    """The running pool value (M, s, d) after a chunk hidden (M, s, c, d), mask (M, s, c)."""
    if kind == "mean":
        return value + (hidden * mask[..., None].to(hidden.dtype)).sum(dim=-2)
    if kind == "max":
        chunk = hidden.masked_fill(~mask[..., None], float("-inf")).amax(dim=-2)
        return torch.maximum(value, chunk)
    # "last": the chunk's last valid step where it has one, else the previous value.
    c = mask.shape[-1]
    steps = torch.arange(c, device=mask.device)
    last = torch.where(mask, steps, -1).amax(dim=-1)  # (M, s)
    index = last.clamp_min(0)[..., None, None].expand(*last.shape, 1, hidden.shape[-1])
    picked = hidden.gather(-2, index).squeeze(-2)
    return torch.where((last >= 0)[..., None], picked, value)


def pooled_state(kind: str, state: StreamState) -> Tensor:
    """``masked_pool`` of everything the streams have seen, (M, b, d); zeros where nothing was
    valid."""
    present = state.pool_count > 0  # (M, b, 1)
    if kind == "mean":
        return state.pool_value / state.pool_count.clamp_min(1.0)
    return torch.where(present, state.pool_value, torch.zeros_like(state.pool_value))


@torch.no_grad()
def stream_step(
    model: CoupledMambaForSentiment,
    features: dict[str, Tensor],
    masks: dict[str, Tensor],
    state: StreamState,
    lengths: Tensor | list[int] | None = None,
) -> tuple[SentimentOutput, StreamState]:
    """Advance ``state`` by the next steps of each stream; see ``CoupledMambaForSentiment.step``."""
    batch, length, valid = model._validate_inputs(features, masks)  # valid: (M, b, c)
    if state.batch_size != batch:
        raise ValueError(f"state has {state.batch_size} streams, the chunk has {batch}")
    device = valid.device
    if lengths is None:
        lengths_t = torch.full((batch,), length, dtype=torch.long, device=device)
    else:
        lengths_t = torch.as_tensor(lengths, dtype=torch.long, device=device)
        if tuple(lengths_t.shape) != (batch,):
            raise ValueError(f"lengths must have one entry per stream ({batch})")
        if bool((lengths_t < 0).any()) or bool((lengths_t > length).any()):
            raise ValueError(f"lengths must lie in [0, {length}], got {lengths_t.tolist()}")
    kind = model.config.pooling
    new = StreamState(
        layers=[LayerState(conv=s.conv.clone(), ssm=s.ssm.clone()) for s in state.layers],
        pool_value=state.pool_value.clone(),
        pool_count=state.pool_count.clone(),
        steps=state.steps + lengths_t,
    )
    start = 0
    for end in sorted({int(n) for n in lengths_t.tolist() if n > 0}):
        # The streams with steps in [start, end): all whose chunk reaches end.
        index = (lengths_t >= end).nonzero().squeeze(-1)
        sub_features = {m: f.index_select(0, index.to(f.device)) for m, f in features.items()}
        sub_valid = valid.index_select(1, index)  # (M, s, c)
        layer_states: list[LayerState | None] = [
            LayerState(conv=s.conv.index_select(1, index), ssm=s.ssm.index_select(1, index))
            for s in new.layers
        ]
        hidden = next(
            model._encode_chunks(sub_features, sub_valid, [(start, end)], layer_states)
        )  # (M, s, end - start, d)
        mask = sub_valid[:, :, start:end]
        for i, carried in enumerate(layer_states):
            assert carried is not None
            new.layers[i].conv.index_copy_(1, index, carried.conv)
            new.layers[i].ssm.index_copy_(1, index, carried.ssm)
        value = _pool_chunk(
            kind,
            new.pool_value.index_select(1, index),
            new.pool_count.index_select(1, index),
            hidden,
            mask,
        )
        new.pool_value.index_copy_(1, index, value)
        count = new.pool_count.index_select(1, index) + mask.sum(dim=-1, keepdim=True).to(
            new.pool_count.dtype
        )
        new.pool_count.index_copy_(1, index, count)
        start = end
    output = model._heads(pooled_state(kind, new), new.present)
    return output, new
