"""The speed a user sees: the README's own commands, timed end to end (issue 17).

In a scratch copy of this repository's tracked files (a new git repository with its own DVC cache
and MLflow store, data from a local archive or image folder, nothing fetched) it runs

    dvc repro                                   # the whole report, one seed
    dvc exp run -S 'train.seeds=[0,1,2,3,4]'    # four more seeds of every run, from there

with bench/stageclock on PYTHONPATH, so every stage process records where its time went, and
writes bench/results/<label>_repro.json:

    {"device": ..., "torch": ..., "runs": {"dvc repro": {"wall_seconds": ...},
     "dvc exp run -S 'train.seeds=[0,1,2,3,4]'": {"wall_seconds": ...}},
     "stages": {<stage>: seconds, ...},            # dvc repro's stages, process start to exit
     "phases": {<command>: {<stage>: {imports, setup, work, finish, exit, dvc_before, fixed}}}}

    python bench/entry_points.py --source /tmp/cifar10          # the archive, its folder, or an image-folder tree
    python bench/entry_points.py --tiny        # 300 generated images, one epoch: checks the script (minutes on a CPU)

--source takes what params.yaml's data.source takes (a JPEG copy packed as a tarball: extract it
first, `tar xzf cifar10-jpeg.tar.gz -C /tmp/cifar10`). Offline by design: task4a trains from random weights unless --resnet-weights names a local
ResNet18 state dict, and the Task 4 photo is a generated one unless --image names a file.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from fixtures import commit_all, copy_tracked, project_env, set_params, stripes_photo, tiny_project  # noqa: E402
from stage_overhead import run_clocked  # noqa: E402

SEEDS_COMMAND = "dvc exp run -S 'train.seeds=[0,1,2,3,4]'"


@contextlib.contextmanager
def real_project(work: Path, source: Path, resnet_weights: str, image: Path | None):
    """The tracked files with params.yaml pointed at local data (full size, the real epochs)."""
    from PIL import Image

    repo = copy_tracked(work / "repo")
    if image is None:
        image = work / "photo.png"
        Image.fromarray(stripes_photo()).save(image)
    text = set_params((repo / "params.yaml").read_text(), {
        "source": str(source.resolve()), "md5": "null", "resnet_weights": resnet_weights, "image": str(image.resolve())})
    (repo / "params.yaml").write_text(text)
    env = project_env()
    commit_all(repo, env, "entry-point benchmark")
    yield repo, env


def stage_seconds(stages: dict) -> dict[str, float]:
    """Each stage's process, start to exit (DVC's own time between stages is not in it)."""
    return {name: round(sum(v for k, v in p.items() if k not in ("fixed", "dvc_before")), 2)
            for name, p in stages.items() if not name.startswith("(")}


def summary(wall: float, phases: dict) -> dict:
    """Stages, their useful work and fixed cost in all, fixed cost per stage, and wall / work
    (issue 17's goals: <= 2 s per stage, <= 1.5x)."""
    stages = {k: v for k, v in phases.items() if not k.startswith("(")}
    work = sum(p["work"] for p in stages.values())
    fixed = sum(p["fixed"] for p in phases.values())
    return {"stages": len(stages), "work_seconds": round(work, 1), "fixed_seconds": round(fixed, 1),
            "fixed_per_stage": round(fixed / max(len(stages), 1), 2), "wall_over_work": round(wall / work, 2) if work else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, help="a local CIFAR-10 archive, its folder, or an image-folder tree")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny project instead (checks this script)")
    parser.add_argument("--label", help="names the JSON (default: the device, e.g. nvidia_h200, or cpu)")
    parser.add_argument("--resnet-weights", default="none", help="none (default) or a local ResNet18 state dict")
    parser.add_argument("--image", type=Path, help="the Task 4 photo (default: a generated one)")
    args = parser.parse_args()
    if not args.tiny and not (args.source and args.source.exists()):
        parser.error("give --source PATH (an existing local archive or folder), or --tiny")

    import torch  # after the argument check: `--help` stays fast

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    device = gpu or f"CPU, {os.cpu_count()} cores"
    label = args.label or ("tiny_" if args.tiny else "") + (re.sub(r"[^a-z0-9]+", "_", gpu.lower()) if gpu else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        project = tiny_project(work) if args.tiny else real_project(work, args.source, args.resnet_weights, args.image)
        with project as (repo, env):
            clock = work / "clock.jsonl"
            repro_s, repro = run_clocked(["dvc", "repro"], repo, env, clock)
            print(f"dvc repro: {repro_s:.1f} s ({len(stage_seconds(repro))} stages)", flush=True)
            seeds_s, seeds = run_clocked(["dvc", "exp", "run", "-S", "train.seeds=[0,1,2,3,4]"], repo, env, clock)
            print(f"{SEEDS_COMMAND}: {seeds_s:.1f} s ({len(stage_seconds(seeds))} stages)", flush=True)
    result = {
        "device": device, "torch": torch.__version__, "python": platform.python_version(),
        # cifarcnn.warm: stages ran in forks of a process with torch and mlflow imported (CIFARCNN_WARM=0: cold)
        "warm": os.environ.get("CIFARCNN_WARM", "1") != "0",
        "project": "tiny (300 generated images, one epoch)" if args.tiny else f"full ({args.source.name})",
        "runs": {"dvc repro": {"wall_seconds": round(repro_s, 1)}, SEEDS_COMMAND: {"wall_seconds": round(seeds_s, 1)}},
        "summary": {cmd: summary(wall, phases) for cmd, wall, phases in
                    (("dvc repro", repro_s, repro), (SEEDS_COMMAND, seeds_s, seeds))},
        "stages": stage_seconds(repro),
        "phases": {"dvc repro": repro, SEEDS_COMMAND: seeds},
    }
    out = ROOT / "bench" / "results" / f"{label}_repro.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"-> {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
