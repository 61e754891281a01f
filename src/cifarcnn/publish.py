"""Publish existing results to an MLflow store without training: for a team moving to a server.

    MLFLOW_TRACKING_URI=http://mlflow.example:5000 python -m cifarcnn.publish

An up-to-date checkout (after `dvc pull`) holds every trained seed's results and checkpoint,
but its MLflow runs live in the store that was current when it trained (the local mlflow.db, or
another server). This logs each seed of params.yaml's runs into the *current* store
(``MLFLOW_TRACKING_URI``, else the local mlflow.db) as the pipeline would have: the parent run
of its config, a seed run with the resolved params, the data, the validation curves (and the
training loss as the 50-step block means that train_loss.csv keeps; the per-step values are
only in the store that trained), the scores of eval.json, both figures and the served model
(registered and ranked as the evaluate stage does), then the seeds' aggregates on the parents.

Nothing is trained and no file of the checkout changes: results/<run>/seed<n>/train/run.json keeps
naming the run that trained it. A published run carries ``published_from`` = that id, so a
second publish to the same store logs nothing again; a seed whose training run the store
already holds is skipped too. Checkpoints are checked against run.json's sha256 first.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from mlflow.entities import Metric

from .checkpoint import verified_checkpoint
from .config import RunConfig, config_digest, load_params, resolve_seeds, run_names
from .data import Dataset
from .errors import UserError, cli, stopped_from_outside
from .report import aggregates, load_results
from .runfiles import BEST, load_curves, run_dirs
from .serving import served_model
from .tracking import (CURVES, PARENT_TAG, MlflowRun, close_parent, connect, log_aggregates, log_evaluation,
                       parent_run, run_tags, runs_held, tracking_uri)
from .training import data_fingerprint

PUBLISHED_TAG = "published_from"  # the MLflow run id (in the store that trained it) a published run copies


def _published(client, exp_id: str, source_ids: list[str]) -> set[str]:
    """Which of ``source_ids`` this store already holds a published copy of."""
    found = set()
    for source_id in source_ids:
        runs = client.search_runs([exp_id], filter_string=f"tags.{PUBLISHED_TAG} = '{source_id}'", max_results=1)
        if runs:
            found.add(source_id)
    return found


def publish_seed(experiment: str, run_name: str, seed: dict, ds: Dataset, data_source: str | None) -> str:
    """One trained seed (an entry of report.load_results) into the current store; its new run id."""
    n = seed["seed"]
    models, trained, scored = run_dirs(run_name, n)
    info = seed["train"]
    cfg = RunConfig.from_dict(seed["config"])
    best = verified_checkpoint(models / BEST, info.get("checkpoint_sha256"), f"train@{run_name}-{n}")
    parent = parent_run(experiment, run_name, config_digest(cfg.seedless_dict()), cfg.describes,
                        {k: v for k, v in cfg.flat_params().items() if k != "train.seed"})
    description = f"{cfg.describes}, seed {n}" if cfg.describes else f"{run_name}, seed {n}"
    run = MlflowRun.start(experiment, f"{run_name}-{n}",
                          {**run_tags(run_name, str(info.get("device", "")), "stages/train.py", description),
                           "seed": str(n), PARENT_TAG: parent, PUBLISHED_TAG: str(info.get("mlflow_run_id", ""))})
    try:
        dataset = (str(data_source), data_fingerprint(ds), {"subset": str(info.get("data_subset")),
                                                             "train_images": str(info.get("n_train")),
                                                             "val_images": str(info.get("n_val")),
                                                             "test_images": str(info.get("n_test"))})
        run.log_dataset(*dataset)
        MlflowRun(run.client, parent).log_dataset(*dataset)
        run.log_params(cfg.flat_params())
        curves = load_curves(trained)
        now = int(time.time() * 1000)
        blocks = curves["blocks"]
        run.log_metrics([Metric(CURVES + "train_loss", float(m), now, int(s)) for s, m in zip(blocks["step"], blocks["mean"])])
        for row in curves["validations"]:
            run.log_validation(int(row["step"]), float(row["epoch"]), float(row["val_loss"]), float(row["val_acc"]))
        run.flush()
        metrics = {**seed["eval"], "device": info.get("device", "")}
        pngs = [p for p in (scored / "curves.png", scored / "confusion.png") if p.exists()]
        model = served_model(run_name, n, best, ds, info, seed["config"], metrics)
        log_evaluation(experiment, f"{run_name}-{n}", run.run_id, metrics, pngs, model)
        run.finish()
    except BaseException as err:
        run.abandon()
        run.finish("KILLED" if stopped_from_outside(err) else "FAILED")
        raise
    close_parent(experiment, parent)
    return run.run_id


def publish(params: dict, results_dir: Path = Path("results")) -> dict[str, list[str]]:
    """Every seed of params.yaml's runs with results, into the current store: {run: new run ids}.
    Seeds the store already holds (their training run, or a published copy) are skipped."""
    experiment = params["mlflow"]["experiment"]
    results = load_results(results_dir, run_names(params), resolve_seeds(params))
    if not results:
        raise UserError(f"no results under {results_dir}/<run>/seed<n>/ to publish; run `dvc pull` (or `dvc repro`) first")
    client, exp_id = connect(experiment)
    ds = Dataset.load("data/cifar10.npz")
    data_source = (params.get("data") or {}).get("source")
    published: dict[str, list[str]] = {}
    for run_name, seeds in results.items():
        sources = [s["train"].get("mlflow_run_id", "") for s in seeds]
        skip = set(runs_held(experiment, [s for s in sources if s])) | _published(client, exp_id, [s for s in sources if s])
        for seed, source in zip(seeds, sources):
            if source and source in skip:
                print(f"{run_name} seed {seed['seed']}: already in {tracking_uri()} (run {source} or its copy)")
                continue
            new = publish_seed(experiment, run_name, seed, ds, data_source)
            published.setdefault(run_name, []).append(new)
            print(f"{run_name} seed {seed['seed']}: published as run {new}", flush=True)
        if run_name in published:
            cfg = RunConfig.from_dict(seeds[0]["config"])
            log_aggregates(experiment, run_name, config_digest(cfg.seedless_dict()), cfg.describes, aggregates(seeds), [])
    return published


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cifarcnn.publish", description=__doc__.split("\n\n")[0])
    parser.parse_args(argv)

    @cli
    def run() -> None:
        published = publish(load_params())
        total = sum(len(v) for v in published.values())
        print(f"published {total} seed run(s) of {len(published)} run(s) to {tracking_uri()}")
    run()


if __name__ == "__main__":
    main()
