"""DVC stage `configure@<run>`: resolve and validate one run of params.yaml, once.

Output: configs/<run>.json, the run's whole resolved config except its seed. Every
`train@<run>-<seed>` stage depends on this file instead of on params, so a changed knob
(`dvc exp run -S lr=...` for the runs that follow lr) re-trains every seed of the runs it
changes and nothing else, and a new entry in train.seeds trains only that seed.
"""
import sys
from pathlib import Path

from cifarcnn.config import load_params, resolve_run
from cifarcnn.errors import cli
from cifarcnn.fsutil import write_json


@cli
def main(run_name: str) -> None:
    cfg = resolve_run(load_params(), run_name)  # every check, with the key path in its error
    out = Path("configs") / f"{run_name}.json"
    write_json(out, cfg.seedless_dict())
    print(f"{run_name}: {cfg.model}, {cfg.optimizer} lr {cfg.lr:g}, batch {cfg.batch_size}, "
          f"{cfg.epochs} epochs -> {out}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python stages/configure.py <run name from params.yaml>")
    main(sys.argv[1])
