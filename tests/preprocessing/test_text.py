"""Text path: word placement on the grid (pure numpy) and the MiniLM encoder (real model)."""

from __future__ import annotations

import numpy as np
import pytest

from preprocessing.grid import grid_length
from preprocessing.text import (
    MAX_SEQUENCE_TOKENS,
    TextEncoder,
    TokenEmbeddings,
    align_text,
    uniform_word_times,
)


def _tokens(pieces_per_word: list[int], seed: int = 0) -> TokenEmbeddings:
    rng = np.random.default_rng(seed)
    n = sum(pieces_per_word)
    word_index = np.repeat(np.arange(len(pieces_per_word)), pieces_per_word)
    return TokenEmbeddings(
        embeddings=rng.standard_normal((n, 384)).astype(np.float32),
        word_index=word_index.astype(np.int64),
        words=tuple(f"w{i}" for i in range(len(pieces_per_word))),
    )


def test_uniform_word_times_use_the_nominal_rate() -> None:
    times = uniform_word_times(5)
    assert np.allclose(times[:, 0], [0.0, 0.4, 0.8, 1.2, 1.6])
    assert np.allclose(times[:, 1] - times[:, 0], 0.4)
    # Squeezed to fit a shorter clip, never stretched to fill a longer one.
    assert np.allclose(uniform_word_times(5, duration_s=1.0)[-1], [0.8, 1.0])
    assert np.allclose(uniform_word_times(5, duration_s=60.0), times)
    assert uniform_word_times(0).shape == (0, 2)


def test_each_piece_takes_an_equal_share_of_its_word() -> None:
    tokens = _tokens([2, 1])
    # Word 0 spans 0.0-0.2 s (two cells, one piece each); word 1 spans 0.5-0.6 s.
    feats, mask = align_text(tokens, [(0.0, 0.2), (0.5, 0.6)], 1.0, 10.0)
    assert feats.shape == (10, 384) and feats.dtype == np.float32 and mask.dtype == bool
    assert mask.tolist() == [True, True, False, False, False, True, False, False, False, False]
    assert np.allclose(feats[0], tokens.embeddings[0])
    assert np.allclose(feats[1], tokens.embeddings[1])
    assert np.allclose(feats[5], tokens.embeddings[2])
    assert not feats[~mask].any()


def test_a_cell_is_the_overlap_weighted_mean() -> None:
    tokens = _tokens([1, 1])
    # Word 0 covers 0.00-0.13 s, word 1 0.13-0.20 s: cell 1 (0.1-0.2) gets 0.03 of w0, 0.07 of w1.
    feats, mask = align_text(tokens, [(0.0, 0.13), (0.13, 0.2)], 0.2, 10.0)
    expected = (0.03 * tokens.embeddings[0] + 0.07 * tokens.embeddings[1]) / 0.1
    assert mask.all()
    assert np.allclose(feats[1], expected, atol=1e-5)


def test_short_and_out_of_range_words() -> None:
    tokens = _tokens([1, 1, 1])
    # A word shorter than a cell is widened to one cell from its start; a word after the
    # clip's end is dropped.
    feats, mask = align_text(tokens, [(0.30, 0.30), (0.5, 0.55), (5.0, 5.4)], 1.0, 10.0)
    assert np.flatnonzero(mask).tolist() == [3, 5]
    assert np.allclose(feats[3], tokens.embeddings[0])


def test_length_follows_duration_or_words() -> None:
    tokens = _tokens([1, 2, 1, 1])
    feats, mask = align_text(tokens, None, None, 10.0)
    assert feats.shape[0] == grid_length(4 / 2.5, 10.0) == 16 and mask.all()
    feats, mask = align_text(tokens, None, 60.0, 10.0)
    assert feats.shape[0] == 600 and mask.sum() == 16
    feats, mask = align_text(TokenEmbeddings.empty(), None, 3.0, 10.0)
    assert feats.shape == (30, 384) and not mask.any()
    with pytest.raises(ValueError, match="word times"):
        align_text(tokens, [(0.0, 1.0)], 2.0, 10.0)


@pytest.mark.slow
class TestEncoder:
    @pytest.fixture(scope="class")
    def encoder(self, extractor) -> TextEncoder:  # type: ignore[no-untyped-def]
        return extractor.text_encoder

    def test_pieces_map_to_words(self, encoder: TextEncoder) -> None:
        tokens = encoder.encode("And so, my fellow Americans: unbelievably good!")
        assert tokens.words == ("And", "so,", "my", "fellow", "Americans:", "unbelievably", "good!")
        assert tokens.embeddings.shape == (len(tokens), 384)
        assert tokens.embeddings.dtype == np.float32
        assert np.all(np.diff(tokens.word_index) >= 0)
        assert set(tokens.word_index.tolist()) == set(range(len(tokens.words)))
        assert len(tokens) > len(tokens.words)  # punctuation and rare words split into pieces

    def test_batch_equals_single_and_is_deterministic(self, encoder: TextEncoder) -> None:
        texts = [
            "what a lovely day",
            "",
            "I really hate this, it is awful.",
            "ok",
            " ".join(f"word{i}" for i in range(300)),  # longer than one window
        ]
        batch = encoder.encode_batch(texts)
        for text, got in zip(texts, batch, strict=True):
            single = encoder.encode(text)
            assert got.words == single.words
            assert np.array_equal(got.word_index, single.word_index)
            assert np.allclose(got.embeddings, single.embeddings, atol=1e-5)
        again = encoder.encode_batch(texts)
        for a, b in zip(batch, again, strict=True):
            assert np.array_equal(a.embeddings, b.embeddings)
        assert len(batch[1]) == 0
        long = batch[4]
        assert len(long) > MAX_SEQUENCE_TOKENS and long.word_index[-1] == 299

    def test_embeddings_carry_meaning(self, encoder: TextEncoder) -> None:
        def mean(text: str) -> np.ndarray:
            v = encoder.encode(text).embeddings.mean(axis=0)
            return v / np.linalg.norm(v)

        happy, glad, train = (
            mean("I am so happy today"),
            mean("I feel glad and cheerful"),
            mean("The train leaves the station at noon"),
        )
        assert happy @ glad > happy @ train + 0.1

    def test_service_and_training_paths_agree(self, extractor, clip) -> None:  # type: ignore[no-untyped-def]
        sentence = "bin blue at f two now"
        bundle = extractor.extract(clip("grid_mp4"), transcript=sentence)
        tokens = extractor.text_encoder.encode_batch([sentence, "another sentence"])[0]
        feats, mask = align_text(tokens, None, bundle.summary.duration_s, bundle.rate_hz)
        assert np.array_equal(mask, bundle.masks["text"])
        assert np.allclose(feats, bundle.features["text"], atol=1e-5)
        # The same sentence alone (no clip) gives the same cells, only the grid is shorter.
        alone, alone_mask = align_text(tokens, None, None, bundle.rate_hz)
        n = len(alone)
        assert alone_mask.all() and np.allclose(alone, bundle.features["text"][:n], atol=1e-5)
        assert not bundle.masks["text"][n:].any()
