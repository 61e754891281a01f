"""A sweep of DVC experiments scheduled by Ray: one trial per point of a grid, one GPU each.

    python -m cifarcnn.sweep -S lr=0.0004,0.0006,0.0008 [-S key=v1,v2 ...] [--seeds 0,1,2]
                             [--run task3e] [--address HOST:PORT]

The grid is the cross product of the ``-S`` values and the seeds. Each point is one DVC
experiment (``dvc exp run -S ...``), named after its values, trained and evaluated for one seed
of ``--run`` (the run those params change: task3e for ``lr``), as a Ray task that asks for one
GPU where the cluster has GPUs, else for one CPU.

Each trial works in its own clone of the repository at the sweep's commit, runs the experiment
there with its MLflow runs nested under the sweep's parent run, and pushes the experiment back:

- **embedded** (no ``--address``, the default): a local Ray instance (one trial per GPU at a time).
  The trials clone a git bundle of HEAD, share this checkout's DVC cache and log to this
  checkout's MLflow store; the experiments are pushed into this repository, so ``dvc exp show``
  lists them.
- **a cluster** (``--address``, from ``ray start --head``): the trials clone the git remote
  ``origin`` (the sweep's commit must be pushed), pull their inputs from the DVC remote
  (``dvc exp run --pull``), log to the driver's ``MLFLOW_TRACKING_URI`` and push the experiment
  with its outputs (``dvc exp push origin``); the driver then pulls them (``dvc exp pull``).
  Credentials (MLflow user and password, S3 keys) come from each node's environment, never from
  task arguments; so does ``CIFARCNN_TRIAL_DIR``, the node's folder for its trials' clones.

A trial whose node dies is retried elsewhere (Ray's task retries) under the same name; a lost
attempt's MLflow runs are marked KILLED at the end. A failing point is one line and does not stop
the others. Ctrl-C cancels the trials and marks every run of the sweep KILLED.
"""
from __future__ import annotations

import argparse
import ctypes
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ray
from mlflow.entities import RunStatus
from tabulate import tabulate
from tqdm import tqdm

from .config import load_params, run_names
from .errors import UserError, cli
from .evaluation import EVAL_METRICS
from .runfiles import run_dirs
from .tracking import PARENT_TAG, connect, end_parent, entry_run, repo_root, run_user, tracking_uri

TRIAL_RETRIES = 2  # a trial whose node (or worker) dies is run again elsewhere this often
SWEEP_TAG = "sweep"  # tag of the sweep's parent run (its id); trials' runs carry DVC's dvc_exp_name
TRIAL_DIR_ENV = "CIFARCNN_TRIAL_DIR"  # where a node clones its trials (its own disk); default: the temp folder
NAME_ALLOWED = re.compile(r"[^A-Za-z0-9_.-]")


# --- the grid -----------------------------------------------------------------------------

def parse_grid(settings: list[str]) -> dict[str, list[str]]:
    """``["lr=0.1,0.2", "train.batch_size=32"]`` -> ``{"lr": ["0.1", "0.2"], ...}``; the values
    stay text, as ``dvc exp run -S`` takes them."""
    grid: dict[str, list[str]] = {}
    for setting in settings:
        key, sep, values = setting.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise UserError(f"-S {setting!r}: expected KEY=V1,V2,... (e.g. -S lr=0.0004,0.0006)")
        if key in grid:
            raise UserError(f"-S {key} given twice: put all its values in one -S {key}=V1,V2")
        parts = [v.strip() for v in values.split(",")]
        if "" in parts or len(set(parts)) != len(parts):
            raise UserError(f"-S {setting!r}: each value once, none empty")
        grid[key] = parts
    if not grid:
        raise UserError("nothing to sweep: give at least one -S KEY=V1,V2,...")
    return grid


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise UserError(f"--seeds {text!r}: expected integers separated by commas (e.g. --seeds 0,1,2)") from None
    if len(set(seeds)) != len(seeds) or any(not 0 <= s < 2**32 for s in seeds):
        raise UserError(f"--seeds {text!r}: each seed once, in [0, 2**32)")
    return seeds


def points(grid: dict[str, list[str]], seeds: list[int]) -> list[dict]:
    """Every combination of the grid's values with every seed: {"name", "params", "seed"}; the
    name (a git ref, so DVC can push it) holds the values, e.g. ``lr0.0004-seed1``."""
    keys = list(grid)
    out = []
    for values in itertools.product(*(grid[k] for k in keys)):
        params = dict(zip(keys, values))
        for seed in seeds:
            label = "-".join(f"{k.rsplit('.', 1)[-1]}{v}" for k, v in params.items())
            name = NAME_ALLOWED.sub("_", f"{label}-seed{seed}").strip(".")
            out.append({"name": name, "params": params, "seed": seed})
    names = [p["name"] for p in out]
    if len(set(names)) != len(names):
        raise UserError(f"two points would share an experiment name ({names}); use values that differ after "
                        "replacing characters other than letters, digits, '_', '.' and '-'")
    return out


