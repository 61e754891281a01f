"""DVC stage `code`: codedeps/<stage>.json, the files each stage's script runs, with their sha256.

Every other stage depends on its own file here instead of listing its modules, so an edit re-runs
exactly the stages whose code it touches (docs/cache_boundaries.md), and dvc.lock keeps one entry
per stage for its code instead of one per module. Runs when anything under stages/ or
src/cifarcnn/ changes; reads the source (ast), imports nothing of it: stdlib only, no torch.
"""
from pathlib import Path

from cifarcnn.codedeps import hashed_scripts, stage_code
from cifarcnn.errors import cli, stage_args
from cifarcnn.fsutil import write_json

OUT = Path("codedeps")


@cli
def main() -> None:
    root = Path.cwd()
    scripts = hashed_scripts(root)
    for script in scripts:
        write_json(OUT / f"{script.stem}.json", stage_code(script, root))
    print(f"wrote {OUT}/<stage>.json for {len(scripts)} stages: {', '.join(s.stem for s in scripts)}")


if __name__ == "__main__":
    main(*stage_args("python stages/code.py", 0, __doc__))
