"""The wheel installs one top-level package, ``embsum``: train/ and serve/ as embsum.train and
embsum.serve (pyproject.toml's package-dir), bench/ not at all. Built for real from a copy of the
sources with setuptools (the build backend pyproject names), then read as a zip."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INSTALLED_AS = {"embsum": "embsum", "train": "embsum/train", "serve": "embsum/serve"}


@pytest.fixture(scope="module")
def wheel_files(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for folder in INSTALLED_AS:
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    out = src / "dist"
    proc = subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta as b; "
                           "print(b.build_wheel(sys.argv[1]))", str(out)],
                          cwd=src, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with zipfile.ZipFile(out / proc.stdout.strip().splitlines()[-1]) as whl:
        return set(whl.namelist())


def test_one_top_level_package(wheel_files: set[str]) -> None:
    top = {name.split("/")[0] for name in wheel_files if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"embsum"}, f"the wheel installs {sorted(top)}; only 'embsum' (no train, serve, bench)"


def test_every_module_of_the_three_folders_is_in_the_wheel(wheel_files: set[str]) -> None:
    for folder, installed in INSTALLED_AS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO / folder).as_posix()
            assert f"{installed}/{rel}" in wheel_files, f"{folder}/{rel} is not in the wheel as {installed}/{rel}"


def test_package_data_and_entry_point(wheel_files: set[str]) -> None:
    for name in ("embsum/train/deepspeed/zero2.json", "embsum/assets/t5-tokenizer/tokenizer_config.json"):
        assert name in wheel_files, name
    for path in (REPO / "train" / "deepspeed").glob("*.json"):
        assert f"embsum/train/deepspeed/{path.name}" in wheel_files, path.name