# --- one trial, on whichever node Ray chose -----------------------------------------------

def _die_with_parent() -> None:
    """In the child: SIGTERM when the Ray worker that started it dies (a cancelled or lost trial),
    so DVC stops and the stage marks its run KILLED instead of training on as an orphan."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _last_error(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.lower().startswith("error")]
    return (errors[0] if errors else lines[-1] if lines else "no output")[:300]


def run_trial(point: dict, source: dict) -> dict:
    """Clone ``source`` at the sweep's commit, run the point's experiment, push it back.
    Returns the point with its metrics (``eval``), or with ``error``: one line."""
    # A node's scratch folder for its trials' clones: CIFARCNN_TRIAL_DIR in that node's
    # environment (as `ray start` was run), else the system's temporary folder.
    work = Path(tempfile.mkdtemp(prefix=f"cifarcnn-trial-{point['name']}-", dir=os.environ.get(TRIAL_DIR_ENV) or None))
    repo = work / "repo"
    env = {**os.environ, "MLFLOW_TRACKING_URI": source["tracking_uri"], "MLFLOW_RUN_ID": source["sweep_run"]}
    env.pop("DVC_ROOT", None)

    def sh(*args: str, cwd: Path = repo) -> str:
        proc = subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True,
                              preexec_fn=_die_with_parent)
        if proc.returncode != 0:
            raise RuntimeError(f"`{' '.join(args[:4])}` failed: {_last_error(proc.stdout + proc.stderr)}")
        return proc.stdout

    target = f"evaluate@{source['run']}-{point['seed']}"
    try:
        sh("git", "clone", "-q", source["git"], str(repo), cwd=work)
        sh("git", "checkout", "-q", source["commit"])
        if source.get("cache"):  # embedded: this machine's DVC cache holds every input already
            sh("dvc", "cache", "dir", "--local", source["cache"])
        args = [f"-S{k}={v}" for k, v in point["params"].items()] + [f"-Strain.seeds=[{point['seed']}]"]
        sh("dvc", "exp", "run", "--name", point["name"], *args, *([] if source.get("cache") else ["--pull"]), target)
        sh("dvc", "exp", "push", "-f", *(["--no-cache"] if source.get("cache") else []), source["push_to"], point["name"])
        scores = json.loads((repo / run_dirs(source["run"], point["seed"]).scored / "eval.json").read_text())
        return {**point, "eval": {k: scores[k] for k in EVAL_METRICS if k in scores}, "node": ray.util.get_node_ip_address()}
    except Exception as err:  # noqa: BLE001 - a failing point is one line; the others go on
        return {**point, "error": str(err).splitlines()[0][:400]}
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --- the driver ----------------------------------------------------------------------------

def _git(*args: str) -> str:
    proc = subprocess.run(["git", *args], capture_output=True, text=True, cwd=repo_root())
    if proc.returncode != 0:
        raise UserError(f"git {' '.join(args)} failed: {_last_error(proc.stderr)}")
    return proc.stdout.strip()


def _source(root: Path, run: str, address: str | None, bundle_dir: Path) -> dict:
    """Where trials take the code, the inputs and the store from, and where they push to."""
    if _git("status", "--porcelain", "--untracked-files=no"):
        raise UserError("the working tree has uncommitted changes: the trials clone the sweep's commit, so commit "
                        "(or stash) them first")
    commit = _git("rev-parse", "HEAD")
    source = {"commit": commit, "run": run, "tracking_uri": tracking_uri()}
    if address is None:
        bundle = bundle_dir / "sweep.bundle"
        _git("bundle", "create", "-q", str(bundle), "HEAD")
        cache = subprocess.run(["dvc", "cache", "dir"], capture_output=True, text=True, cwd=root).stdout.strip()
        return {**source, "git": str(bundle), "cache": cache or str(root / ".dvc" / "cache"), "push_to": str(root)}
    try:
        origin = _git("remote", "get-url", "origin")
    except UserError:
        raise UserError("--address: the trials clone the git remote `origin`, and this repository has none; "
                        "`git remote add origin URL` and push") from None
    if not _git("branch", "-r", "--contains", commit):
        raise UserError(f"--address: commit {commit[:8]} is not on `origin`; `git push` it first (the trials clone it)")
    return {**source, "git": origin, "cache": None, "push_to": "origin"}


def _kill_left_runs(client, exp_id: str, names: list[str], since_ms: int, why: str) -> int:
    """Mark the sweep's runs still RUNNING (a lost or cancelled attempt's: DVC tags each run with
    its experiment's name) KILLED, and end their parents still RUNNING; how many runs it killed."""
    killed, parents = 0, set()
    for name in names:
        for run in client.search_runs([exp_id], filter_string=f"tags.dvc_exp_name = '{name}' and "
                                      f"attributes.start_time >= {since_ms}"):
            parents.add(run.data.tags.get(PARENT_TAG))
            if run.info.status == "RUNNING":
                client.set_tag(run.info.run_id, "killed_by", why)
                client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.KILLED))
                killed += 1
    # Of every seed's, not only those killed here: a stage stopped by the cancel may have ended its
    # own run and been killed before it ended its parent (Ray kills a cancelled worker's processes).
    for parent in parents - {None}:
        if client.get_run(parent).info.status == "RUNNING":
            end_parent(client, exp_id, parent)
    return killed


