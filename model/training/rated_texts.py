"""Rated sentences (id, mean human rating, text) and their fixed train/valid/test split.

The layout is the one of the VADER ground-truth files (Hutto & Gilbert, ICWSM 2014):
tab-separated ``id``, ``rating`` on [-4, 4], ``text``, no header. A sentence's split depends
only on its source name and its *group* key, through a hash, so it never changes when files
are reordered, extended or read on another machine:

    bucket = int(sha256(f"{source}:{group}").hexdigest(), 16) % 100
    train if bucket < 80, valid if bucket < 90, else test

The group is the id, except for ids of the form ``ARTICLE_SENTENCE`` (the NYT editorial
snippets), whose group is ``ARTICLE``: sentences of one editorial stay in one split, so no
article is seen in training and tested on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "valid", "test")
SNIPPET_SCALE = (-4.0, 4.0)

# File name -> short source name used in tables and split hashing.
SNIPPET_FILES = {
    "movieReviewSnippets_GroundTruth.txt": "movie_reviews",
    "nytEditorialSnippets_GroundTruth.txt": "nyt_editorials",
    "tweets_GroundTruth.txt": "tweets",
}


@dataclass(frozen=True)
class RatedText:
    """One rated sentence."""

    id: str
    rating: float
    text: str
    source: str = ""


def read_rated_texts(path: str | Path, source: str | None = None) -> list[RatedText]:
    """Read a tab-separated file of ``id``, ``rating``, ``text`` (no header).

    ``source`` defaults to the short name of a known snippet file, else the file's stem.
    Blank lines are skipped; a line without three fields raises ``ValueError`` with its number.
    """
    path = Path(path)
    if source is None:
        source = SNIPPET_FILES.get(path.name, path.stem)
    items: list[RatedText] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split("\t", 2)
            if len(fields) != 3:
                raise ValueError(f"{path}:{number}: expected id<TAB>rating<TAB>text")
            try:
                rating = float(fields[1])
            except ValueError:
                raise ValueError(f"{path}:{number}: rating {fields[1]!r} is not a number") from None
            items.append(RatedText(fields[0], rating, fields[2], source))
    return items


def read_snippet_folder(folder: str | Path) -> list[RatedText]:
    """All three snippet files of ``folder`` (the shared ``sentiment-snippets`` layout)."""
    folder = Path(folder)
    items: list[RatedText] = []
    for name in SNIPPET_FILES:
        items.extend(read_rated_texts(folder / name))
    return items


def split_group(item_id: str) -> str:
    """The key that keeps related sentences together: ``"12_3"`` -> ``"12"``, else the id."""
    head, sep, tail = item_id.partition("_")
    if sep and head.isdigit() and tail.isdigit():
        return head
    return item_id


def split_of(source: str, item_id: str, valid_pct: int = 10, test_pct: int = 10) -> str:
    """The fixed split ("train", "valid" or "test") of one sentence; see the module doc."""
    digest = hashlib.sha256(f"{source}:{split_group(item_id)}".encode()).hexdigest()
    bucket = int(digest, 16) % 100
    if bucket < 100 - valid_pct - test_pct:
        return "train"
    if bucket < 100 - test_pct:
        return "valid"
    return "test"


def split_rated_texts(items: Iterable[RatedText]) -> dict[str, list[RatedText]]:
    """Partition items into the fixed train/valid/test split, keeping file order."""
    out: dict[str, list[RatedText]] = {name: [] for name in SPLITS}
    for item in items:
        out[split_of(item.source, item.id)].append(item)
    return out


def rescale(value: float, source: tuple[float, float], target: tuple[float, float]) -> float:
    """Map ``value`` linearly from the ``source`` range onto the ``target`` range."""
    (a, b), (c, d) = source, target
    return c + (value - a) * (d - c) / (b - a)
