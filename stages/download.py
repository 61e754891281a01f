"""DVC stage `download`: the only stage that touches the network.

data.source (URL or local path) -> verified -> data/cifar10.npz (uint8 arrays + class names).
"""
from pathlib import Path

from cifarcnn.config import load_params, resolve_data
from cifarcnn.data import prepare
from cifarcnn.errors import cli

OUT = Path("data/cifar10.npz")
CACHE = Path("data/downloads")  # verified downloads, reused when the stage re-runs


@cli
def main() -> None:
    cfg = resolve_data(load_params())
    ds = prepare(cfg.source, cfg.md5, cfg.subset, OUT, CACHE)
    print(f"wrote {OUT}: {len(ds.train_y)} train / {len(ds.test_y)} test images, "
          f"{len(ds.classes)} classes ({', '.join(ds.classes)})")


if __name__ == "__main__":
    main()
