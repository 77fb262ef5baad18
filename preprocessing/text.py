"""Text modality: MiniLM-L6 token embeddings, placed on the time grid by word times.

The same two calls serve a clip and a plain sentence, so training data built from sentences and a
typed transcript sent to the service give the same features::

    encoder = TextEncoder()
    tokens = encoder.encode("what a lovely day")            # or encode_batch([...]) for many
    features, mask = align_text(tokens, None, None, 10.0)   # (L, 384) float32, (L,) bool

Words without times (``word_times=None``) are placed one after another from t = 0 at the nominal
speaking rate (2.5 words per second by default), squeezed to fit the clip when its duration is
known and the words would run past its end.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from preprocessing.errors import ModelLoadError
from preprocessing.grid import grid_length
from preprocessing.models import (
    TEXT_MODEL_FILE,
    TEXT_MODEL_SHA256,
    bundled_text_model_dir,
    offline_environment,
    verify_model_file,
)
from preprocessing.profiles import TEXT_DIM
from preprocessing.settings import NOMINAL_WORDS_PER_S

# all-MiniLM-L6-v2 was trained on sequences of at most 256 word pieces; longer texts are encoded
# in consecutive windows of whole words.
MAX_SEQUENCE_TOKENS = 256


@dataclass(frozen=True)
class TokenEmbeddings:
    """Contextual embeddings of a text's word pieces (special tokens excluded).

    ``embeddings`` (T, 384) float32; ``word_index`` (T,) int64, the word each piece belongs to;
    ``words`` the whitespace-separated words of the text (every word has at least one piece).
    """

    embeddings: np.ndarray
    word_index: np.ndarray
    words: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    @classmethod
    def empty(cls) -> TokenEmbeddings:
        """Embeddings of a text without words."""
        return cls(np.zeros((0, TEXT_DIM), np.float32), np.zeros((0,), np.int64), ())


def split_words(text: str) -> list[str]:
    """The words of ``text``: whitespace-separated, empty pieces dropped."""
    return text.split()


@dataclass(frozen=True)
class PieceWindow:
    """One window of a text's word pieces, as the encoder feeds its model (without [CLS] and
    [SEP]): ``ids`` the piece ids, ``word_ids`` the word of each piece, ``text`` the index of the
    text in the batch it came from. A text longer than ``MAX_SEQUENCE_TOKENS - 2`` pieces is cut
    into several windows of whole words."""

    text: int
    ids: list[int]
    word_ids: list[int]


class TextEncoder:
    """MiniLM-L6 (all-MiniLM-L6-v2) loaded with transformers from a local folder, never the hub.

    Thread safety: one instance may be shared by threads. Tokenisation runs under a lock (the fast
    tokenizer is not re-entrant); the model forward pass runs in ``torch.inference_mode`` without
    a lock. The model is loaded on first use (or by :meth:`load`).

    ``torch_threads`` is applied with ``torch.set_num_threads`` when the model loads (process-wide:
    small CPU work is fastest and most predictable on one thread); ``None`` leaves it alone.

    ``tuning`` is a safetensors file of fine-tuned layer weights (a checkpoint's
    ``text_encoder.safetensors``, see :mod:`preprocessing.text_tuning`) loaded over the base
    model; every tensor in it must name a tensor of the base model with the same shape. With
    ``tuning_sha256`` the file's hash is checked first.
    """

    def __init__(
        self,
        model_dir: Path | str | None = None,
        *,
        torch_threads: int | None = 1,
        batch_size: int = 32,
        verify: bool = True,
        tuning: Path | str | None = None,
        tuning_sha256: str | None = None,
    ) -> None:
        self._tuning = Path(tuning) if tuning is not None else None
        self._tuning_sha256 = tuning_sha256
        self._model_dir = Path(model_dir) if model_dir is not None else None
        self._torch_threads = torch_threads
        self._batch_size = batch_size
        self._verify = verify
        self._load_lock = threading.Lock()
        self._tok_lock = threading.Lock()
        self._tokenizer: Any = None
        self._model: Any = None

    @property
    def model_dir(self) -> Path:
        """Folder the model is (or will be) loaded from."""
        return self._model_dir if self._model_dir is not None else bundled_text_model_dir()

    @property
    def loaded(self) -> bool:
        """True once the model and tokenizer are in memory."""
        return self._model is not None

    def load(self) -> None:
        """Load tokenizer and model (idempotent, thread-safe)."""
        if self._model is not None:
            return
        with self._load_lock:
            if self._model is not None:
                return
            offline_environment()
            folder = self.model_dir
            if self._verify and self._model_dir is None:
                verify_model_file(folder / TEXT_MODEL_FILE, TEXT_MODEL_SHA256)
            import torch
            from transformers import AutoModel, AutoTokenizer
            from transformers.utils import logging as hf_logging

            if self._torch_threads is not None:
                torch.set_num_threads(self._torch_threads)
            hf_logging.disable_progress_bar()
            try:
                tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
                model = AutoModel.from_pretrained(str(folder), local_files_only=True)
            except (OSError, ValueError, RuntimeError) as exc:
                raise ModelLoadError(f"Could not load the text model from {folder}: {exc}") from exc
            if self._tuning is not None:
                self._apply_tuning(model)
            model.eval()
            self._tokenizer = tokenizer
            self._model = model

    @property
    def tuning(self) -> Path | None:
        """The fine-tuned layer file applied over the base model, if any."""
        return self._tuning

    def _apply_tuning(self, model: Any) -> None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = self._tuning
        assert path is not None
        if not path.is_file():
            raise ModelLoadError(f"text encoder tuning file {path} does not exist")
        if self._tuning_sha256 is not None:
            verify_model_file(path, self._tuning_sha256)
        try:
            tensors = load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(f"cannot read the text encoder tuning {path}: {exc}") from exc
        base = model.state_dict()
        wrong = sorted(
            k for k, v in tensors.items() if k not in base or tuple(v.shape) != tuple(base[k].shape)
        )
        if wrong or not tensors:
            raise ModelLoadError(
                f"{path} does not fit the text model: "
                + (f"unknown or mis-shaped tensors {wrong[:5]}" if wrong else "no tensors")
            )
        model.load_state_dict({k: v.to(base[k].dtype) for k, v in tensors.items()}, strict=False)

    def piece_windows(self, word_lists: Sequence[Sequence[str]]) -> list[PieceWindow]:
        """Tokenise word sequences into the windows the model is run on (the one tokenisation
        of the text modality: the service's features and the text tuning both use it)."""
        self.load()
        windows: list[PieceWindow] = []
        with self._tok_lock:
            for text_idx, words in enumerate(word_lists):
                kept = [w for w in words if w.strip()]
                if not kept:
                    continue
                enc = self._tokenizer(
                    kept, is_split_into_words=True, add_special_tokens=False, verbose=False
                )
                ids: list[int] = list(enc["input_ids"])
                word_ids = [int(w) for w in enc.word_ids()]
                for start, stop in _word_windows(word_ids, MAX_SEQUENCE_TOKENS - 2):
                    windows.append(PieceWindow(text_idx, ids[start:stop], word_ids[start:stop]))
        return windows

    def model_input(self, ids: Sequence[int]) -> list[int]:
        """A window's piece ids as the model reads them: ``[CLS] ids [SEP]``."""
        self.load()
        return [int(self._tokenizer.cls_token_id), *ids, int(self._tokenizer.sep_token_id)]

    def encode(self, text: str) -> TokenEmbeddings:
        """Embed one text (words split on whitespace)."""
        return self.encode_words_batch([split_words(text)])[0]

    def encode_words(self, words: Sequence[str]) -> TokenEmbeddings:
        """Embed a sequence of words (e.g. ASR words, whose times are known)."""
        return self.encode_words_batch([list(words)])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[TokenEmbeddings]:
        """Embed many texts; equal to :meth:`encode` of each, up to float32 rounding."""
        return self.encode_words_batch([split_words(t) for t in texts])

    def encode_words_batch(self, word_lists: Sequence[Sequence[str]]) -> list[TokenEmbeddings]:
        """Embed many word sequences, batching windows of similar length together."""
        self.load()
        import torch

        words_per_text = [tuple(w for w in words if w.strip()) for words in word_lists]
        windows = self.piece_windows(words_per_text)
        pad_id = int(self._tokenizer.pad_token_id)

        # Sort by length so that a batch holds similar lengths (little padding).
        order = sorted(range(len(windows)), key=lambda i: len(windows[i].ids))
        window_vectors: list[np.ndarray | None] = [None] * len(windows)
        for b in range(0, len(order), self._batch_size):
            batch = [windows[i] for i in order[b : b + self._batch_size]]
            width = max(len(w.ids) for w in batch) + 2
            input_ids = np.full((len(batch), width), pad_id, dtype=np.int64)
            attention = np.zeros((len(batch), width), dtype=np.int64)
            for row, window in enumerate(batch):
                input_ids[row, : len(window.ids) + 2] = self.model_input(window.ids)
                attention[row, : len(window.ids) + 2] = 1
            with torch.inference_mode():
                hidden = self._model(
                    input_ids=torch.from_numpy(input_ids),
                    attention_mask=torch.from_numpy(attention),
                    token_type_ids=torch.zeros_like(torch.from_numpy(input_ids)),
                ).last_hidden_state  # (batch, width, 384)
            hidden_np = hidden.float().numpy()
            for row, idx in enumerate(order[b : b + self._batch_size]):
                n = len(windows[idx].ids)
                window_vectors[idx] = hidden_np[row, 1 : 1 + n].copy()  # drop [CLS], [SEP]

        out_vecs: list[list[np.ndarray]] = [[] for _ in word_lists]
        out_words: list[list[int]] = [[] for _ in word_lists]
        for window, vecs in zip(windows, window_vectors, strict=True):
            assert vecs is not None
            out_vecs[window.text].append(vecs)
            out_words[window.text].extend(window.word_ids)
        results = []
        for text_idx, words in enumerate(words_per_text):
            if not out_vecs[text_idx]:
                results.append(TokenEmbeddings.empty())
                continue
            results.append(
                TokenEmbeddings(
                    embeddings=np.concatenate(out_vecs[text_idx]).astype(np.float32),
                    word_index=np.asarray(out_words[text_idx], dtype=np.int64),
                    words=words,
                )
            )
        return results


def _word_windows(word_ids: list[int], max_pieces: int) -> list[tuple[int, int]]:
    """Split piece positions into [start, stop) windows of at most ``max_pieces`` pieces that
    never cut a word (a single word longer than the window is cut)."""
    windows: list[tuple[int, int]] = []
    start = 0
    n = len(word_ids)
    while start < n:
        stop = min(start + max_pieces, n)
        if stop < n:
            # Move back to the first piece of the word that straddles the boundary.
            cut = stop
            while cut > start and word_ids[cut] == word_ids[cut - 1]:
                cut -= 1
            if cut > start:
                stop = cut
        windows.append((start, stop))
        start = stop
    return windows


def uniform_word_times(
    n_words: int,
    duration_s: float | None = None,
    words_per_s: float = NOMINAL_WORDS_PER_S,
) -> np.ndarray:
    """Times for words that carry none: back to back from t = 0 at ``words_per_s``.

    When ``duration_s`` is known and the words would run past it, they are squeezed to fill it.
    Returns (n_words, 2) float64 start and end seconds.
    """
    step = 1.0 / words_per_s
    if duration_s is not None and n_words > 0 and n_words * step > duration_s:
        step = duration_s / n_words
    starts = np.arange(n_words, dtype=np.float64) * step
    return np.stack([starts, starts + step], axis=1) if n_words else np.zeros((0, 2))


def align_text(
    tokens: TokenEmbeddings,
    word_times: Sequence[tuple[float, float]] | np.ndarray | None,
    duration_s: float | None,
    rate_hz: float,
    *,
    words_per_s: float = NOMINAL_WORDS_PER_S,
    first_step: int = 0,
    steps: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Place token embeddings on the time grid.

    Each word spans ``[start, end)`` (at least one grid step); its pieces split that span into
    equal parts, in order. A grid cell is the overlap-weighted mean of the pieces that overlap it;
    cells that no word overlaps are masked. ``word_times`` None places the words at the nominal
    rate (:func:`uniform_word_times`). ``duration_s`` None means "as long as the words".

    Returns ``features`` (L, 384) float32 and ``mask`` (L,) bool with
    ``L = grid_length(duration_s, rate_hz)``. ``first_step`` and ``steps`` return only the grid
    steps ``[first_step, first_step + steps)`` of that grid (``steps`` None: to its end), each
    equal to the same step of the whole grid (the live extractor places words chunk by chunk).
    """
    n_words = len(tokens.words)
    if word_times is None:
        times = uniform_word_times(n_words, duration_s, words_per_s)
    else:
        times = np.asarray(word_times, dtype=np.float64).reshape(-1, 2)
        if len(times) != n_words:
            raise ValueError(f"{len(times)} word times for {n_words} words")
    if duration_s is None:
        duration_s = float(times[:, 1].max()) if n_words else 0.0
    full_length = grid_length(duration_s, rate_hz)
    first = min(max(first_step, 0), full_length)
    length = full_length - first if steps is None else min(max(steps, 0), full_length - first)
    features = np.zeros((length, TEXT_DIM), dtype=np.float32)
    mask = np.zeros((length,), dtype=bool)
    if len(tokens) == 0 or length == 0:
        return features, mask

    end_of_grid = full_length / rate_hz
    cell = 1.0 / rate_hz
    starts = np.clip(times[:, 0], 0.0, end_of_grid)
    ends = np.clip(np.maximum(times[:, 1], times[:, 0] + cell), 0.0, end_of_grid)
    ends = np.maximum(ends, starts)

    # Piece j of a word with k pieces covers the j-th of k equal parts of the word's span.
    word_index = tokens.word_index
    pieces_per_word = np.bincount(word_index, minlength=n_words)
    first_piece = np.concatenate([[0], np.cumsum(pieces_per_word)[:-1]])
    rank = np.arange(len(tokens)) - first_piece[word_index]
    span = (ends - starts)[word_index] / pieces_per_word[word_index]
    tok_start = starts[word_index] + rank * span
    tok_end = tok_start + span

    # Enumerate (token, cell) pairs that overlap, cells counted from ``first``.
    c0 = np.maximum(np.floor(tok_start * rate_hz).astype(np.int64) - first, 0)
    c1 = np.minimum(np.ceil(tok_end * rate_hz).astype(np.int64) - first, length)
    counts = np.maximum(c1 - c0, 0)
    tok_of_pair = np.repeat(np.arange(len(tokens)), counts)
    offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    cell_of_pair = c0[tok_of_pair] + offsets
    overlap = np.minimum(tok_end[tok_of_pair], (cell_of_pair + first + 1) * cell) - np.maximum(
        tok_start[tok_of_pair], (cell_of_pair + first) * cell
    )
    keep = overlap > 1e-9
    tok_of_pair, cell_of_pair, overlap = tok_of_pair[keep], cell_of_pair[keep], overlap[keep]

    sums = np.zeros((length, TEXT_DIM), dtype=np.float64)
    np.add.at(sums, cell_of_pair, overlap[:, None] * tokens.embeddings[tok_of_pair])
    weights = np.bincount(cell_of_pair, weights=overlap, minlength=length)
    mask = weights > 0
    features[mask] = (sums[mask] / weights[mask, None]).astype(np.float32)
    return features, mask
