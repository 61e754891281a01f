"""Point a moved checkout's MLflow store at the checkout's own artifacts.

A local store (``mlflow.db``) records absolute artifact paths: its experiment's location, each
run's artifact URI, each logged model's and model version's storage location. After the
checkout moves (``mv``, a copy to another machine), MLflow would write new artifacts into the
old path, recreating it, and list none for the old runs. The stages refuse to log then
(tracking.connect says so in one line); this rewrites those paths from the old root to this one,
in one transaction, for every row under the old ``mlartifacts/``:

    python -m cifarcnn.rebind            # in the moved checkout
"""
from __future__ import annotations

import argparse
import sqlite3
from pathlib import Path

from .errors import UserError, cli

# (table, column) holding absolute artifact URIs in MLflow 3's sqlite schema
COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"),
           ("logged_models", "artifact_location"), ("model_versions", "storage_location"))


def recorded_homes(db: Path) -> set[str]:
    """The ``file://.../mlartifacts`` folders the store's experiments point at."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT artifact_location FROM experiments").fetchall()
    return {loc for (loc,) in rows if loc and loc.startswith("file://") and loc.rstrip("/").endswith("/mlartifacts")}


def rebind(db: Path, new_home: str) -> dict[str, int]:
    """Rewrite every artifact path under another ``mlartifacts`` to ``new_home``; rows per table."""
    olds = sorted(recorded_homes(db) - {new_home})
    changed: dict[str, int] = {}
    with sqlite3.connect(db) as conn:  # one transaction: all or nothing
        for old in olds:
            for table, column in COLUMNS:
                cur = conn.execute(
                    f"UPDATE {table} SET {column} = ? || substr({column}, ?) "  # noqa: S608 - fixed names
                    f"WHERE {column} = ? OR {column} LIKE ? ESCAPE '\\'",
                    (new_home, len(old) + 1, old, old.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "/%"))
                changed[table] = changed.get(table, 0) + cur.rowcount
    return changed


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cifarcnn.rebind", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="the checkout (default: here)")
    root = parser.parse_args(argv).root.resolve()
    db = root / "mlflow.db"
    if not db.exists():
        raise UserError(f"{db} does not exist: run this in the checkout that holds mlflow.db (or pass --root)")
    new_home = (root / "mlartifacts").as_uri()
    olds = recorded_homes(db) - {new_home}
    if not olds:
        print(f"{db} already points at {new_home}: nothing to do")
        return
    changed = rebind(db, new_home)
    print(f"{db}: {', '.join(sorted(olds))} -> {new_home} "
          f"({', '.join(f'{n} {table}' for table, n in changed.items())})")


if __name__ == "__main__":
    main()
