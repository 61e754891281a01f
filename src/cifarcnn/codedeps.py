"""Which of the project's modules a script or module imports, directly or transitively.

Read from the source (``ast``), not by importing it. Two users: the test that holds every
stage's ``deps`` in dvc.yaml to exactly its script's imports (tests/test_deps.py), and the
resume state, which records a digest of the code training runs so that a change to that code
discards it.
"""
from __future__ import annotations

import ast
import hashlib
from pathlib import Path

PACKAGE = "cifarcnn"
PACKAGE_DIR = Path(__file__).resolve().parent
INIT = PACKAGE_DIR / "__init__.py"


def module_file(name: str) -> Path:
    """``cifarcnn.training`` -> .../cifarcnn/training.py (``cifarcnn`` -> __init__.py)."""
    parts = name.split(".")[1:]
    return PACKAGE_DIR.joinpath(*parts).with_suffix(".py") if parts else INIT


def _in_package(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".")


def direct_imports(path: Path) -> set[str]:
    """The package modules ``path`` imports itself (absolute or relative, anywhere in the file)."""
    tree = ast.parse(Path(path).read_text(encoding="utf-8"), filename=str(path))
    inside = Path(path).resolve().parent == PACKAGE_DIR
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if _in_package(a.name))
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and _in_package(node.module or ""):
                base = node.module
            elif node.level == 1 and inside:
                base = PACKAGE + (f".{node.module}" if node.module else "")
            else:
                continue
            found.add(base)
            # `from cifarcnn import figures` imports a module; `from .x import name` a name
            found.update(f"{base}.{a.name}" for a in node.names if module_file(f"{base}.{a.name}").exists())
    return found


def project_modules(path: str | Path) -> set[Path]:
    """Every package file that running ``path`` imports, transitively (``__init__.py``
    included: importing any module of the package runs it)."""
    seen: set[Path] = set()
    todo = [Path(path)]
    while todo:
        for name in direct_imports(todo.pop()):
            for file in (INIT, module_file(name)):
                if file.exists() and file not in seen:
                    seen.add(file)
                    todo.append(file)
    return seen


def code_digest(module: str) -> str:
    """A digest of ``module`` and everything it imports from the package."""
    digest = hashlib.sha256()
    for file in sorted({module_file(module)} | project_modules(module_file(module))):
        digest.update(file.name.encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()[:16]