def _table(results: list[dict], grid: dict) -> tuple[str, dict | None]:
    """point -> val/test accuracy per seed and mean; the best point by mean validation accuracy."""
    rows, by_point = [], {}
    for r in results:
        key = json.dumps(r["params"], sort_keys=True)
        by_point.setdefault(key, []).append(r)
    best = None
    for key, trials in by_point.items():
        done = [t for t in trials if "eval" in t]
        seeds = ", ".join(f"{t['seed']}: {t['eval']['val_acc']:.4f}/{t['eval']['test_acc']:.4f}" if "eval" in t
                          else f"{t['seed']}: failed" for t in sorted(trials, key=lambda t: t["seed"]))
        mean_val = sum(t["eval"]["val_acc"] for t in done) / len(done) if done else None
        mean_test = sum(t["eval"]["test_acc"] for t in done) / len(done) if done else None
        params = json.loads(key)
        rows.append([*(params[k] for k in grid), seeds, f"{mean_val:.4f}" if done else "-",
                     f"{mean_test:.4f}" if done else "-", len(done)])
        if done and (best is None or mean_val > best["val_acc"]):
            best = {"params": params, "val_acc": mean_val, "test_acc": mean_test, "n": len(done)}
    table = tabulate(rows, headers=[*grid, "seed: val/test acc", "mean val acc", "mean test acc", "n"])
    return table, best


