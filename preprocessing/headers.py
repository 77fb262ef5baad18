"""Frame sizes declared in container headers, read without FFmpeg.

FFmpeg replaces a frame size it considers invalid (over about 16k x 16k) with 0x0 when it probes a
file, so a header claiming 20000x20000 pixels would look like "size unknown" through PyAV. These
readers walk the few header structures that declare a video frame size in MP4/MOV (``tkhd``),
AVI (``strf`` BITMAPINFOHEADER) and Matroska/WebM (``PixelWidth``/``PixelHeight``), reading at
most a few megabytes, so the limit check can see what the file claims.

The bytes are untrusted: every reader is bounded in depth and in the number of structures it
visits (``_MAX_ELEMENTS``), and any failure, whatever its type, means "unknown" (``[]``).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import BinaryIO

_MAX_HEADER_BYTES = 8 * 1024 * 1024
_MAX_ELEMENTS = 20_000  # boxes, chunks or elements visited per file
_MAX_AVI_DEPTH = 8  # real files nest LIST chunks 3 deep


class _Unparsable(Exception):
    """The header is not what a reader can make sense of within its bounds."""


class _Budget:
    """Counts the structures a reader visits; past ``_MAX_ELEMENTS`` the file is unknown."""

    def __init__(self) -> None:
        self.left = _MAX_ELEMENTS

    def spend(self) -> None:
        self.left -= 1
        if self.left < 0:
            raise _Unparsable("too many header structures")


def declared_frame_sizes(path: str, demuxer: str) -> list[tuple[int, int]]:
    """(width, height) of every video track the header declares; [] when unknown or unparsable."""
    try:
        with open(path, "rb") as handle:
            if demuxer == "mov":
                return _mov_sizes(handle, _Budget())
            if demuxer == "avi":
                return _avi_sizes(handle, _Budget())
            if demuxer == "matroska":
                return _mkv_sizes(handle, _Budget())
    except Exception:  # any bytes: every failure means "unknown"
        return []
    return []


# -- MP4 / MOV --------------------------------------------------------------------------------


def _mov_boxes(
    data: bytes, start: int, end: int, budget: _Budget
) -> Iterator[tuple[bytes, int, int]]:
    """(type, payload start, payload end) of the boxes in data[start:end]."""
    pos = start
    while pos + 8 <= end:
        budget.spend()
        size, kind = struct.unpack(">I4s", data[pos : pos + 8])
        header = 8
        if size == 1:
            if pos + 16 > end:
                return
            size = struct.unpack(">Q", data[pos + 8 : pos + 16])[0]
            header = 16
        elif size == 0:
            size = end - pos
        if size < header:
            return
        yield kind, pos + header, min(pos + size, end)
        pos += size


def _mov_sizes(handle: BinaryIO, budget: _Budget) -> list[tuple[int, int]]:
    # Find the top-level moov box by hopping over the others (mdat may come first).
    handle.seek(0, 2)
    file_size = handle.tell()
    pos = 0
    moov: bytes | None = None
    while pos + 8 <= file_size:
        budget.spend()
        handle.seek(pos)
        head = handle.read(16)
        size, kind = struct.unpack(">I4s", head[:8])
        header = 8
        if size == 1:
            if len(head) < 16:
                break
            size = struct.unpack(">Q", head[8:16])[0]
            header = 16
        elif size == 0:
            size = file_size - pos
        if size < header:
            break
        if kind == b"moov":
            handle.seek(pos + header)
            moov = handle.read(min(size - header, _MAX_HEADER_BYTES))
            break
        pos += size
    if moov is None:
        return []
    sizes = []
    for kind, start, end in _mov_boxes(moov, 0, len(moov), budget):
        if kind != b"trak":
            continue
        handler = b""
        tkhd_size: tuple[int, int] | None = None
        for sub, s_start, s_end in _mov_boxes(moov, start, end, budget):
            if sub == b"tkhd" and s_end - s_start >= 8:
                # Width and height are the last two 16.16 fixed-point fields of tkhd.
                w, h = struct.unpack(">II", moov[s_end - 8 : s_end])
                tkhd_size = (w >> 16, h >> 16)
            elif sub == b"mdia":
                for leaf, l_start, _ in _mov_boxes(moov, s_start, s_end, budget):
                    if leaf == b"hdlr":
                        handler = moov[l_start + 8 : l_start + 12]
        if handler == b"vide" and tkhd_size is not None:
            sizes.append(tkhd_size)
    return sizes


# -- AVI --------------------------------------------------------------------------------------


def _avi_sizes(handle: BinaryIO, budget: _Budget) -> list[tuple[int, int]]:
    data = handle.read(min(_MAX_HEADER_BYTES, 1024 * 1024))
    if data[:4] != b"RIFF" or data[8:12] != b"AVI ":
        return []
    sizes = []
    stream_type = b""
    # An explicit stack of (next chunk, end of its LIST) instead of recursion: a LIST nested
    # thousands deep is refused at _MAX_AVI_DEPTH, not by Python's recursion limit.
    stack = [(12, len(data))]
    while stack:
        pos, end = stack.pop()
        if pos + 8 > end:
            continue
        budget.spend()
        kind, size = struct.unpack("<4sI", data[pos : pos + 8])
        body = pos + 8
        after = body + size + (size & 1)
        if kind == b"movi":
            break
        stack.append((after, end))
        if kind == b"LIST":
            if len(stack) > _MAX_AVI_DEPTH:
                raise _Unparsable("LIST chunks nested too deep")
            stack.append((body + 4, min(body + size, end)))
        elif kind == b"strh" and size >= 4:
            stream_type = data[body : body + 4]
        elif kind == b"strf" and stream_type == b"vids" and size >= 12:
            width, height = struct.unpack("<ii", data[body + 4 : body + 12])
            sizes.append((abs(width), abs(height)))
    return sizes


# -- Matroska / WebM --------------------------------------------------------------------------

_EBML_SEGMENT = 0x18538067
_EBML_TRACKS = 0x1654AE6B
_EBML_TRACK_ENTRY = 0xAE
_EBML_VIDEO = 0xE0
_EBML_PIXEL_WIDTH = 0xB0
_EBML_PIXEL_HEIGHT = 0xBA
_EBML_CLUSTER = 0x1F43B675


def _vint(data: bytes, pos: int, *, keep_marker: bool) -> tuple[int, int]:
    if pos >= len(data):
        raise _Unparsable("the data ends inside an element header")
    first = data[pos]
    length = 1
    while length <= 8 and not first & (0x80 >> (length - 1)):
        length += 1
    if length > 8 or pos + length > len(data):
        raise _Unparsable("bad EBML variable-length integer")
    value = first if keep_marker else first & (0xFF >> length)
    for b in data[pos + 1 : pos + length]:
        value = (value << 8) | b
    return value, length


def _ebml_elements(
    data: bytes, start: int, end: int, budget: _Budget
) -> Iterator[tuple[int, int, int]]:
    pos = start
    while pos < end:
        budget.spend()
        element_id, id_len = _vint(data, pos, keep_marker=True)
        size, size_len = _vint(data, pos + id_len, keep_marker=False)
        body = pos + id_len + size_len
        unknown = size == (1 << (7 * size_len)) - 1
        stop = end if unknown else min(body + size, end)
        yield element_id, body, stop
        if element_id == _EBML_CLUSTER:
            return
        pos = stop if not unknown else end


def _mkv_sizes(handle: BinaryIO, budget: _Budget) -> list[tuple[int, int]]:
    data = handle.read(min(_MAX_HEADER_BYTES, 2 * 1024 * 1024))
    sizes = []
    for element_id, body, stop in _ebml_elements(data, 0, len(data), budget):
        if element_id != _EBML_SEGMENT:
            continue
        for seg_id, s_body, s_stop in _ebml_elements(data, body, stop, budget):
            if seg_id == _EBML_CLUSTER:
                break
            if seg_id != _EBML_TRACKS:
                continue
            for t_id, t_body, t_stop in _ebml_elements(data, s_body, s_stop, budget):
                if t_id != _EBML_TRACK_ENTRY:
                    continue
                for v_id, v_body, v_stop in _ebml_elements(data, t_body, t_stop, budget):
                    if v_id != _EBML_VIDEO:
                        continue
                    dims = {}
                    for p_id, p_body, p_stop in _ebml_elements(data, v_body, v_stop, budget):
                        if p_id in (_EBML_PIXEL_WIDTH, _EBML_PIXEL_HEIGHT):
                            dims[p_id] = int.from_bytes(data[p_body:p_stop], "big")
                    if len(dims) == 2:
                        sizes.append((dims[_EBML_PIXEL_WIDTH], dims[_EBML_PIXEL_HEIGHT]))
    return sizes
