"""The container header readers survive any bytes: bounded depth and work, failures unknown."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from preprocessing.headers import declared_frame_sizes

DEMUXERS = ("mov", "matroska", "avi")


def test_readers_find_the_frame_size_of_real_files(container_samples: dict[str, Path]) -> None:
    sizes = {demuxer: declared_frame_sizes(str(path), demuxer) for demuxer, path in
             container_samples.items()}  # fmt: skip
    assert sizes == {"mov": [(480, 360)], "matroska": [(480, 360)], "avi": [(64, 64)]}


def test_matroska_ending_right_after_an_element_id(
    container_samples: dict[str, Path], tmp_path: Path
) -> None:
    data = container_samples["matroska"].read_bytes()
    segment = data.index(b"\x18\x53\x80\x67")  # the Segment element's ID, then its size
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(data[: segment + 4])
    assert declared_frame_sizes(str(cut), "matroska") == []


def test_avi_with_thousands_of_nested_lists(tmp_path: Path) -> None:
    depth = 5000
    body = b""
    for _ in range(depth):
        body = b"LIST" + struct.pack("<I", len(body) + 4) + b"hdrl" + body
    path = tmp_path / "nested.avi"
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body) + 4) + b"AVI " + body)
    assert declared_frame_sizes(str(path), "avi") == []


@pytest.mark.parametrize("demuxer", DEMUXERS)
def test_readers_survive_mutated_files(
    container_samples: dict[str, Path],
    media_dir: Path,
    tmp_path: Path,
    mutate: Callable[[bytes, np.random.Generator], bytes],
    demuxer: str,
) -> None:
    # Seeded mutations of the shared clips' bytes (and of the clip remuxed into this
    # container), read by every reader: each answers a list of sizes, never raises.
    sources = [container_samples[demuxer].read_bytes()]
    sources += [p.read_bytes()[:300_000] for p in sorted(media_dir.glob("*.mp4"))]
    rng = np.random.default_rng(19)
    path = tmp_path / "mutated"
    for round_ in range(150):
        path.write_bytes(mutate(sources[round_ % len(sources)], rng))
        for reader in DEMUXERS:
            sizes = declared_frame_sizes(str(path), reader)
            assert isinstance(sizes, list), (round_, reader)
            assert all(isinstance(w, int) and isinstance(h, int) for w, h in sizes)