def sweep(grid: dict[str, list[str]], seeds: list[int], run: str, address: str | None,
          progress: bool = True) -> dict:
    """Run every point as a Ray task; returns {"sweep_run", "results", "best", "table", "seconds"}."""
    if address is not None and not tracking_uri().startswith(("http://", "https://")):
        raise UserError(f"--address: trials on other nodes log to MLFLOW_TRACKING_URI, and this checkout logs to "
                        f"{tracking_uri()}, which they cannot reach; point MLFLOW_TRACKING_URI at a server every "
                        "node reaches (e.g. the team stack's: `eval \"$(python -m cifarcnn.teamstack env)\"`)")
    root = repo_root()
    params = load_params(root / "params.yaml")
    if run not in run_names(params):
        raise UserError(f"--run {run!r} is not a run of params.yaml ({', '.join(run_names(params))})")
    todo = points(grid, seeds)
    experiment = params["mlflow"]["experiment"]
    client, exp_id = connect(experiment)  # made here (not in a trial's clone), with this checkout's artifact place
    with tempfile.TemporaryDirectory(prefix="cifarcnn-sweep-") as tmp:
        source = _source(root, run, address, Path(tmp))  # refuses a dirty tree before any run is made
        since_ms = int(time.time() * 1000)
        sweep_id = time.strftime("%Y%m%d-%H%M%S")
        parent = client.create_run(exp_id, run_name=f"sweep-{sweep_id}", tags={
            "mlflow.user": run_user(), "mlflow.source.name": "python -m cifarcnn.sweep",
            "mlflow.source.git.commit": source["commit"], SWEEP_TAG: sweep_id,
            "sweep_grid": json.dumps(grid), "sweep_seeds": json.dumps(seeds), "sweep_run": run,
            **({"mlflow.parentRunId": entry} if (entry := entry_run(client, exp_id)) else {})})  # `mlflow run -e sweep`
        sweep_run = source["sweep_run"] = parent.info.run_id
        for key, values in grid.items():
            client.log_param(sweep_run, f"sweep.{key}", ",".join(values))
        started = time.monotonic()
        status, pending, results = "FAILED", {}, []
        try:
            # Embedded: "local" starts Ray here, always. Left as None, Ray would join a cluster that `ray start`
            # left on this machine (or RAY_ADDRESS), and fail on one that was killed without `ray stop`.
            ray.init(address=address or "local", include_dashboard=False, log_to_driver=False, configure_logging=False)
            gpus = ray.cluster_resources().get("GPU", 0)
            task = ray.remote(run_trial).options(num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1,
                                                 max_retries=TRIAL_RETRIES)
            pending = {task.remote(p, source): p for p in todo}
            with tqdm(total=len(todo), desc="sweep trials", unit="trial", disable=not progress) as bar:
                while pending:
                    ready, _ = ray.wait(list(pending), num_returns=1)
                    for ref in ready:
                        point = pending.pop(ref)
                        try:
                            result = ray.get(ref)
                        except Exception as err:  # noqa: BLE001 - retries spent (its node kept dying)
                            result = {**point, "error": f"lost after {TRIAL_RETRIES} retries: {str(err).splitlines()[0][:200]}"}
                        if "error" in result:
                            tqdm.write(f"sweep: {result['name']} failed: {result['error']}", file=sys.stderr)
                        results.append(result)
                        bar.update(1)
            status = "FINISHED" if all("eval" in r for r in results) else "FAILED"
        except KeyboardInterrupt:
            for ref in pending:
                ray.cancel(ref, force=True)
            status = "KILLED"
            raise
        finally:
            if ray.is_initialized():
                ray.shutdown()
            killed = _kill_left_runs(client, exp_id, [p["name"] for p in todo], since_ms,
                                     "sweep driver: the trial's attempt was lost or cancelled")
            if killed:
                print(f"sweep: marked {killed} MLflow run(s) of lost or cancelled attempts KILLED", file=sys.stderr)
            client.set_terminated(sweep_run, status)
    seconds = time.monotonic() - started
    if address is not None:  # the experiments are on origin: bring them here, so `dvc exp show` lists them
        done = [r["name"] for r in results if "eval" in r]
        pulled = subprocess.run(["dvc", "exp", "pull", "-f", "origin", *done], capture_output=True, text=True,
                                cwd=root) if done else None
        if pulled is not None and pulled.returncode != 0:
            print(f"sweep: the experiments are on origin, but `dvc exp pull origin` failed here: "
                  f"{_last_error(pulled.stdout + pulled.stderr)}", file=sys.stderr)
    table, best = _table(results, grid)
    for r in results:
        if "eval" in r:
            client.log_metric(sweep_run, f"sweep/{r['name']}/val_acc", r["eval"]["val_acc"])
    if best:
        for key, value in best["params"].items():
            client.set_tag(sweep_run, f"best.{key}", value)
        client.log_metric(sweep_run, "sweep/best_val_acc", best["val_acc"])
    client.log_metric(sweep_run, "sweep/seconds", seconds)
    return {"sweep_run": sweep_run, "results": results, "best": best, "table": table, "seconds": seconds}


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cifarcnn.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("-S", dest="settings", action="append", default=[], metavar="KEY=V1,V2",
                        help="a params.yaml key and its values (dvc exp run -S syntax); the grid is their product")
    parser.add_argument("--seeds", default="0", help="seeds of every point, e.g. 0,1,2 (default: 0)")
    parser.add_argument("--run", default="task3e", help="the run of params.yaml to train (default: task3e, the "
                        "final model, whose lr is the top-level lr)")
    parser.add_argument("--address", help="a running Ray cluster (HOST:PORT of `ray start --head`); default: a "
                        "local Ray instance on this machine")
    args = parser.parse_args(argv)
    out = sweep(parse_grid(args.settings), parse_seeds(args.seeds), args.run, args.address)
    print(out["table"])
    failed = [r for r in out["results"] if "error" in r]
    if out["best"]:
        best = ", ".join(f"{k}={v}" for k, v in out["best"]["params"].items())
        print(f"best: {best} (mean val acc {out['best']['val_acc']:.4f}, test acc {out['best']['test_acc']:.4f}, "
              f"n={out['best']['n']}); {len(out['results']) - len(failed)} of {len(out['results'])} trials in "
              f"{out['seconds']:.0f} s; MLflow sweep run {out['sweep_run']}; `dvc exp show` lists them")
    if failed:
        raise UserError(f"{len(failed)} of {len(out['results'])} trials failed: "
                        + "; ".join(f"{r['name']}: {r['error']}" for r in failed[:3]))


if __name__ == "__main__":
    main()
