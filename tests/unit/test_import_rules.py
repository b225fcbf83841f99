"""The dependency rules of DESIGN.md section 4, read from the source (every import, at any depth):
train/ and serve/ import embsum/; embsum/ imports neither, nor Ray Train or Ray Serve; train/ and
serve/ do not import each other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Our programs by both of their names: top-level in a checkout, under embsum in the wheel.
OURS = {"train": ("train", "embsum.train"), "serve": ("serve", "embsum.serve")}
# Known exceptions (file, module): none. A stale entry fails the test.
KNOWN: set[tuple[str, str]] = set()


def imports(path: Path, source: str | None = None) -> set[str]:
    """Every module ``path`` imports, absolute (relative imports resolved against its folder's
    package: ``from .bundle import X`` in serve/ is ``serve.bundle``); ``from a import b`` yields
    ``a`` and ``a.b`` (b may be a module)."""
    package = path.relative_to(REPO).parent.as_posix().replace("/", ".")
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text() if source is None else source, str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def violations_in(names: set[str], forbidden: tuple[str, ...]) -> set[str]:
    """The forbidden prefixes that ``names`` reach."""
    return {p for p in forbidden for name in names if _under(name, (p,))}


def violations(folder: str, forbidden: tuple[str, ...]) -> set[tuple[str, str]]:
    return {(path.relative_to(REPO).as_posix(), bad) for path in sorted((REPO / folder).rglob("*.py"))
            for bad in violations_in(imports(path), forbidden)}


@pytest.mark.parametrize("folder,forbidden", [
    ("embsum", ("ray.train", "ray.serve", *OURS["train"], *OURS["serve"])),
    ("train", ("ray.serve", *OURS["serve"])),
    ("serve", ("ray.train", *OURS["train"])),
])
def test_dependency_rules(folder: str, forbidden: tuple[str, ...]) -> None:
    found = violations(folder, forbidden)
    known = {k for k in KNOWN if k[0].startswith(folder + "/")}
    assert found - known == set(), f"{folder}/ imports what DESIGN.md section 4 forbids: {sorted(found - known)}"
    assert known <= found, f"stale known exception(s), remove them from KNOWN: {sorted(known - found)}"


def test_train_and_serve_import_their_own_modules_relatively() -> None:
    """train/ and serve/ install as embsum.train and embsum.serve (pyproject.toml) but run as
    top-level train/serve from a checkout: an absolute import of their own name works in one of the
    two only."""
    for folder, names in OURS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            absolute = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level
                        and n.module and _under(n.module, names)]
            absolute += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
                         if _under(a.name, names)]
            assert not absolute, f"{path.relative_to(REPO)}: import {absolute} relatively (from .x import ...)"


def test_the_checker_sees_each_kind_of_import() -> None:
    """The rules above are only as good as ``imports``: it must see what a violation looks like."""
    code = ("import ray.train\nfrom ray import serve\nfrom .bundle import load_bundle\n"
            "def f():\n    from train.loop import x\n")
    found = imports(REPO / "serve" / "probe.py", code)  # as if it were a serve/ module
    assert {"ray.train", "ray.serve", "serve.bundle", "serve.bundle.load_bundle", "train.loop"} <= found
    assert violations_in(found, ("ray.train", *OURS["train"])) == {"ray.train", "train"}
