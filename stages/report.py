"""DVC stage `report`: reports/report.md, the report's tables rebuilt from the pipeline's metrics.

Reads results/ (every seed's metrics, curves and figures; the split) and reports/task1.json,
for the runs configs/run-order.json names (params.yaml's, as the configure stage resolved them)
and the seeds params.yaml names. Writes report.md (mean ± sd over seeds, verdicts, the
report's paired claims tested), the DVC metrics reports/summary/<run>.json and reports/test_acc.json
(each run's mean test accuracy, keyed by run), the run figures under reports/figures/runs/, each run's curves
averaged over seeds under reports/curves/ (the top-level DVC plots), and the seeds' aggregates
onto each run's parent MLflow run.
"""
import shutil
from pathlib import Path

from cifarcnn import figures
from cifarcnn.config import RunConfig, config_digest, configured_runs, load_params, resolve_seeds
from cifarcnn.errors import UserError, cli, stage_args
from cifarcnn.fsutil import csv_text, read_json, write_json, write_text
from cifarcnn.report import aggregates, load_results, logged_run_id, mean_curves, results_markdown, summary
from cifarcnn.runfiles import load_curves, run_dirs
from cifarcnn.tracking import log_aggregates, runs_held

RESULTS, REPORTS = Path("results"), Path("reports")
RUN_FIGURES, CURVES = REPORTS / "figures" / "runs", REPORTS / "curves"


@cli
def main() -> None:
    params = load_params()
    seeds = resolve_seeds(params)
    results = load_results(RESULTS, configured_runs(), seeds)
    if not results:
        raise UserError(f"no results under {RESULTS}/<run>/seed<n>/ (train/train.json + eval/eval.json); run `dvc repro` first")
    for folder in (RUN_FIGURES, CURVES):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    figs: dict[str, str] = {}
    curves = {}
    for run, runs in results.items():
        folders = {r["seed"]: run_dirs(run, r["seed"], RESULTS) for r in runs}
        first = folders[runs[0]["seed"]].scored
        for kind in ("curves", "confusion"):
            if (first / f"{kind}.png").exists():
                shutil.copyfile(first / f"{kind}.png", RUN_FIGURES / f"{run}_{kind}.png")
                figs[f"{run}_{kind}"] = f"figures/runs/{run}_{kind}.png"
        per_seed = {seed: load_curves(dirs.trained) for seed, dirs in folders.items()}
        predictions = [(dirs.scored / "predictions.csv").read_text().splitlines() for dirs in folders.values()]
        write_text(CURVES / f"{run}_predictions.csv",  # DVC's confusion plot: every seed's test predictions
                   "\n".join(predictions[0][:1] + [row for rows in predictions for row in rows[1:]]) + "\n")
        curves[run] = per_seed[runs[0]["seed"]]
        mean = mean_curves(list(per_seed.values()))
        write_text(CURVES / f"{run}.csv", csv_text(mean["validations"], ["step", "epoch", "val_loss", "val_acc",
                                                                         "val_acc_sd", "n"]))
        write_text(CURVES / f"{run}_train_loss.csv", csv_text(mean["train_loss"], ["step", "mean", "mean_sd", "n"]))
        if len(runs) > 1:
            figures.seed_curves(run, {s: c["validations"] for s, c in per_seed.items()}, mean["validations"],
                                RUN_FIGURES / f"{run}_seeds.png")
            figs[f"{run}_seeds"] = f"figures/runs/{run}_seeds.png"
        cfg = RunConfig.from_dict(runs[0]["config"])  # the config the seeds were trained under: their parent's digest
        log_aggregates(params["mlflow"]["experiment"], run, config_digest(cfg.seedless_dict()), cfg.describes,
                       aggregates(runs), [r["train"]["mlflow_parent_run_id"] for r in runs
                                          if r["train"].get("mlflow_parent_run_id")])
    if {"task3d_dropout", "task3d_no_dropout"} <= set(results):
        with_d, without = ({**curves[r], "metrics": results[r][0]["eval"]} for r in ("task3d_dropout", "task3d_no_dropout"))
        figures.dropout_comparison(with_d, without, RUN_FIGURES / "task3d_dropout.png")
        figs["task3d"] = "figures/runs/task3d_dropout.png"
    viz_path, split_path = RESULTS / "visualize.json", RESULTS / "split.json"
    viz = read_json(viz_path) if viz_path.exists() else None
    split = read_json(split_path) if split_path.exists() else None
    for name in ("task4b_first_layer", "task4c_last_layer", "task4b_first_layer_task4a", "task4c_last_layer_task4a",
                 "task4c_last_layer_train_mode"):
        if (REPORTS / "figures" / f"{name}.png").exists():
            key = name.replace("_first_layer", "").replace("_last_layer", "")
            figs[key] = f"figures/{name}.png"
    task1 = read_json(REPORTS / "task1.json")
    held = runs_held(params["mlflow"]["experiment"], [logged_run_id(r) for seeds in results.values() for r in seeds])
    write_text(REPORTS / "report.md", results_markdown(results, task1, viz, figs, split, held))
    means = summary(results)
    for run, numbers in means.items():  # DVC metrics: each run's mean over its seeds, a row each
        write_json(REPORTS / "summary" / f"{run}.json", numbers)
    # One file keyed by run: `dvc exp show` names a column by its key alone when no other metrics
    # file has that key, so `--keep '^task'` shows every run's mean test accuracy in a few columns.
    write_json(REPORTS / "test_acc.json", {run: numbers["test_acc"] for run, numbers in means.items()})
    print(f"wrote {REPORTS / 'report.md'} ({len(results)} runs, seeds {', '.join(map(str, seeds))})")


if __name__ == "__main__":
    main(*stage_args("python stages/report.py", 0, __doc__))
