"""The service's layering, read from its imports: the core knows no HTTP, domain errors know no
web framework, and no module reaches for another module's private names."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

SERVICE = Path(__file__).resolve().parents[2] / "service"
WEB = {"fastapi", "starlette", "uvicorn", "pydantic"}


def _imports(path: Path) -> Iterator[tuple[str, str | None]]:
    """``(module, name)`` of every import of a file (name None for ``import module``)."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from ((alias.name, None) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield from ((node.module, alias.name) for alias in node.names)


def test_the_core_and_the_domain_errors_import_no_web_framework() -> None:
    files = [*sorted((SERVICE / "core").glob("*.py")), SERVICE / "errors.py"]
    for path in files:
        for module, _ in _imports(path):
            assert module.split(".")[0] not in WEB, f"{path.name} imports {module}"
            assert not module.startswith("service.api"), f"{path.name} imports {module}"


def test_no_module_imports_a_private_name_of_another() -> None:
    for path in sorted(SERVICE.rglob("*.py")):
        for module, name in _imports(path):
            dunder = name is not None and name.startswith("__") and name.endswith("__")
            if module.startswith("service") and name is not None and not dunder:
                assert not name.startswith("_"), f"{path.relative_to(SERVICE)}: {module}.{name}"


def test_the_core_modules_import_each_other_one_way() -> None:
    core = {p.stem: p for p in (SERVICE / "core").glob("*.py")}
    edges = {
        (name, module.rsplit(".", 1)[-1])
        for name, path in core.items()
        for module, _ in _imports(path)
        if module.startswith("service.core.")
    }
    assert not {(a, b) for a, b in edges if (b, a) in edges}
    assert ("engine", "timeline") in edges  # the use case drives the timeline, not back
