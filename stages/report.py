"""DVC stage `report`: reports/report.md, the report's tables rebuilt from the pipeline's metrics.

Reads only results/ (metrics, curves, figures) and reports/task1.json, so it re-runs when a
result changes and not otherwise. Run figures are copied to reports/figures/runs/.
"""
import json
import shutil
from pathlib import Path

from cifarcnn import figures
from cifarcnn.errors import UserError, cli
from cifarcnn.fsutil import write_text
from cifarcnn.report import load_curves, load_results, results_markdown

RESULTS, REPORTS = Path("results"), Path("reports")
RUN_FIGURES = REPORTS / "figures" / "runs"


@cli
def main() -> None:
    results = load_results(RESULTS)
    if not results:
        raise UserError(f"no results under {RESULTS}/ (train.json + eval.json); run `dvc repro` first")
    shutil.rmtree(RUN_FIGURES, ignore_errors=True)
    RUN_FIGURES.mkdir(parents=True)
    figs: dict[str, str] = {}
    for run in results:
        for kind in ("curves", "confusion"):
            src = RESULTS / run / f"{kind}.png"
            if src.exists():
                shutil.copyfile(src, RUN_FIGURES / f"{run}_{kind}.png")
                figs[f"{run}_{kind}"] = f"figures/runs/{run}_{kind}.png"
    if {"task3d_dropout", "task3d_no_dropout"} <= set(results):
        with_d, without = ({**load_curves(RESULTS / r), "metrics": results[r]["eval"]}
                           for r in ("task3d_dropout", "task3d_no_dropout"))
        figures.dropout_comparison(with_d, without, RUN_FIGURES / "task3d_dropout.png")
        figs["task3d"] = "figures/runs/task3d_dropout.png"
    viz_path = RESULTS / "visualize.json"
    viz = json.loads(viz_path.read_text()) if viz_path.exists() else None
    for name in ("task4b_first_layer", "task4c_last_layer", "task4b_first_layer_task4a", "task4c_last_layer_task4a"):
        if (REPORTS / "figures" / f"{name}.png").exists():
            key = name.replace("_first_layer", "").replace("_last_layer", "")
            figs[key] = f"figures/{name}.png"
    task1 = json.loads((REPORTS / "task1.json").read_text())
    write_text(REPORTS / "report.md", results_markdown(results, task1, viz, figs))
    print(f"wrote {REPORTS / 'report.md'} ({len(results)} runs)")


if __name__ == "__main__":
    main()
