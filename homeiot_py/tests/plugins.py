"""Load an Ansible filter plugin of a role or playbook as a module (roles cannot import homeiot,
so their plugins are plain files; the tests hold them to the package and to real services)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]


def load_plugin(relative: str) -> ModuleType:
    """The plugin at ``relative`` (from the repository root), loaded as a fresh module."""
    path = REPO / relative
    spec = importlib.util.spec_from_file_location(path.stem + "_plugin", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
