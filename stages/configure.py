"""DVC stage `configure`: resolve and validate every run of params.yaml, once.

Output: configs/<run>.json per run, the run's whole resolved config except its seed, and
configs/run-order.json, the runs' names in params.yaml's order (the report's runs). Each
`train@<run>-<seed>` stage depends on its own run's file instead of on params, so a changed knob
(`dvc exp run -S lr=...`, which only task3e takes) rewrites only that run's file, and re-trains
every seed of that run and nothing else; a new entry in train.seeds trains only that seed. One
stage for all runs: resolving is instant, and each stage process costs seconds to start.
"""
from cifarcnn.config import CONFIGS, RUN_ORDER, load_params, resolve_all
from cifarcnn.errors import cli, stage_args
from cifarcnn.fsutil import write_json


@cli
def main() -> None:
    configs = resolve_all(load_params())  # every check, with the key path in its error, before anything is written
    for name, cfg in configs.items():
        write_json(CONFIGS / f"{name}.json", cfg.seedless_dict())
        print(f"{name}: {cfg.model}, {cfg.optimizer} lr {cfg.lr:g}, batch {cfg.batch_size}, "
              f"{cfg.epochs} epochs -> {CONFIGS / name}.json")
    write_json(CONFIGS / RUN_ORDER, list(configs))


if __name__ == "__main__":
    main(*stage_args("python stages/configure.py", 0, __doc__))
