"""dvc.yaml's code dependencies cannot drift from the code, cache boundaries follow meaning, and
dvc.lock matches the commit.

Each stage depends on codedeps/<stage>.json, which the `code` stage writes: its script plus every
project module the script runs, directly or transitively (read from the source by
cifarcnn.codedeps), with their digests. A missing module means an edit that changes results
re-runs nothing; a superfluous one re-runs stages for nothing.
"""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import ROOT

from cifarcnn import cachemap
from cifarcnn.config import load_params, run_names
from cifarcnn.codedeps import CODE_STAGE, PACKAGE, direct_imports, hashed_scripts, project_modules

STAGES = cachemap.stage_scripts(ROOT / "dvc.yaml")


@pytest.mark.parametrize("name", list(STAGES))
def test_each_stage_depends_on_its_own_code_file_and_no_module(name):
    script, listed = STAGES[name]
    if name == CODE_STAGE:
        outs = [next(iter(o)) if isinstance(o, dict) else o
                for o in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][name]["outs"]]
        assert listed == ["stages", "src/cifarcnn"], listed
        assert outs == [f"codedeps/{p.stem}.json" for p in hashed_scripts(ROOT)], outs
    else:
        assert script == f"stages/{name}.py" and listed == [f"codedeps/{name}.json"], (script, listed)


def _run_code_stage(repo: Path) -> dict[str, dict]:
    proc = subprocess.run([sys.executable, "stages/code.py"], cwd=repo, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return {p.stem: json.loads(p.read_text()) for p in sorted((repo / "codedeps").glob("*.json"))}


def test_code_stage_hashes_what_each_script_runs_and_an_edit_changes_only_its_stages(tmp_path):
    """`python stages/code.py` in a copy: each codedeps/<stage>.json names exactly the script and
    the modules it runs, and an edit to a module changes the files of the stages that run it only
    (so DVC re-runs those). It hashes the copy's files, not the installed package's."""
    shutil.copytree(ROOT / "stages", tmp_path / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "src" / PACKAGE, tmp_path / "src" / PACKAGE, ignore=shutil.ignore_patterns("__pycache__"))
    before = _run_code_stage(tmp_path)
    assert set(before) == {p.stem for p in hashed_scripts(ROOT)}
    for stage, files in before.items():
        assert list(files) == cachemap.code_deps(f"stages/{stage}.py"), stage
    assert before == {s: json.loads((ROOT / "codedeps" / f"{s}.json").read_text()) for s in before}, \
        "codedeps/ is stale: run `dvc repro code` and commit it"
    for module, stages in (("stats.py", {"calculations", "report"}), ("serving.py", {"evaluate"}),
                           ("served_model.py", {"evaluate"}), ("step.py", {"train"}), ("teamstack.py", set())):
        path = tmp_path / "src" / PACKAGE / module
        original = path.read_text()
        path.write_text(original + "\n# an edit\n")
        after = _run_code_stage(tmp_path)
        assert {s for s in after if after[s] != before[s]} == stages, module
        path.write_text(original)
    assert _run_code_stage(tmp_path) == before


def test_every_stage_script_has_a_stage():
    assert {s for s, _ in STAGES.values()} == {f"stages/{p.name}" for p in (ROOT / "stages").glob("*.py")}
    assert {f"stages/{p.name}" for p in hashed_scripts(ROOT)} == {s for n, (s, _) in STAGES.items() if n != CODE_STAGE}


def test_import_reading_follows_every_form(tmp_path):
    """Absolute, from-package, relative and function-level imports are all seen, transitively."""
    assert direct_imports(ROOT / "stages" / "evaluate.py") >= {"cifarcnn.figures", "cifarcnn.evaluation", "cifarcnn.fsutil"}
    train = set(cachemap.code_deps("stages/train.py"))
    assert {"src/cifarcnn/data.py", "src/cifarcnn/fsutil.py", "src/cifarcnn/step.py"} <= train
    script = tmp_path / "s.py"
    script.write_text("def f():\n    import cifarcnn.convmath\n")
    assert {p.name for p in project_modules(script)} >= {"convmath.py", "__init__.py"}
    # a package file named as code to run (MLflow runs served_model.py to build the served model)
    assert "cifarcnn.served_model" in direct_imports(ROOT / "src" / PACKAGE / "serving.py")
    # Read once a process, but an edit is seen at once, even one of the same size a moment later.
    script.write_text("def f():\n    import cifarcnn.runfiles\n")
    assert {p.name for p in project_modules(script)} >= {"runfiles.py", "__init__.py"}
    assert "convmath.py" not in {p.name for p in project_modules(script)}


def test_the_module_table_is_current():
    """docs/cache_boundaries.md is what `python -m cifarcnn.cachemap --write` makes of the imports."""
    assert (ROOT / "docs" / "cache_boundaries.md").read_text() == cachemap.table(ROOT / "dvc.yaml")


def test_cache_boundaries_follow_meaning():
    """No edit to the report, its statistics, the figures, the served model's wrapper, the
    downloader or the team stack re-trains a model; the report's text and statistics re-run the
    report (and calculations, which renders Task 1) and nothing else."""
    reruns = cachemap.module_stages(ROOT / "dvc.yaml")
    for module in ("report", "stats", "figures", "serving", "served_model", "fetch", "ingest", "assets", "teamstack", "cachemap",
                   "convmath", "visualize", "evaluation"):
        assert "train@<run>-<seed>" not in reruns[f"src/cifarcnn/{module}.py"], module
    for module in ("report", "stats"):
        assert set(reruns[f"src/cifarcnn/{module}.py"]) <= {"report", "calculations"}, module
    assert set(reruns["src/cifarcnn/serving.py"]) == {"evaluate@<run>-<seed>"}
    assert reruns["src/cifarcnn/teamstack.py"] == [] and reruns["src/cifarcnn/cachemap.py"] == []


def _function_level_imports(path: Path) -> list[str]:
    found = []
    for fn in ast.walk(ast.parse(path.read_text())):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith(PACKAGE)):
                    found.append(f"{path.name}:{node.lineno} from {'.' * node.level}{node.module or ''}")
                elif isinstance(node, ast.Import) and any(a.name.startswith(PACKAGE) for a in node.names):
                    found.append(f"{path.name}:{node.lineno} import {node.names[0].name}")
    return found


