"""The dependency rule: data flows one way, stages never import each other sideways."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "src" / "spot"

# module -> spot modules it must never import
FORBIDDEN = {
    "websocket": {"data_processor", "queue_manager", "db_writer", "main_loop"},
    "file_replay": {"queue_manager", "db_writer", "main_loop"},
    "data_processor": {"websocket", "queue_manager", "db_writer", "main_loop", "serve"},
    "messages": {"data_processor", "queue_manager", "db_writer", "websocket", "main_loop"},
    "tables": {"data_processor", "queue_manager", "db_writer", "websocket", "main_loop"},
    "queue_manager": {"websocket", "data_processor", "db_writer", "main_loop"},
    "db_writer": {"websocket", "data_processor", "queue_manager", "main_loop", "serve"},
    "fallback_storage": {"db_writer", "websocket", "data_processor", "main_loop"},
    "serve": {"data_processor", "queue_manager", "db_writer", "main_loop", "websocket"},
}
MAY_IMPORT_MAIN_LOOP = {"cli", "demo", "main_loop"}


def _spot_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("spot."):
            names.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[1] for a in node.names if a.name.startswith("spot."))
    return names


MODULES = sorted(p for p in PACKAGE.glob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.stem)
def test_module_respects_the_dependency_rule(path: Path) -> None:
    imported = _spot_imports(path)

    assert not imported & FORBIDDEN.get(path.stem, set())
    if path.stem not in MAY_IMPORT_MAIN_LOOP:
        assert "main_loop" not in imported


def test_the_users_component_names_are_kept() -> None:
    names = {p.stem for p in MODULES}

    assert {"main_loop", "websocket", "data_processor", "queue_manager", "db_writer"} <= names
