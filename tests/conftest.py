import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cifarcnn import warm as warm_launcher  # the standard library only: no torch yet (see below)

sys.path.insert(0, str(Path(__file__).parent))  # tests/fixtures.py

# One torch thread per process: `pytest -n 2` already keeps both cores busy, and a second OpenMP
# thread then spin-waits for a core that another process holds. Measured beside two busy loops on
# 2 cores: test_augment.py took 36 CPU-s with torch's default 2 threads, 12 CPU-s with 1. Set
# before anything imports torch; every process the tests start (dvc, stages, warm servers, Ray,
# queue workers) inherits it. A developer's own OMP_NUM_THREADS wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# The warm-stage servers (cifarcnn.warm) that the tests' stages start: in a folder of this
# process's own (mkdtemp: mode 0700, as the launcher requires), not the user's
# /tmp/cifarcnn-warm-<uid>; up for the whole run, not 60 s idle (each restart between two tests cost
# a server's imports, about 10 CPU-s under the suite's load, and the stages that ran cold
# meanwhile); and stopped when this process's session ends.
WARM_DIR = Path(tempfile.mkdtemp(prefix="cifarcnn-tests-warm-"))
os.environ.setdefault("CIFARCNN_WARM_DIR", str(WARM_DIR))
os.environ.setdefault("CIFARCNN_WARM_IDLE_S", "1800")
# The empty-store template (cifarcnn.tracking.cache_dir) in this run's own folder, not the user's
# ~/.cache/cifarcnn: made once by the run's first new store, so every run starts from the same state.
CACHE_DIR = Path(tempfile.mkdtemp(prefix="cifarcnn-tests-cache-"))
os.environ.setdefault("CIFARCNN_CACHE_DIR", str(CACHE_DIR))


def pytest_sessionfinish(session):
    warm_launcher.stop(WARM_DIR)
    shutil.rmtree(WARM_DIR, ignore_errors=True)
    shutil.rmtree(CACHE_DIR, ignore_errors=True)

# The two end-to-end files take most of the suite's time (minutes each; the rest, seconds per file).
# `pytest -n 2 --dist loadfile` (pyproject.toml) hands each worker a file at a time in collection
# order, so these go first: each starts at once on its own worker, and the short files fill in.
LONGEST_FIRST = ("test_smoke.py", "test_team.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order


# Where the suite's time goes (docs/tests.md: Time). With CIFARCNN_TEST_TIMING=<file>, every test
# phase (setup, call, teardown) appends one JSON line: its worker, start and end (epoch seconds),
# and the CPU seconds of this worker and the children it has reaped (subprocess.run's dvc, stages,
# servers it stopped; not detached daemons such as a warm-stage server or Ray's), so a phase whose
# wall time is much larger than its CPU time waits rather than computes. bench/test_timing.py sums it.
TIMING_ENV = "CIFARCNN_TEST_TIMING"


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _timed(phase: str):
    @pytest.hookimpl(hookwrapper=True)
    def hook(item):
        path = os.environ.get(TIMING_ENV)
        if not path:
            yield
            return
        start, cpu = time.time(), _cpu_seconds()
        yield
        line = {"test": item.nodeid, "phase": phase, "worker": os.environ.get("PYTEST_XDIST_WORKER", "main"),
                "start": round(start, 3), "end": round(time.time(), 3), "cpu": round(_cpu_seconds() - cpu, 3)}
        with open(path, "a") as fh:  # O_APPEND: one short write per line, workers do not interleave
            fh.write(json.dumps(line) + "\n")
    return hook


pytest_runtest_setup = _timed("setup")
pytest_runtest_call = _timed("call")
pytest_runtest_teardown = _timed("teardown")