def test_no_project_import_hides_inside_a_function():
    """Every dependency between modules is at the top of a file, where a reader (and dvc.yaml) sees it."""
    files = sorted((ROOT / "src" / PACKAGE).glob("*.py")) + sorted((ROOT / "stages").glob("*.py"))
    assert [hit for f in files for hit in _function_level_imports(f)] == []


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
    runs = set(run_names(load_params(ROOT / "params.yaml")))
    plots = {k: v for entry in yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"] for k, v in entry.items()}
    assert {f.removeprefix("reports/curves/").removesuffix(".csv") for f in plots["validation_accuracy"]["y"]} == runs
    assert {f.removeprefix("reports/curves/").removesuffix("_train_loss.csv") for f in plots["training_loss"]["y"]} == runs
    assert {k.removeprefix("confusion_") for k in plots if k.startswith("confusion_")} == runs
    assert {f for k, p in plots.items() if k.startswith("confusion_") for f in p["y"]} == {
        f"reports/curves/{r}_predictions.csv" for r in runs}
    assert all(p.get("title") and p.get("x_label") and p.get("y_label") for p in plots.values())


def test_configure_lists_every_param_a_run_takes():
    """The one configure stage re-runs when a knob that a run reads through `{param: ...}` changes."""
    params = load_params(ROOT / "params.yaml")
    listed = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["configure"]["params"]
    assert {spec["takes_param"] for spec in params["runs"].values()} <= set(listed)


def test_every_stage_script_answers_help():
    """`python stages/<name>.py --help`: the usage and what the stage does, exit 0; a wrong
    number of arguments: the usage, exit 2. The README's example in a fresh interpreter, every
    script as dvc.yaml runs it (`python -m cifarcnn.warm stages/<name>.py`: a fork of the tests'
    warm server, instead of ten interpreters importing torch and mlflow, 30-50 CPU-s here)."""
    import subprocess
    import sys

    scripts = sorted((ROOT / "stages").glob("*.py"))
    launch = [[sys.executable, "stages/train.py", "--help"]] + [
        [sys.executable, "-m", "cifarcnn.warm", f"stages/{script.name}", "--help"] for script in scripts]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
             for args in launch]  # at once
    for script, proc in zip([ROOT / "stages" / "train.py", *scripts], procs):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, (script.name, err)
        assert out.startswith(f"usage: python stages/{script.name}") and "DVC stage" in out, out
    wrong = subprocess.run([sys.executable, str(ROOT / "stages" / "train.py"), "task2"], capture_output=True, text=True)
    assert wrong.returncode == 2 and wrong.stderr.strip() == "usage: python stages/train.py <run name from params.yaml> <seed>"


def test_final_model_is_a_dvc_artifact_written_by_its_train_stage():
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        artifact = repo.artifacts.read()["dvc.yaml"]["cifar10-task3e"]
        outs = {str(o) for s in repo.index.stages if s.addressing == "train@task3e-0" for o in s.outs}
    assert artifact.type == "model" and artifact.desc and artifact.path in outs, (artifact, outs)


def test_dvc_reads_yaml_with_the_c_loader():
    """DVC reads dvc.lock, dvc.yaml and params.yaml with ruamel.yaml, whose C loader became an
    extra in 0.19: without it (pyproject's ruamel.yaml.clib) each read of a 1,000-line lock took
    0.19 s instead of 0.02 s. DVC's own reader, on this project's lock, with the C parser."""
    from dvc.utils.serialize import _yaml
    from ruamel.yaml import YAML
    from ruamel.yaml.main import CParser

    assert CParser is not None and YAML(typ="safe").Parser is CParser
    lock = (ROOT / "dvc.lock").read_text()
    assert _yaml.parse_yaml(lock, "dvc.lock")["stages"]["code"]["cmd"] == "python -m cifarcnn.warm stages/code.py"
