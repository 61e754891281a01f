"""How long loading data/cifar10.npz into memory takes (goal: well under a second for all 60,000)."""
import statistics
import sys
import time
from pathlib import Path

from cifarcnn.data import Dataset


def main(path: str = "data/cifar10.npz", repeats: int = 5) -> None:
    if not Path(path).exists():
        sys.exit(f"{path} not found: run `dvc repro download` first")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        ds = Dataset.load(path)
        times.append(time.perf_counter() - start)
    n = len(ds.train_y) + len(ds.test_y)
    print(f"load {path}: {n} images ({Path(path).stat().st_size / 2**20:.0f} MiB), "
          f"median {statistics.median(times) * 1000:.0f} ms over {repeats} runs (min {min(times) * 1000:.0f} ms)")


if __name__ == "__main__":
    main(*sys.argv[1:2])
