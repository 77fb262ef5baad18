"""The model runner on its own (no HTTP, no batcher): padding, answers per clip, and recovery
from out-of-memory and other failures by halving the batch, with a stand-in model."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from model import load_checkpoint
from model.ops import NonFiniteInputError
from service.core.faults import CUDA_ERROR_MESSAGE
from service.core.runner import ModelRunner, is_fatal_device_error
from service.core.types import ClipFeatures, StreamRows, StreamStep
from service.errors import FatalServiceError, GpuOutOfMemoryError, InvalidInputError

DIMS = {"text": 3, "audio": 2}


@dataclass(frozen=True)
class _Config:
    feature_dims: Mapping[str, int]
    emotion_classes: tuple[str, ...] = ()


@dataclass
class _Output:
    score: Tensor
    probabilities: Tensor
    emotion_probabilities: Tensor | None = None


class FakeModel(nn.Module):
    """Scores a clip by the sum of its valid text values; ``fail(features, masks)`` may raise.

    ``calls`` records the batch size of every call (failed ones too).
    """

    scan_backend = "fake"

    def __init__(self, fail: Callable[[Mapping[str, Tensor]], None] | None = None) -> None:
        super().__init__()
        self.config = _Config(feature_dims=DIMS)
        self.weight = nn.Parameter(torch.ones(()))
        self.fail = fail
        self.calls: list[int] = []

    def forward(self, features: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> _Output:
        batch = features["text"].shape[0]
        self.calls.append(batch)
        if self.fail is not None:
            self.fail(features)
        valid = masks["text"].unsqueeze(-1).to(features["text"].dtype)  # (b, L, 1)
        score = (features["text"] * valid).sum(dim=(1, 2)) * self.weight  # (b,)
        probabilities = torch.softmax(torch.stack([-score, 0 * score, score], dim=-1), dim=-1)
        return _Output(score=score, probabilities=probabilities)


def _clip(
    length: int, value: float = 1.0, modalities: tuple[str, ...] = ("text", "audio")
) -> ClipFeatures:
    return ClipFeatures(
        features={m: np.full((length, DIMS[m]), value, dtype=np.float32) for m in modalities},
        masks={m: np.ones(length, dtype=np.bool_) for m in modalities},
        length=length,
    )


# -- padding ------------------------------------------------------------------------------------


def test_padding_is_zero_and_masked_and_every_modality_is_passed() -> None:
    seen: dict[str, dict[str, Tensor]] = {}

    def capture(features: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> None:
        seen["features"], seen["masks"] = dict(features), dict(masks)

    runner = ModelRunner(FakeModel(), before_forward=capture)
    clips = [_clip(2, 1.0), _clip(4, 2.0, modalities=("text",))]
    outcomes = runner.run_batch(clips, padded_length=6)

    features, masks = seen["features"], seen["masks"]
    assert set(features) == set(DIMS)  # audio too, though the second clip lacks it
    assert features["text"].shape == (2, 6, 3) and masks["text"].shape == (2, 6)
    assert features["text"].dtype == torch.float32 and masks["text"].dtype == torch.bool
    assert masks["text"].tolist() == [[True] * 2 + [False] * 4, [True] * 4 + [False] * 2]
    assert masks["audio"][1].sum() == 0 and features["audio"][1].abs().sum() == 0
    assert features["text"][0, 2:].abs().sum() == 0  # the padded steps are zero
    assert [o.result.score for o in outcomes if o.result] == [6.0, 24.0]
    assert {(o.batch_size, o.padded_length) for o in outcomes} == {(2, 6)}
    assert all(o.error is None and o.memory.device == "cpu" for o in outcomes)


def test_a_clips_answer_does_not_depend_on_its_batch(checkpoint: Path) -> None:
    model = load_checkpoint(checkpoint, scan_backend="ref")
    runner = ModelRunner(model)
    rng = np.random.default_rng(0)
    dims = model.config.feature_dims

    def random_clip(length: int, modalities: tuple[str, ...]) -> ClipFeatures:
        masks = {m: np.ones(length, dtype=np.bool_) for m in modalities}
        masks[modalities[0]][0] = False
        return ClipFeatures(
            features={
                m: rng.standard_normal((length, dims[m])).astype(np.float32) for m in modalities
            },
            masks=masks,
            length=length,
        )

    clips = [
        random_clip(5, ("text", "audio", "visual")),
        random_clip(9, ("audio",)),
        random_clip(3, ("visual", "text")),
    ]
    together = runner.run_batch(clips, padded_length=12)
    for clip, outcome in zip(clips, together, strict=True):
        alone = runner.run_batch([clip], padded_length=clip.length)[0]
        assert outcome.result is not None and alone.result is not None
        assert outcome.result.score == pytest.approx(alone.result.score, abs=1e-5)
        assert outcome.result.probabilities == pytest.approx(alone.result.probabilities, abs=1e-5)


# -- recovery -----------------------------------------------------------------------------------


def _out_of_memory_above(limit: int) -> Callable[[Mapping[str, Tensor]], None]:
    def fail(features: Mapping[str, Tensor]) -> None:
        if features["text"].shape[0] > limit:
            raise torch.OutOfMemoryError("stand-in: out of memory")

    return fail


def test_out_of_memory_halves_the_batch_until_it_fits() -> None:
    model = FakeModel(fail=_out_of_memory_above(2))
    ooms: list[int] = []
    runner = ModelRunner(model, on_oom=lambda: ooms.append(1))
    clips = [_clip(3, float(i)) for i in range(8)]

    outcomes = runner.run_batch(clips, padded_length=3)

    assert [o.result.score for o in outcomes if o.result] == [9.0 * i for i in range(8)]
    assert model.calls == [8, 4, 2, 2, 4, 2, 2]  # 8 and both 4s fail, the four 2s run
    assert len(ooms) == 3
    assert [o.batch_size for o in outcomes] == [2] * 8


def test_a_clip_that_does_not_fit_alone_fails_alone() -> None:
    def fail(features: Mapping[str, Tensor]) -> None:
        if features["text"].shape[0] > 1 or features["text"][0, 0, 0] == 99.0:
            raise torch.OutOfMemoryError("stand-in: out of memory")

    runner = ModelRunner(FakeModel(fail=fail))
    outcomes = runner.run_batch([_clip(2, 1.0), _clip(2, 99.0), _clip(2, 2.0)], padded_length=2)

    assert [o.result.score if o.result else None for o in outcomes] == [6.0, None, 12.0]
    assert isinstance(outcomes[1].error, GpuOutOfMemoryError)
    assert outcomes[1].batch_size == 1 and outcomes[1].padded_length == 2


def test_another_error_is_kept_for_the_clip_that_raises_it() -> None:
    def fail(features: Mapping[str, Tensor]) -> None:
        if bool((features["text"][:, 0, 0] == 7.0).any()):
            raise RuntimeError("stand-in: this clip breaks the model")

    runner = ModelRunner(FakeModel(fail=fail))
    outcomes = runner.run_batch([_clip(1, 1.0), _clip(1, 7.0), _clip(1, 2.0), _clip(1, 3.0)], 1)

    assert [o.result.score if o.result else None for o in outcomes] == [3.0, None, 6.0, 9.0]
    error = outcomes[1].error
    assert isinstance(error, RuntimeError) and "breaks the model" in str(error)


def test_overflowing_features_are_the_clients_error() -> None:
    def fail(features: Mapping[str, Tensor]) -> None:
        if bool(torch.isinf(features["text"]).any()):
            raise NonFiniteInputError("stand-in: scan inputs hold infinity")

    runner = ModelRunner(FakeModel(fail=fail))
    outcomes = runner.run_batch([_clip(1, 1.0), _clip(1, float("inf"))], padded_length=1)

    assert outcomes[0].result is not None and outcomes[0].result.score == 3.0
    assert isinstance(outcomes[1].error, InvalidInputError)


def test_a_non_finite_answer_refuses_its_own_clip_only() -> None:
    runner = ModelRunner(FakeModel())
    big = float(np.finfo(np.float32).max)  # the sum of its values overflows to inf
    outcomes = runner.run_batch([_clip(1, big), _clip(1, 1.0)], padded_length=1)

    assert outcomes[0].result is None and isinstance(outcomes[0].error, InvalidInputError)
    assert outcomes[1].result is not None and outcomes[1].result.score == 3.0
    assert outcomes[0].batch_size == outcomes[1].batch_size == 2  # one call: no retry needed


def test_warmup_runs_each_size_and_length_and_raises_a_failure() -> None:
    model = FakeModel()
    ModelRunner(model).warmup([1, 4], [8, 16])
    assert model.calls == [1, 4, 1, 4]

    broken = ModelRunner(FakeModel(fail=_out_of_memory_above(0)))
    with pytest.raises(GpuOutOfMemoryError):
        broken.warmup([1], [8])


# -- fatal device errors --------------------------------------------------------------------------


def test_a_cuda_error_fails_the_batch_at_once_and_is_reported() -> None:
    # A sticky CUDA error breaks the context: retrying in halves would fail every call again,
    # so the batch fails once with the fatal error and the failure is reported.
    def fail(features: Mapping[str, Tensor]) -> None:
        raise RuntimeError(CUDA_ERROR_MESSAGE)

    model = FakeModel(fail=fail)
    reported: list[BaseException] = []
    runner = ModelRunner(model, on_fatal=reported.append)

    with pytest.raises(FatalServiceError) as raised:
        runner.run_batch([_clip(2, float(i)) for i in range(4)], padded_length=2)

    assert model.calls == [4]
    assert len(reported) == 1 and "illegal memory access" in str(reported[0])
    assert raised.value.__cause__ is reported[0]


def test_a_cuda_error_in_a_stream_step_ends_every_stream_and_is_reported(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = load_checkpoint(checkpoint, scan_backend="ref")
    reported: list[BaseException] = []
    runner = ModelRunner(model, on_fatal=reported.append)
    dims = model.config.feature_dims
    rows = StreamRows(
        features={m: np.ones((3, dims[m]), dtype=np.float32) for m in model.config.modalities},
        masks={m: np.ones(3, dtype=np.bool_) for m in model.config.modalities},
        length=3,
    )
    steps = [StreamStep(runner.new_stream_state(), rows) for _ in range(2)]
    assert all(o.error is None for o in runner.step_streams(steps))  # sound: both step

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError(CUDA_ERROR_MESSAGE)

    monkeypatch.setattr(model, "step", broken)
    outcomes = runner.step_streams(steps)
    # Not retried stream by stream (the context is gone): each stream fails with the fatal
    # error, keeps its old state, and the failure is reported once.
    assert [type(o.error) for o in outcomes] == [FatalServiceError, FatalServiceError]
    assert [o.state for o in outcomes] == [s.state for s in steps]
    assert len(reported) == 1 and "illegal memory access" in str(reported[0])


def test_a_cuda_out_of_memory_message_still_takes_the_halving_path() -> None:
    def fail(features: Mapping[str, Tensor]) -> None:
        if features["text"].shape[0] > 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    model = FakeModel(fail=fail)
    reported: list[BaseException] = []
    runner = ModelRunner(model, on_fatal=reported.append)
    outcomes = runner.run_batch([_clip(1, 1.0), _clip(1, 2.0)], padded_length=1)

    assert [o.result.score if o.result else None for o in outcomes] == [3.0, 6.0]
    assert reported == [] and model.calls == [2, 1, 1]


@pytest.mark.parametrize(
    ("error", "fatal"),
    [
        (RuntimeError(CUDA_ERROR_MESSAGE), True),
        (RuntimeError("CUDA error: device-side assert triggered"), True),
        (RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling cublasSgemm"), True),
        (torch.AcceleratorError("CUDA error: uncorrectable ECC error encountered"), True),
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB"), False),
        (RuntimeError("CUDA error: out of memory"), False),
        (RuntimeError("shape mismatch"), False),
        (ValueError("CUDA error: not a RuntimeError"), False),
    ],
)
def test_which_errors_are_fatal(error: BaseException, fatal: bool) -> None:
    assert is_fatal_device_error(error) is fatal


def test_the_device_probe_passes_and_reports_a_cuda_error(monkeypatch: pytest.MonkeyPatch) -> None:
    reported: list[BaseException] = []
    runner = ModelRunner(FakeModel(), on_fatal=reported.append)
    runner.probe_device()  # a sound device: nothing raised, nothing reported
    assert reported == []

    def broken_ones(*args: object, **kwargs: object) -> Tensor:
        raise RuntimeError(CUDA_ERROR_MESSAGE)

    # The device's allocation fails as a broken CUDA context makes it fail.
    monkeypatch.setattr(torch, "ones", broken_ones)
    with pytest.raises(FatalServiceError, match="failed a probe"):
        runner.probe_device()
    assert len(reported) == 1 and "illegal memory access" in str(reported[0])
