"""dvc.yaml's code dependencies cannot drift from the code, and dvc.lock matches the commit.

Each stage's deps under stages/ and src/ must be exactly its script plus every project module
the script imports, directly or transitively (read from the source by cifarcnn.codedeps).
A missing one means an edit that changes results re-runs nothing; a superfluous one re-runs
stages for nothing.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import ROOT

from cifarcnn.codedeps import direct_imports, project_modules


def stages() -> dict[str, tuple[str, set[str]]]:
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    out = {}
    for name, stage in spec["stages"].items():
        body = stage.get("do", stage)
        script = re.search(r"python (stages/\w+\.py)", body["cmd"]).group(1)
        out[name] = (script, {d for d in body["deps"] if isinstance(d, str) and d.startswith(("src/", "stages/"))})
    return out


def derived(script: str) -> set[str]:
    return {script} | {f"src/cifarcnn/{p.name}" for p in project_modules(ROOT / script)}


@pytest.mark.parametrize("name", list(stages()))
def test_stage_code_deps_are_exactly_what_its_script_imports(name):
    script, listed = stages()[name]
    expected = derived(script)
    assert not expected - listed, f"{name}: dvc.yaml lacks {sorted(expected - listed)}"
    assert not listed - expected, f"{name}: dvc.yaml lists {sorted(listed - expected)}, which {script} does not import"


def test_every_stage_script_has_a_stage():
    assert {s for s, _ in stages().values()} == {f"stages/{p.name}" for p in (ROOT / "stages").glob("*.py")}


def test_import_reading_follows_every_form(tmp_path):
    """Absolute, from-package, relative and function-level imports are all seen, transitively."""
    assert direct_imports(ROOT / "stages" / "evaluate.py") >= {"cifarcnn.figures", "cifarcnn.evaluation", "cifarcnn.fsutil"}
    train = derived("stages/train.py")
    # The modules the issue found missing: data (loading), fsutil (writing every output).
    assert {"src/cifarcnn/data.py", "src/cifarcnn/fsutil.py", "src/cifarcnn/step.py"} <= train
    assert "src/cifarcnn/report.py" not in train and "src/cifarcnn/visualize.py" not in train
    script = tmp_path / "s.py"
    script.write_text("def f():\n    import cifarcnn.convmath\n")
    assert {p.name for p in project_modules(script)} >= {"convmath.py", "__init__.py"}


def test_committed_lock_matches_the_committed_code(tmp_path):
    """`dvc status` in a clean copy of the tracked files: no stage recorded in dvc.lock has a
    changed dependency or output (refresh it with `dvc repro <stage>` and commit dvc.lock)."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for rel in filter(None, files.split("\0")):
        if (ROOT / rel).is_file():
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, tmp_path / rel)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_"))}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", DVC_NO_ANALYTICS="1")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    locked = yaml.safe_load((tmp_path / "dvc.lock").read_text())["stages"]
    assert locked, "dvc.lock records no stage"
    proc = subprocess.run(["dvc", "status", "--json", *locked], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout or "{}")
    assert status == {}, f"dvc.lock is stale for: {status}"


def test_top_level_plots_cover_every_run():
    """dvc.yaml's top-level plots list the runs by hand (DVC cannot fan them out): they must
    follow params.yaml's runs."""
    from cifarcnn.config import load_params, run_names

    runs = set(run_names(load_params(ROOT / "params.yaml")))
    plots = {k: v for entry in yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"] for k, v in entry.items()}
    assert {f.removeprefix("reports/curves/").removesuffix(".csv") for f in plots["validation_accuracy"]["y"]} == runs
    assert {f.removeprefix("reports/curves/").removesuffix("_train_loss.csv") for f in plots["training_loss"]["y"]} == runs
    assert {k.removeprefix("confusion_") for k in plots if k.startswith("confusion_")} == runs
    assert {f for k, p in plots.items() if k.startswith("confusion_") for f in p["y"]} == {
        f"reports/curves/{r}_predictions.csv" for r in runs}
    assert all(p.get("title") and p.get("x_label") and p.get("y_label") for p in plots.values())
