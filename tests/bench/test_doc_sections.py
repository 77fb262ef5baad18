"""The benchmarks' one doc-section writer: a section is replaced in place, blocks inside it one by
one, and nothing outside the markers changes."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.doc_sections import section_of, write_blocks, write_section

DOC = "# Performance\n\nintro\n\n<!-- load:begin -->\nold table\n<!-- load:end -->\n\ntail\n"


def test_a_section_is_replaced_and_the_rest_kept(tmp_path: Path) -> None:
    doc = tmp_path / "PERFORMANCE.md"
    doc.write_text(DOC)
    write_section(doc, "load", "new table")
    assert doc.read_text() == DOC.replace("old table", "new table")
    with pytest.raises(SystemExit, match="soak:begin"):
        write_section(doc, "soak", "numbers")
    write_section(doc, "soak", "numbers", append=True)
    text = doc.read_text()
    assert text.startswith(DOC.replace("old table", "new table").rstrip())
    assert text.endswith("\n\n<!-- soak:begin -->\nnumbers\n<!-- soak:end -->\n")
    assert section_of(text, "soak") == "\nnumbers\n" and section_of(text, "gpu") is None


def test_blocks_inside_a_section(tmp_path: Path) -> None:
    doc = tmp_path / "PERFORMANCE.md"
    doc.write_text(DOC.replace("old table", ""))
    write_blocks(doc, "load", {"cpu": "cpu v1", "gpu": "gpu v1"}, heading="### Load")
    write_blocks(doc, "load", {"cpu": "cpu v2"}, heading="### ignored once written")
    inner = section_of(doc.read_text(), "load")
    assert inner is not None
    assert inner.index("### Load") < inner.index("cpu v2") < inner.index("gpu v1")
    assert "cpu v1" not in inner and "ignored" not in inner
    # keep=False rewrites the heading and keeps only the blocks given, in their order
    write_blocks(doc, "load", {"gpu": "gpu v2", "cpu": "cpu v3"}, heading="### New", keep=False)
    text = doc.read_text()
    inner = section_of(text, "load")
    assert inner is not None and inner.startswith("\n### New\n")
    assert inner.index("gpu v2") < inner.index("cpu v3")
    assert text.startswith("# Performance\n\nintro\n\n") and text.endswith("\n\ntail\n")
