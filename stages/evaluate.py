"""DVC stage `evaluate@<run>-<seed>`: the best checkpoint on train / validation / test, per class
(and, for runs with augmentation, on augmented train and validation images as the original measured).

Writes results/<run>/seed<seed>/eval/: eval.json (the numbers), eval_detail.json (per class, confusion matrix,
ids), predictions.csv (DVC's confusion plot), the training-curves figure (curves.png, the
report's style) and confusion.png, all together or none. Logs the numbers, both figures and the
usable model (cifarcnn.serving; registered when the run names a registry entry) into the seed's
MLflow run (the id from run.json). Drawing and model logging here, not in the train stage, mean
a change to a plot or to the served model's wrapper never re-trains a model.
"""

from cifarcnn import figures
from cifarcnn.checkpoint import verified_checkpoint
from cifarcnn.config import load_params
from cifarcnn.data import Dataset
from cifarcnn.errors import cli, stage_args, work
from cifarcnn.evaluation import EVAL_METRICS, evaluate_checkpoint, predictions_csv
from cifarcnn.fsutil import read_json, split_metrics, staged_outputs, write_json, write_text
from cifarcnn.runfiles import BEST, load_curves, run_dirs
from cifarcnn.serving import served_model
from cifarcnn.tracking import log_evaluation


@cli
def main(run_name: str, seed: str) -> None:
    params = load_params()
    models, trained, scored = run_dirs(run_name, int(seed))
    train_info = read_json(trained / "run.json")
    best = verified_checkpoint(models / BEST, train_info.get("checkpoint_sha256"), f"train@{run_name}-{seed}")
    ds = Dataset.load("data/cifar10.npz")
    with work():
        metrics = evaluate_checkpoint(best, ds, params["train"]["device"])
    curves = load_curves(trained)
    with staged_outputs(scored) as staged:  # the outputs appear together, or none
        with work():
            pngs = [
                figures.training_curves(curves["blocks"], curves["validations"], metrics, train_info.get("title", run_name),
                                        staged / "curves.png"),
                figures.confusion(metrics["test_confusion"], metrics["classes"],
                                  f"{run_name} seed {seed}: test accuracy {metrics['test_acc']:.2%}", staged / "confusion.png"),
            ]
        model = served_model(run_name, int(seed), best, ds, {**read_json(trained / "train.json"), **train_info},
                          read_json(trained / "config.json"), metrics)
        metrics["mlflow_run_id"] = log_evaluation(params["mlflow"]["experiment"], f"{run_name}-{seed}",
                                                  train_info.get("mlflow_run_id"), metrics, pngs, model)
        write_text(staged / "predictions.csv", predictions_csv(metrics.pop("test_actual"), metrics.pop("test_predicted"),
                                                              metrics["classes"]))
        numbers, detail = split_metrics(metrics, EVAL_METRICS)
        write_json(staged / "eval.json", numbers)  # numbers only: a DVC metrics file
        write_json(staged / "eval_detail.json", detail)  # per class, confusion matrix, ids
    print(f"{run_name} seed {seed}: train {metrics['train_acc']:.2%}, val {metrics['val_acc']:.2%}, test {metrics['test_acc']:.2%}")


if __name__ == "__main__":
    main(*stage_args("python stages/evaluate.py <run name from params.yaml> <seed>", 2, __doc__))
