"""DVC stage `visualize`: Task 4b (conv1 filters + activations) and 4c (layer4 activations).

Once on the ImageNet ResNet18 (as the report) and once on the fine-tuned task4a model of the
first seed in train.seeds (dvc.yaml passes it: `python stages/visualize.py <seed>`).
"""
from pathlib import Path

import torch

from cifarcnn import figures
from cifarcnn.checkpoint import load_best_model, verified_checkpoint
from cifarcnn.config import load_params, pretrained_choice, resolve_resnet_weights, resolve_viz
from cifarcnn.errors import cli, stage_args
from cifarcnn.fsutil import read_json, write_json
from cifarcnn.models import create_model
from cifarcnn.runfiles import BEST, run_dirs
from cifarcnn.visualize import visualize

FIGURES = Path("reports/figures")
PHOTO = Path("data/viz_image")  # written by the download stage (a dep in dvc.yaml)


@cli
def main(seed: str) -> None:
    params = load_params()
    task4a_models, task4a_trained, _ = run_dirs("task4a", int(seed))
    task4a = task4a_models / BEST
    viz, weights = resolve_viz(params), resolve_resnet_weights(params)
    models = {"": (create_model("resnet18_transfer", pretrained=pretrained_choice(weights)), f"ResNet18, {weights} weights")}
    if task4a.exists():  # drawn only if it is the file its train stage wrote
        verified_checkpoint(task4a, read_json(task4a_trained / "run.json").get("checkpoint_sha256"), f"train@task4a-{seed}")
        models["_task4a"] = (load_best_model(task4a)[0], f"ResNet18 fine-tuned on CIFAR-10 (task4a, seed {seed})")
    summary = {"resnet_weights": weights, "filter_indices": viz.filter_indices,
               "activation_indices": viz.activation_indices}
    first_filters = {}
    for suffix, (model, label) in models.items():
        out = visualize(model, PHOTO, viz.filter_indices, viz.activation_indices)
        figures.first_layer_figure(out["filters"], out["first_activations"], out["filter_indices"],
                                   FIGURES / f"task4b_first_layer{suffix}.png", f"{label}: conv1 filters and activations")
        figures.last_layer_figure(out["last_activations"], out["activation_indices"],
                                  FIGURES / f"task4c_last_layer{suffix}.png",
                                  f"{label}: layer4 activations ({'x'.join(map(str, out['last_shape']))})")
        if not suffix:  # Figure 10 as the original computed it: the model left in train mode
            figures.last_layer_figure(out["last_activations_train_mode"], out["activation_indices"],
                                      FIGURES / "task4c_last_layer_train_mode.png",
                                      f"{label}, train mode as in the report's Figure 10 (BatchNorm on this photo's "
                                      f"own statistics): layer4 activations")
        first_filters[suffix] = model.conv1.weight.detach()
        summary[f"layer4_shape{suffix}"] = out["last_shape"]
    if "_task4a" in first_filters and weights != "none":  # conv1 is frozen in task4a: it must not have moved
        summary["conv1_unchanged_by_finetuning"] = bool(torch.equal(first_filters[""], first_filters["_task4a"]))
    write_json(Path("results/visualize.json"), summary)
    print(f"wrote {', '.join(str(FIGURES / f'task4{t}{s}.png') for s in models for t in ('b_first_layer', 'c_last_layer'))}")


if __name__ == "__main__":
    main(*stage_args("python stages/visualize.py <seed of the task4a model shown>", 1, __doc__))
