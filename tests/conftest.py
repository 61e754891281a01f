import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # tests/fixtures.py

# The two end-to-end files take most of the suite's time (minutes each; the rest, seconds per file).
# `pytest -n 2 --dist loadfile` (pyproject.toml) hands each worker a file at a time in collection
# order, so these go first: each starts at once on its own worker, and the short files fill in.
LONGEST_FIRST = ("test_smoke.py", "test_team.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order
