"""What every benchmark shares: writing its table into a doc between markers, and where the
labelled data lives.

A section of a Markdown file is the text between ``<!-- NAME:begin -->`` and
``<!-- NAME:end -->``; a benchmark rewrites only its own section.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def markers(name: str) -> tuple[str, str]:
    """The begin and end markers of section ``name``."""
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def write_section(doc: Path, name: str, text: str, append: bool = False) -> None:
    """Replace section ``name`` of ``doc`` with ``text``; without its markers, append it at the
    end when ``append``, else stop with a message naming them."""
    begin, end = markers(name)
    body = text if text.endswith("\n") else text + "\n"
    current = doc.read_text(encoding="utf-8")
    if begin in current and end in current:
        head, rest = current.split(begin, 1)
        _, tail = rest.split(end, 1)
        current = f"{head}{begin}\n{body}{end}{tail}"
    elif append:
        current = f"{current.rstrip()}\n\n{begin}\n{body}{end}\n"
    else:
        raise SystemExit(f"markers {begin} / {end} not found in {doc}")
    doc.write_text(current, encoding="utf-8")
    print(f"wrote the {name} section of {doc.relative_to(ROOT)}")


def data_dir() -> Path:
    """The folder of the labelled corpora (``ravdess/``, ``fer2013/``): ``CMAMBA_DATA_DIR``,
    else ``data/`` in the repository (docs/TRAINING.md says where to get them)."""
    return Path(os.environ.get("CMAMBA_DATA_DIR") or ROOT / "data")
