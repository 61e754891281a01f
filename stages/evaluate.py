"""DVC stage `evaluate@<run>-<seed>`: the best checkpoint on train / validation / test, per class
(and, for runs with augmentation, on augmented train and validation images as the original measured).

Writes results/<run>/seed<seed>/eval.json (the numbers), eval_detail.json (per class, confusion matrix,
ids), predictions.csv (DVC's confusion plot), the training-curves figure (curves.png, the
report's style) and confusion.png, all together or none, and logs the numbers and both
figures into the run's MLflow run (the id from run.json).
Drawing here, not in the train stage, means a change to a plot never re-trains a model.
"""
import json
import sys

from cifarcnn import figures, stageclock
from cifarcnn.config import load_params, run_dirs
from cifarcnn.data import Dataset
from cifarcnn.errors import cli
from cifarcnn.evaluation import EVAL_METRICS, evaluate_checkpoint, predictions_csv
from cifarcnn.fsutil import split_metrics, staged_outputs, write_json, write_text
from cifarcnn.report import load_curves
from cifarcnn.tracking import log_evaluation


@cli
def main(run_name: str, seed: str) -> None:
    params = load_params()
    models, results = run_dirs(run_name, int(seed))
    with stageclock.work():
        metrics = evaluate_checkpoint(models / "best.pt", Dataset.load("data/cifar10.npz"), params["train"]["device"])
    train_info = json.loads((results / "run.json").read_text())
    curves = load_curves(results)
    with staged_outputs(results) as staged:  # the three outputs appear together, or none
        with stageclock.work():
            pngs = [
                figures.training_curves(curves["blocks"], curves["validations"], metrics, train_info.get("title", run_name),
                                        staged / "curves.png"),
                figures.confusion(metrics["test_confusion"], metrics["classes"],
                                  f"{run_name} seed {seed}: test accuracy {metrics['test_acc']:.2%}", staged / "confusion.png"),
            ]
        metrics["mlflow_run_id"] = log_evaluation(params["mlflow"]["experiment"], f"{run_name}-{seed}",
                                                  train_info.get("mlflow_run_id"), metrics, pngs)
        write_text(staged / "predictions.csv", predictions_csv(metrics.pop("test_actual"), metrics.pop("test_predicted"),
                                                              metrics["classes"]))
        numbers, detail = split_metrics(metrics, EVAL_METRICS)
        write_json(staged / "eval.json", numbers)  # numbers only: a DVC metrics file
        write_json(staged / "eval_detail.json", detail)  # per class, confusion matrix, ids
    print(f"{run_name} seed {seed}: train {metrics['train_acc']:.2%}, val {metrics['val_acc']:.2%}, test {metrics['test_acc']:.2%}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python stages/evaluate.py <run name from params.yaml> <seed>")
    main(*sys.argv[1:])
