"""The fixed train/valid/test split of rated sentences."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from model.training.rated_texts import (
    RatedText,
    read_rated_texts,
    read_snippet_folder,
    rescale,
    split_group,
    split_of,
    split_rated_texts,
)

SNIPPETS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "sentiment-snippets"


def test_split_depends_only_on_source_and_group() -> None:
    items = [RatedText(str(i), 0.0, "x", "tweets") for i in range(3000)]
    first = split_rated_texts(items)
    second = split_rated_texts(list(reversed(items)))
    for name in ("train", "valid", "test"):
        assert {i.id for i in first[name]} == {i.id for i in second[name]}
    sizes = {name: len(v) for name, v in first.items()}
    assert 0.76 < sizes["train"] / 3000 < 0.84
    assert 0.07 < sizes["valid"] / 3000 < 0.13
    assert 0.07 < sizes["test"] / 3000 < 0.13
    # the source is part of the key: the same ids fall differently in another source
    other = split_rated_texts(RatedText(i.id, 0.0, "x", "movie_reviews") for i in items)
    assert {i.id for i in other["test"]} != {i.id for i in first["test"]}


def test_sentences_of_one_article_share_a_split() -> None:
    assert split_group("12_3") == "12" and split_group("abc_d") == "abc_d"
    assert split_group("77") == "77"
    splits = {split_of("nyt_editorials", f"40_{k}") for k in range(1, 30)}
    assert len(splits) == 1


def test_rescale_maps_ends_and_middle() -> None:
    assert rescale(-4.0, (-4, 4), (-3, 3)) == -3.0
    assert rescale(4.0, (-4, 4), (-3, 3)) == 3.0
    assert rescale(2.0, (-4, 4), (-3, 3)) == pytest.approx(1.5)


def test_read_rated_texts_reports_bad_lines(tmp_path: Path) -> None:
    path = tmp_path / "mine.tsv"
    path.write_text("a\t1.5\tgood film\n\nb\tbad\ttext\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"mine\.tsv:3"):
        read_rated_texts(path)
    path.write_text("a\t1.5\tgood\tfilm\n", encoding="utf-8")
    (item,) = read_rated_texts(path)
    assert item == RatedText("a", 1.5, "good\tfilm", "mine")


@pytest.mark.skipif(not SNIPPETS.is_dir(), reason="shared snippet data not present")
def test_snippet_split_sizes_are_fixed() -> None:
    # The documented split of docs/TRAINING.md; a change here changes every reported number.
    splits = split_rated_texts(read_snippet_folder(SNIPPETS))
    sizes = {name: Counter(i.source for i in items) for name, items in splits.items()}
    assert sizes["test"] == {"movie_reviews": 1034, "nyt_editorials": 503, "tweets": 428}
    assert sizes["valid"] == {"movie_reviews": 1058, "nyt_editorials": 427, "tweets": 412}
    nyt_test_articles = {split_group(i.id) for i in splits["test"] if i.source == "nyt_editorials"}
    nyt_train_articles = {
        split_group(i.id) for i in splits["train"] if i.source == "nyt_editorials"
    }
    assert not nyt_test_articles & nyt_train_articles
