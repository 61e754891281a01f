"""DVC stage `split`: the validation split, written out with its provenance.

results/split.json: how the indices were drawn (the original's numpy call), which order they
index (the official archive's, or an image folder's), the class counts, and every validation
index, so anyone can check the split against the original's. Training draws the same split with
the same function (cifarcnn.batches.validation_indices).
"""
from pathlib import Path

from cifarcnn.batches import split_record
from cifarcnn.config import load_params, resolve_split
from cifarcnn.data import Dataset
from cifarcnn.errors import cli, stage_args
from cifarcnn.fsutil import write_json

OUT = Path("results/split.json")


@cli
def main() -> None:
    split = resolve_split(load_params())  # train.val_fraction and train.split_seed, validated
    record = split_record(Dataset.load("data/cifar10.npz"), split.val_fraction, split.split_seed)
    write_json(OUT, record)
    print(f"{OUT}: {record['val_images']} validation / {record['train_images']} training images; {record['method']}")


if __name__ == "__main__":
    main(*stage_args("python stages/split.py", 0, __doc__))
