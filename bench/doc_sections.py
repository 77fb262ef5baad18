"""What every benchmark shares: where things are, and writing its table into a doc between
markers.

A section of a Markdown file is the text between ``<!-- NAME:begin -->`` and
``<!-- NAME:end -->``; a benchmark rewrites only its own section. A section may hold blocks of
its own (``<!-- NAME-PART:begin -->`` ...), each rewritten on its own
(:func:`write_blocks`).

Every script starts with the one line that lets ``python bench/NAME.py`` import this module::

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
"""The repository."""
DOCS = ROOT / "docs"
SHARED = ROOT.parent / "shared"
"""The shared folder beside the repository (media clips, rated texts)."""
MEDIA = SHARED / "media"


def markers(name: str) -> tuple[str, str]:
    """The begin and end markers of section ``name``."""
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def section_of(text: str, name: str) -> str | None:
    """The text between section ``name``'s markers in ``text``; None without them."""
    begin, end = markers(name)
    if begin not in text or end not in text:
        return None
    return text.split(begin, 1)[1].split(end, 1)[0]


def replace_section(text: str, name: str, body: str, append: bool = True) -> str:
    """``text`` with section ``name`` holding ``body`` (a newline is added after the begin
    marker and at the end of ``body``); without its markers, the section is appended at the end
    when ``append``, else :class:`SystemExit` names them."""
    begin, end = markers(name)
    body = body if body.endswith("\n") else body + "\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        return f"{head}{begin}\n{body}{end}{tail}"
    if append:
        return f"{text.rstrip()}\n\n{begin}\n{body}{end}\n"
    raise SystemExit(f"markers {begin} / {end} not found")


def write_section(doc: Path, name: str, text: str, append: bool = False) -> None:
    """Replace section ``name`` of ``doc`` with ``text``; without its markers, append it at the
    end when ``append``, else stop with a message naming them."""
    current = doc.read_text(encoding="utf-8") if doc.exists() or not append else ""
    try:
        updated = replace_section(current, name, text, append=append)
    except SystemExit as exc:
        raise SystemExit(f"{exc} in {doc}") from None
    doc.write_text(updated, encoding="utf-8")
    shown = doc.relative_to(ROOT) if doc.resolve().is_relative_to(ROOT) else doc
    print(f"wrote the {name} section of {shown}")


def write_blocks(
    doc: Path, section: str, blocks: Mapping[str, str], *, heading: str = "", keep: bool = True
) -> None:
    """Rewrite blocks ``SECTION-NAME`` inside section ``section`` of ``doc``.

    With ``keep`` the section's other text and blocks stay as they are, and a new block is
    appended at the end of the section (``heading`` starts a section that was empty); without
    it the section becomes ``heading`` and ``blocks`` in the given order. The section itself is
    appended to ``doc`` when its markers are missing.
    """
    current = doc.read_text(encoding="utf-8") if doc.exists() else ""
    inner = section_of(current, section) or ""
    if not keep or not inner.strip():
        inner = heading
    for name, body in blocks.items():
        inner = replace_section(inner, f"{section}-{name}", body.rstrip("\n"))
    write_section(doc, section, inner.strip("\n"), append=True)


def data_dir() -> Path:
    """The folder of the labelled corpora (``ravdess/``, ``fer2013/``): ``CMAMBA_DATA_DIR``,
    else ``data/`` in the repository (docs/TRAINING.md says where to get them)."""
    return Path(os.environ.get("CMAMBA_DATA_DIR") or ROOT / "data")
