"""The role packages meet through `protocol/` (and the buffer's client, which actors and the learner use):
no role imports another role's internals; what several roles share lives in `treepo/` (the command's package)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {"actors": {"learner"}, "learner": {"actors"}, "buffer": {"actors", "learner"},
             "protocol": {"actors", "learner", "buffer", "treepo"}}


def imported_top_levels(package: str) -> dict[str, set[str]]:
    """Per module file of `package`: the top-level names it imports (absolute imports)."""
    out = {}
    for path in (ROOT / package).rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        out[str(path.relative_to(ROOT))] = names
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_role_does_not_import_another_roles_internals(package):
    crossing = {module: sorted(names & FORBIDDEN[package])
                for module, names in imported_top_levels(package).items() if names & FORBIDDEN[package]}
    assert not crossing, crossing


def test_no_generic_top_level_package_names():
    """`models`, `launcher` or `telemetry` on a user's PYTHONPATH would shadow ours: only the role packages and
    `treepo` are top-level."""
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "bench"}
    assert packages == {"protocol", "actors", "learner", "buffer", "treepo"}
