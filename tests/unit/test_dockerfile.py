"""The container image holds every package the roles import (parsed from the Dockerfile's COPY lines), and its
entry point is the `treepo` command."""

import ast
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def dockerfile_lines() -> list[str]:
    return [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]


def copied() -> set[str]:
    """Top-level paths of the repository the image's COPY lines bring in."""
    paths = set()
    for line in dockerfile_lines():
        if line.startswith("COPY "):
            sources = [w for w in line.split()[1:-1] if not w.startswith("--")]
            paths |= {Path(src).parts[0] for src in sources}
    return paths


def local_packages() -> set[str]:
    return {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "bench"}


def imported_local_packages(package: str) -> set[str]:
    """Top-level packages of this repository that any module of `package` imports."""
    found = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found & local_packages()


def test_the_image_copies_every_package_the_roles_import():
    image = copied()
    entry = {"treepo"}  # `treepo` = treepo.cli:main, which starts every role
    needed, todo = set(), list(entry)
    while todo:  # the import closure of the entry point over this repository's packages
        package = todo.pop()
        if package not in needed:
            needed.add(package)
            todo.extend(imported_local_packages(package))
    assert needed <= image, f"packages the roles import that the Dockerfile does not COPY: {sorted(needed - image)}"
    assert {"pyproject.toml", "constraints.txt", "configs"} <= image


def test_the_packages_the_wheel_installs_are_the_copied_ones():
    include = re.search(r"include = \[([^\]]*)\]", (ROOT / "pyproject.toml").read_text()).group(1)
    wheel = {name.strip(' "*') for name in include.split(",")}
    assert wheel == local_packages() and wheel <= copied()


def test_the_entry_point_is_treepo():
    (entry,) = [line for line in dockerfile_lines() if line.startswith("ENTRYPOINT")]
    assert json.loads(entry.removeprefix("ENTRYPOINT")) == ["treepo"]
