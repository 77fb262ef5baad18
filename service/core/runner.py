"""The model runner: tensors, padding, device memory and out-of-memory recovery.

Only this module (and the model package) touches torch tensors. It runs on the single model
worker thread; nothing here is called from the event loop.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from model import CoupledMambaForSentiment
from model.ops import NonFiniteInputError
from service.core.types import (
    ClipFeatures,
    ClipOutcome,
    ClipResult,
    MemorySnapshot,
    StreamStep,
    StreamStepOutcome,
)
from service.errors import FatalServiceError, GpuOutOfMemoryError, InvalidInputError

if TYPE_CHECKING:
    from model.streaming import StreamState

logger = logging.getLogger(__name__)

ForwardHook = Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]], None]
"""Called with the padded batch (features, masks) just before each model call."""


def resolve_device(name: str) -> torch.device:
    """``"auto"`` is the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class ModelRunner:
    """Runs padded batches of clips through the model and recovers from GPU out-of-memory.

    Args:
        model: the loaded model (already on ``device``, in eval mode).
        before_forward: optional hook called with the padded batch before each model call;
            used to inject faults (for example ``torch.OutOfMemoryError``) in tests.
        on_oom: called once per model call that ran out of memory.
        on_fatal: called with a CUDA error other than out of memory (the device's context is
            broken for good: :func:`is_fatal_device_error`); the batch then fails with
            :class:`FatalServiceError` instead of being retried in halves.
    """

    def __init__(
        self,
        model: CoupledMambaForSentiment,
        *,
        before_forward: ForwardHook | None = None,
        on_oom: Callable[[], None] | None = None,
        on_fatal: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.model = model
        self.config = model.config
        self.device = next(model.parameters()).device
        self._before_forward = before_forward
        self._on_oom = on_oom
        self._on_fatal = on_fatal
        self._dtype = next(model.parameters()).dtype

    @property
    def scan_backend(self) -> str:
        return str(self.model.scan_backend)

    def memory_snapshot(self) -> MemorySnapshot:
        """Current allocator figures (peak since the last batch started); nulls on CPU."""
        if self.device.type != "cuda":
            return MemorySnapshot(device=str(self.device))
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        return MemorySnapshot(
            device=f"cuda:{index}",
            allocated_bytes=int(torch.cuda.memory_allocated(index)),
            reserved_bytes=int(torch.cuda.memory_reserved(index)),
            peak_allocated_bytes=int(torch.cuda.max_memory_allocated(index)),
            total_bytes=int(torch.cuda.get_device_properties(index).total_memory),
        )

    def run_batch(self, clips: Sequence[ClipFeatures], padded_length: int) -> list[ClipOutcome]:
        """Score ``clips`` as one batch padded to ``padded_length`` steps.

        A failing batch is retried in two halves, down to single clips, so one clip's failure
        never fails the others: on GPU out-of-memory (the cache freed first) only clips that do
        not fit alone get a :class:`GpuOutOfMemoryError`; a clip whose features overflow the
        model's float range alone gets an :class:`InvalidInputError`; any other error is kept
        for the clip that raises it alone.
        """
        try:
            return self._forward(clips, padded_length)
        except torch.OutOfMemoryError:
            self._free_memory()
            if self._on_oom is not None:
                self._on_oom()
            if len(clips) == 1:
                logger.warning("clip of %d steps does not fit in memory alone", clips[0].length)
                return [
                    self._failed(
                        GpuOutOfMemoryError(
                            "the clip did not fit in accelerator memory; retry later or send "
                            "a shorter clip"
                        ),
                        padded_length,
                    )
                ]
            logger.warning("out of memory on a batch of %d; retrying in halves", len(clips))
        except Exception as exc:
            if is_fatal_device_error(exc):
                if self._on_fatal is not None:
                    self._on_fatal(exc)
                raise FatalServiceError(
                    "the accelerator failed (the instance restarts); retry on another instance"
                ) from exc
            if len(clips) == 1:
                return [self._failed(_clip_error(exc), padded_length)]
            logger.warning(
                "model call failed on a batch of %d (%s); retrying in halves",
                len(clips),
                type(exc).__name__,
            )
        half = len(clips) // 2
        return self.run_batch(clips[:half], padded_length) + self.run_batch(
            clips[half:], padded_length
        )

    def probe_device(self) -> None:
        """A tiny operation on the model's device, waited for (health checks; on the model
        worker thread). Raises :class:`FatalServiceError` (reported like a failed batch) when
        the device fails it or answers wrongly."""
        try:
            value = float((torch.ones(2, device=self.device) * 2.0).sum().item())
        except Exception as exc:
            if is_fatal_device_error(exc) and self._on_fatal is not None:
                self._on_fatal(exc)
            raise FatalServiceError(f"the device failed a probe: {exc}") from exc
        if value != 4.0:
            raise FatalServiceError(f"the device answered a probe wrongly ({value} for 4.0)")

    def _failed(self, error: BaseException, padded_length: int) -> ClipOutcome:
        return ClipOutcome(
            result=None,
            error=error,
            model_ms=0.0,
            batch_size=1,
            padded_length=padded_length,
            memory=self.memory_snapshot(),
        )

    def warmup(self, batch_sizes: Sequence[int], lengths: Sequence[int]) -> None:
        """Run random batches of each size and length once (compiles, allocates, caches)."""
        rng = np.random.default_rng(0)
        for length in lengths:
            for size in batch_sizes:
                clips = [self._random_clip(rng, length) for _ in range(size)]
                for outcome in self.run_batch(clips, length):
                    if outcome.error is not None:
                        raise outcome.error

    def _random_clip(self, rng: np.random.Generator, length: int) -> ClipFeatures:
        features = {
            m: rng.standard_normal((length, dim)).astype(np.float32)
            for m, dim in self.config.feature_dims.items()
        }
        masks = {m: np.ones(length, dtype=np.bool_) for m in features}
        return ClipFeatures(features=features, masks=masks, length=length)

    def _pad(
        self, clips: Sequence[ClipFeatures], padded_length: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        # Every modality of the model is passed, zero and fully masked where a clip lacks it,
        # so that a batch's shapes never depend on which clips it holds.
        batch = len(clips)
        features: dict[str, torch.Tensor] = {}
        masks: dict[str, torch.Tensor] = {}
        for modality, dim in self.config.feature_dims.items():
            values = np.zeros((batch, padded_length, dim), dtype=np.float32)  # (b, Lp, F_m)
            valid = np.zeros((batch, padded_length), dtype=np.bool_)  # (b, Lp)
            for row, clip in enumerate(clips):
                if modality in clip.features:
                    values[row, : clip.length] = clip.features[modality]
                    valid[row, : clip.length] = clip.masks[modality]
            features[modality] = torch.from_numpy(values).to(self.device, self._dtype)
            masks[modality] = torch.from_numpy(valid).to(self.device)
        return features, masks

    def _forward(self, clips: Sequence[ClipFeatures], padded_length: int) -> list[ClipOutcome]:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        features, masks = self._pad(clips, padded_length)
        if self._before_forward is not None:
            self._before_forward(features, masks)
        with torch.inference_mode():
            out = self.model(features, masks)
            scores = out.score.float().cpu().numpy()  # (b,)
            probabilities = out.probabilities.float().cpu().numpy()  # (b, 3)
            emotions = (
                out.emotion_probabilities.float().cpu().numpy()  # (b, E)
                if out.emotion_probabilities is not None
                else None
            )
        emotion_names = self.config.emotion_classes
        model_ms = (time.perf_counter() - start) * 1000.0
        memory = self.memory_snapshot()
        # A row is independent of the others (padding is masked), so a non-finite answer is
        # its own clip's doing: that clip alone is refused.
        finite = np.isfinite(scores) & np.isfinite(probabilities).all(axis=1)
        if emotions is not None:
            finite &= np.isfinite(emotions).all(axis=1)
        return [
            ClipOutcome(
                result=ClipResult(
                    score=float(scores[i]),
                    probabilities=tuple(float(p) for p in probabilities[i]),
                    emotions=(
                        dict(zip(emotion_names, map(float, emotions[i]), strict=True))
                        if emotions is not None
                        else None
                    ),
                )
                if finite[i]
                else None,
                error=None if finite[i] else _overflow_error(),
                model_ms=model_ms,
                batch_size=len(clips),
                padded_length=padded_length,
                memory=memory,
            )
            for i in range(len(clips))
        ]

    # -- live streams -----------------------------------------------------------------------

    def new_stream_state(self) -> StreamState:
        """A fresh stream's model state (``model.streaming``)."""
        return self.model.init_stream_state(1)

    def step_streams(self, steps: Sequence[StreamStep]) -> list[StreamStepOutcome]:
        """Advance many streams by their new rows in ONE batched model step.

        Each stream's rows are padded to the longest; the padding is ignored through the
        streams' lengths (``CoupledMambaForSentiment.step``). A failing batch is retried one
        stream at a time, so one stream's failure (non-finite features) never fails the others.
        """
        if not steps:
            return []
        try:
            return self._step(steps)
        except Exception as exc:
            if is_fatal_device_error(exc):  # the device is gone: no stream can go on here
                if self._on_fatal is not None:
                    self._on_fatal(exc)
                fatal = FatalServiceError(f"the device failed ({exc}); the instance restarts")
                return [StreamStepOutcome(None, step.state, fatal, 0.0) for step in steps]
            if len(steps) == 1:
                return [StreamStepOutcome(None, steps[0].state, _clip_error(exc), 0.0)]
            logger.warning(
                "stream step failed on %d streams (%s); retrying one by one",
                len(steps),
                type(exc).__name__,
            )
        return [outcome for step in steps for outcome in self.step_streams([step])]

    def _step(self, steps: Sequence[StreamStep]) -> list[StreamStepOutcome]:
        from model.streaming import StreamState

        start = time.perf_counter()
        lengths = [step.rows.length for step in steps]
        features, masks = self._pad(
            [ClipFeatures(s.rows.features, s.rows.masks, s.rows.length) for s in steps],
            max(max(lengths), 1),
        )
        state = StreamState.cat([step.state for step in steps])
        with torch.inference_mode():
            out, new_state = self.model.step(features, masks, state, lengths=lengths)
            scores = out.score.float().cpu().numpy()  # (b,)
            probabilities = out.probabilities.float().cpu().numpy()  # (b, 3)
            emotions = (
                out.emotion_probabilities.float().cpu().numpy()
                if out.emotion_probabilities is not None
                else None
            )
            present = out.present.cpu().numpy()  # (b, M)
        finite = np.isfinite(scores) & np.isfinite(probabilities).all(axis=1)
        if emotions is not None:
            finite &= np.isfinite(emotions).all(axis=1)
        if len(steps) > 1 and not finite.all():
            raise NonFiniteInputError("a stream's features overflowed the model")
        model_ms = (time.perf_counter() - start) * 1000.0
        names = self.config.emotion_classes
        outcomes = []
        for i, (step, single) in enumerate(zip(steps, new_state.split(), strict=True)):
            if not finite[i]:
                outcomes.append(StreamStepOutcome(None, step.state, _overflow_error(), model_ms))
                continue
            result = ClipResult(
                score=float(scores[i]),
                probabilities=tuple(float(p) for p in probabilities[i]),
                emotions=(
                    dict(zip(names, map(float, emotions[i]), strict=True))
                    if emotions is not None
                    else None
                ),
            )
            used = tuple(m for m, p in zip(self.config.modalities, present[i], strict=True) if p)
            outcomes.append(StreamStepOutcome(result, single, None, model_ms, used))
        return outcomes

    def _free_memory(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


_CUDA_ERROR_MARKS = ("CUDA error", "CUBLAS_STATUS_", "CUDNN_STATUS_", "cuDNN error", "NCCL error")
"""Texts that mark torch's RuntimeError for a failed CUDA call."""


def is_fatal_device_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a CUDA error other than out of memory: after one (an illegal memory
    access, a device-side assert, an ECC error) the CUDA context is unusable for good, and only
    a new process recovers."""
    if isinstance(exc, torch.OutOfMemoryError):
        return False
    if isinstance(exc, torch.AcceleratorError):
        return "out of memory" not in str(exc)
    if not isinstance(exc, RuntimeError):
        return False
    text = str(exc)
    return "out of memory" not in text and any(mark in text for mark in _CUDA_ERROR_MARKS)


def _overflow_error() -> InvalidInputError:
    return InvalidInputError(
        "the features are too large in magnitude: the model's values overflowed the float "
        "range; send features on the scale of the profile's extractors"
    )


def _clip_error(exc: Exception) -> BaseException:
    """The error a lone clip's failed model call answers with."""
    if isinstance(exc, NonFiniteInputError):
        return _overflow_error()
    return exc  # raised again in the request, which logs it once (an answer of 500)
