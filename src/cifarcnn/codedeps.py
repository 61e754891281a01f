"""Which of the project's modules a script or module imports, directly or transitively.

Read from the source (``ast``), not by importing it. Two users: the `code` stage, which writes
codedeps/<stage>.json (the files each stage's script runs, with their digests) so that a stage
depends on exactly its own code, and the resume state, which records a digest of the code
training runs so that a change to that code discards it.

A module "runs" a package file when it imports it, or when it names it as code to run (a string
``"served_model.py"``: the file MLflow runs to build the served model).
"""
from __future__ import annotations

import ast
import hashlib
import re
from pathlib import Path

PACKAGE = "cifarcnn"
PACKAGE_DIR = Path(__file__).resolve().parent
CODE_STAGE = "code"  # the stage that writes codedeps/<stage>.json for every other stage


def module_file(name: str, package_dir: Path = PACKAGE_DIR) -> Path:
    """``cifarcnn.training`` -> .../cifarcnn/training.py (``cifarcnn`` -> __init__.py)."""
    parts = name.split(".")[1:]
    return package_dir.joinpath(*parts).with_suffix(".py") if parts else package_dir / "__init__.py"


def _in_package(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".")


_PARSED: dict[tuple, frozenset[str]] = {}  # (file, package folder, sha256 of its text) -> direct_imports


def direct_imports(path: Path, package_dir: Path = PACKAGE_DIR) -> set[str]:
    """The package modules ``path`` imports itself (absolute or relative, anywhere in the file),
    and those it names as a file to run. A file's text is parsed once a process (keyed by its
    digest, so an edit is always seen): a train stage asks three times (its resume key twice, its
    run record once), and parsing the training code's modules takes about 0.1 s each time."""
    source = Path(path).read_bytes()
    key = (str(Path(path).resolve()), str(package_dir.resolve()), hashlib.sha256(source).digest())
    if key not in _PARSED:
        _PARSED[key] = frozenset(_parse_imports(Path(path), source.decode("utf-8"), package_dir))
    return set(_PARSED[key])


def _parse_imports(path: Path, source: str, package_dir: Path) -> set[str]:
    tree = ast.parse(source, filename=str(path))
    inside = Path(path).resolve().parent == package_dir.resolve()
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
            found.update(f"{base}.{a.name}" for a in node.names if module_file(f"{base}.{a.name}", package_dir).exists())
        elif inside and isinstance(node, ast.Constant) and isinstance(node.value, str):
            named = re.fullmatch(r"(\w+)\.py", node.value)
            if named and (package_dir / node.value).exists():
                found.add(f"{PACKAGE}.{named.group(1)}")
    return found


def project_modules(path: str | Path, package_dir: Path = PACKAGE_DIR) -> set[Path]:
    """Every package file that running ``path`` imports, transitively (``__init__.py``
    included: importing any module of the package runs it), in ``package_dir``."""
    seen: set[Path] = set()
    todo = [Path(path)]
    while todo:
        for name in direct_imports(todo.pop(), package_dir):
            for file in (package_dir / "__init__.py", module_file(name, package_dir)):
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


def stage_files(script: Path, root: Path) -> list[str]:
    """The files running ``script`` runs, relative to the repository ``root``, sorted: the script
    and every file of ``root``/src/cifarcnn it imports, transitively."""
    return sorted(f.relative_to(root).as_posix() for f in [script, *project_modules(script, root / "src" / PACKAGE)])


def stage_code(script: Path, root: Path) -> dict[str, str]:
    """:func:`stage_files` -> the sha256 of each (what codedeps/<stage>.json holds)."""
    return {rel: hashlib.sha256((root / rel).read_bytes()).hexdigest() for rel in stage_files(script, root)}


def hashed_scripts(root: Path) -> list[Path]:
    """Every stage script but the `code` stage's own (a stage is named after its script)."""
    return [p for p in sorted((root / "stages").glob("*.py")) if p.stem != CODE_STAGE]
