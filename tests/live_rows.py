"""A live feature source that serves the offline extractor's features of a whole clip, row by
row as the audio arrives (the interface of ``preprocessing.live.LiveExtractor``): a real
producer of a stream's features, whose whole sequence is known to the test."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Rows:
    start: int
    features: dict[str, np.ndarray]
    masks: dict[str, np.ndarray]
    words: list[Any] = field(default_factory=list)
    dropped_frames: int = 0
    provisional: Rows | None = None


class BundleRows:
    """Rows of ``features``/``masks`` (L steps at ``rate_hz``) final ``lookahead`` rows after
    the audio covering them has arrived; ``finish`` gives the rest of the rows the audio
    covers. With ``provisional``, ``ready`` also previews the rows after the final ones up to
    the audio received (the true rows: what a perfect preview would give)."""

    def __init__(
        self,
        features: dict[str, np.ndarray],
        masks: dict[str, np.ndarray],
        *,
        sample_rate: int,
        rate_hz: float = 10.0,
        lookahead: int = 3,
        provisional: bool = False,
    ) -> None:
        self.provisional = provisional
        self.features = features
        self.masks = masks
        self.length = len(next(iter(masks.values())))
        self.sample_rate = sample_rate
        self.rate_hz = rate_hz
        self.lookahead = lookahead
        self.received = 0
        self.frames: list[float] = []
        self.next = 0
        self.closed = False

    def push_audio(self, samples: np.ndarray) -> None:
        assert samples.dtype == np.float32 and samples.ndim == 1
        self.received += len(samples)

    def push_frame(self, rgb: np.ndarray, time_s: float) -> None:
        assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
        self.frames.append(time_s)

    def _rows(self, end: int) -> Rows:
        start, self.next = self.next, max(self.next, end)
        return Rows(
            start=start,
            features={m: f[start : self.next] for m, f in self.features.items()},
            masks={m: k[start : self.next] for m, k in self.masks.items()},
        )

    def ready(self) -> Rows:
        received = math.floor(self.received / self.sample_rate * self.rate_hz)
        rows = self._rows(min(self.length, max(0, received - self.lookahead)))
        tail = min(self.length, received)
        if not self.provisional or tail <= self.next:
            return rows
        preview = Rows(
            start=self.next,
            features={m: f[self.next : tail] for m, f in self.features.items()},
            masks={m: k[self.next : tail] for m, k in self.masks.items()},
        )
        return replace(rows, provisional=preview)

    def finish(self) -> Rows:
        covered = math.ceil(self.received / self.sample_rate * self.rate_hz)
        return self._rows(min(self.length, covered))

    def close(self) -> None:
        self.closed = True

    @property
    def words(self) -> list[Any]:
        return []

    @property
    def stream_seconds(self) -> float:
        return self.received / self.sample_rate
