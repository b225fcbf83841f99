"""DESIGN.md's size rules, read from the source: modules of at most 400 lines and functions of at most
80 in the library and the programs (bench/ holds studies and is exempt)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80


def sources() -> list[Path]:
    return sorted(p for folder in ("embsum", "train", "serve") for p in (REPO / folder).rglob("*.py"))


def long_functions(source: str, limit: int = MAX_FUNCTION_LINES) -> list[tuple[str, int]]:
    tree = ast.parse(source)
    return [(f.name, f.end_lineno - f.lineno + 1) for f in ast.walk(tree)
            if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef) and f.end_lineno is not None
            and f.end_lineno - f.lineno + 1 > limit]


def test_the_check_sees_a_long_function() -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    assert long_functions(f"def f():\n{body}\n") == [("f", MAX_FUNCTION_LINES + 1)]
    assert long_functions("def g():\n    return 1\n") == []


@pytest.mark.parametrize("path", sources(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_modules_and_functions_stay_small(path: Path) -> None:
    source = path.read_text()
    lines = source.count("\n")
    assert lines <= MAX_MODULE_LINES, f"{path.relative_to(REPO)}: {lines} lines > {MAX_MODULE_LINES}: split it"
    assert long_functions(source) == [], f"{path.relative_to(REPO)}: functions over {MAX_FUNCTION_LINES} lines"
