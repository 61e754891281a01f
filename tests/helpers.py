"""Shrinking the real params.yaml for tests: same runs, tiny data, one epoch."""
from __future__ import annotations

import copy
from pathlib import Path

import yaml
from fixtures import CLASSES, fake_images

from cifarcnn.config import RunConfig, load_params, resolve_run
from cifarcnn.data import Dataset
from cifarcnn.runfiles import run_dirs

ROOT = Path(__file__).resolve().parents[1]


def sh(args: list[str], cwd: Path, env: dict, timeout: int = 1200, ok: bool = True) -> str:
    """Run a command the way a user would; its output, after asserting it succeeded (``ok``) or failed."""
    import subprocess

    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    if ok:
        assert proc.returncode == 0, f"{' '.join(args)} failed ({proc.returncode}):\n{output[-6000:]}"
    else:
        assert proc.returncode != 0, f"{' '.join(args)} should have failed:\n{output[-3000:]}"
    return output


def merged(folder: Path, metrics_file: str, beside: str) -> dict:
    """A stage's metrics file (numbers only) with the non-numbers written beside it."""
    import json

    numbers = json.loads((folder / metrics_file).read_text())
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers.values()), numbers
    return {**numbers, **json.loads((folder / beside).read_text())}


def train_dir(repo: Path, run: str, seed: int = 0) -> Path:
    """<repo>/results/<run>/seed<seed>/train/: what train@<run>-<seed> wrote."""
    return run_dirs(run, seed, Path(repo) / "results").trained


def eval_dir(repo: Path, run: str, seed: int = 0) -> Path:
    """<repo>/results/<run>/seed<seed>/eval/: what evaluate@<run>-<seed> wrote."""
    return run_dirs(run, seed, Path(repo) / "results").scored


def real_params() -> dict:
    return load_params(ROOT / "params.yaml")


def tiny_params(**train_overrides) -> dict:
    params = copy.deepcopy(real_params())
    params["resnet_weights"] = "none"
    params["train"].update({"max_epochs": 1, "device": "cpu", **train_overrides})
    return params


def tiny_run(name: str, **changes) -> RunConfig:
    return resolve_run(tiny_params(), name).replace(**changes)


def tiny_dataset(n_train: int = 300, n_test: int = 60, seed: int = 0) -> Dataset:
    x, y = fake_images(n_train, seed)
    tx, ty = fake_images(n_test, seed + 1)
    return Dataset(x, y, tx, ty, list(CLASSES))


def write_params(path: Path, params: dict) -> None:
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def training_runs(client, experiment: str) -> list:
    """The experiment's runs that trained or evaluated something: not the parents that only
    group a run's seeds (tag seeds_parent)."""
    exp = client.get_experiment_by_name(experiment)
    return [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("seeds_parent") != "true"]


ALWAYS_RUN = {"source"}  # dvc.yaml's always_changed stage: it looks at data.source's files


def proc_state(pid: int) -> str:
    """A process's state letter from /proc (``Z``: a zombie, it has ended), or "gone"."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"


def up_to_date(status: str) -> bool:
    """`dvc status` reports nothing stale but the always-run `source` stage."""
    import re

    stale = set(re.findall(r"^(\S[^:\n]*):\s*$", status, re.M))
    return "up to date" in status or (stale <= ALWAYS_RUN and "changed" not in status.replace("always changed", ""))


def ran_stages(output: str) -> list[str]:
    """The stages a `dvc repro` / `dvc exp run` output says it ran, in order."""
    import re

    return re.findall(r"Running stage '([^']+)'", output)


def start_queue(repo: Path, env: dict, jobs: int = 1) -> None:
    """`dvc queue start -j JOBS`: its workers outlive it, so its output must not be a pipe we wait on."""
    import subprocess

    subprocess.run(["dvc", "queue", "start", "-j", str(jobs)], cwd=repo, env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=True, timeout=120)


def queue_status(repo: Path, env: dict) -> str:
    """`dvc queue status`, asked again when DVC trips over a worker's half-written info file
    (`ERROR: unexpected error - Expecting value: line 1 column 1`), a race inside DVC's queue."""
    import subprocess
    import time

    for _ in range(5):
        proc = subprocess.run(["dvc", "queue", "status"], cwd=repo, env=env, capture_output=True, text=True)
        if proc.returncode == 0:
            return proc.stdout + proc.stderr
        assert "Expecting value" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
        time.sleep(1)
    raise AssertionError(f"dvc queue status failed 5 times: {proc.stdout + proc.stderr}")


def queue_states(status: str) -> dict[str, str]:
    """`dvc queue status`'s table as {experiment name: Queued|Running|Success|Failed|...}."""
    rows = {}
    for line in status.splitlines()[1:]:
        cells = line.split()
        if len(cells) >= 4 and cells[-1].isalpha() and not line.startswith("Worker"):
            rows[cells[1]] = cells[-1]
    return rows


def wait_for_queue(repo: Path, env: dict, names: list[str], timeout_s: float = 900) -> dict[str, str]:
    """Wait until every named queued experiment has ended; {name: Success|Failed}. Only the named
    tasks count: the queue also lists tasks of earlier tests, and its worker count can read
    `0 active` while a task still runs."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        status = queue_status(repo, env)
        states = queue_states(status)
        mine = {name: states.get(name, "missing") for name in names}
        if all(state in ("Success", "Failed") for state in mine.values()):
            return mine
        assert time.monotonic() < deadline, f"{mine} after {timeout_s:.0f} s:\n{status}"
        time.sleep(2)
