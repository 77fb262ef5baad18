"""Small, seeded model fixtures shared by the model tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from model import CoupledMambaConfig, CoupledMambaForSentiment

FEATURE_DIMS = {"text": 7, "audio": 5, "visual": 6}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Small tensors: more threads only fight over the shared cores.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def small_config(**overrides: Any) -> CoupledMambaConfig:
    """A tiny config (fast on CPU) with every other knob at its default."""
    values: dict[str, Any] = dict(
        feature_dims=dict(FEATURE_DIMS), d_model=16, d_state=8, n_layers=2, dropout=0.0
    )
    values.update(overrides)
    return CoupledMambaConfig(**values)


@pytest.fixture
def make_model() -> Callable[..., CoupledMambaForSentiment]:
    """Build a seeded tiny model in eval mode; keyword arguments override config fields.

    The scan backend is the one a real model gets ("auto": the fast CPU path when there is
    one); tests that compare backends pick theirs explicitly."""

    def build(
        seed: int = 0, scan_backend: str = "auto", **overrides: Any
    ) -> CoupledMambaForSentiment:
        torch.manual_seed(seed)
        return CoupledMambaForSentiment(small_config(**overrides), scan_backend=scan_backend).eval()

    return build


def random_batch(
    lengths: list[int],
    seed: int = 0,
    dims: dict[str, int] | None = None,
    pad_to: int | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Features (b, L, F) and masks (b, L) for clips of the given lengths, padded with noise."""
    dims = dims or FEATURE_DIMS
    g = torch.Generator().manual_seed(seed)
    length = pad_to or max(lengths)
    valid = torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]
    features = {m: torch.randn(len(lengths), length, f, generator=g) for m, f in dims.items()}
    masks = {m: valid.clone() for m in dims}
    return features, masks


@pytest.fixture
def batch_of() -> Callable[..., tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    return random_batch


@pytest.fixture
def config_of() -> Callable[..., CoupledMambaConfig]:
    return small_config
