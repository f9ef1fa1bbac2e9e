"""The shape every source file keeps ("Layers you can see"): a docstring on every public
module, class and function; no file over 500 lines; no function over 80 lines.

Read with `ast`; nothing from the project is imported. Public: a name without a leading
underscore, defined at module level or in a public class (functions nested in functions are
implementation, not interface).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("canopy", "cluster", "learner", "actors", "cache", "replay")
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 80

Def = ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef


def source_files() -> list[Path]:
    return sorted(p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py"))


def definitions(body: list[ast.stmt], prefix: str = "") -> Iterator[tuple[str, Def]]:
    """(qualified name, node) of every class and function reachable without entering a function."""
    for node in body:
        if isinstance(node, Def):
            yield prefix + node.name, node
            if isinstance(node, ast.ClassDef):
                yield from definitions(node.body, f"{prefix}{node.name}.")


def is_public(qualname: str) -> bool:
    return not any(part.startswith("_") for part in qualname.split("."))


def undocumented(tree: ast.Module) -> list[str]:
    missing = [] if ast.get_docstring(tree) else ["(module)"]
    missing += [q for q, node in definitions(tree.body) if is_public(q) and not ast.get_docstring(node)]
    return missing


def long_functions(tree: ast.Module) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            lines = node.end_lineno - node.lineno + 1
            if lines > MAX_FUNCTION_LINES:
                found.append(f"{node.name} ({lines} lines)")
    return found


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_every_public_name_has_a_docstring() -> None:
    problems = [
        f"{_rel(p)}: {name}"
        for p in source_files()
        for name in undocumented(ast.parse(p.read_text(encoding="utf-8")))
    ]
    if problems:
        pytest.fail(
            f"{len(problems)} public names without a docstring:\n" + "\n".join(problems), pytrace=False
        )


def test_no_source_file_is_over_500_lines() -> None:
    too_long = [
        f"{_rel(p)} ({n})" for p in source_files() if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES
    ]
    assert not too_long, f"split these files (at most {MAX_FILE_LINES} lines): {too_long}"


def test_no_function_is_over_80_lines() -> None:
    problems = [f"{_rel(p)}: {f}" for p in source_files() for f in long_functions(ast.parse(p.read_text()))]
    assert not problems, f"split these functions (at most {MAX_FUNCTION_LINES} lines): {problems}"


def test_the_checks_find_what_they_look_for() -> None:
    tree = ast.parse(
        "def f():\n    pass\n"
        "class _C:\n    def m(self):\n        pass\n"
        "class D:\n    '''D.'''\n    def m(self):\n        def inner():\n            pass\n"
        "def long():\n" + "    x = 1\n" * MAX_FUNCTION_LINES
    )
    assert undocumented(tree) == ["(module)", "f", "D.m", "long"]
    assert long_functions(tree) == [f"long ({MAX_FUNCTION_LINES + 1} lines)"]
