"""DVC stage `download`: the only stage that touches the network.

- data.source (URL or local path) -> verified -> data/cifar10.npz (uint8 arrays + class names);
- resnet_weights: imagenet -> torchvision's ResNet18 file, SHA-256 checked -> data/pretrained/;
- viz.image (URL or local path) -> data/viz_image.
Verified downloads are kept in data/downloads/ and reused when the stage re-runs.
"""
from pathlib import Path

from cifarcnn.assets import PHOTO, fetch_photo, fetch_resnet_weights
from cifarcnn.config import load_params, resolve_data, resolve_resnet_weights, resolve_viz
from cifarcnn.ingest import prepare
from cifarcnn.errors import cli, stage_args

OUT = Path("data/cifar10.npz")
CACHE = Path("data/downloads")


@cli
def main() -> None:
    params = load_params()
    cfg, weights, viz = resolve_data(params), resolve_resnet_weights(params), resolve_viz(params)
    ds = prepare(cfg.source, cfg.md5, cfg.subset, OUT, CACHE)
    print(f"wrote {OUT}: {len(ds.train_y)} train / {len(ds.test_y)} test images, "
          f"{len(ds.classes)} classes ({', '.join(ds.classes)})")
    path = fetch_resnet_weights(weights, CACHE)
    print(f"ResNet18 ImageNet weights: {path}" if path else f"resnet_weights: {weights}; nothing to fetch")
    _, digest = fetch_photo(viz.image, viz.image_sha256, CACHE)
    pin = "" if viz.image_sha256 else f" (pin it: viz.image_sha256: {digest})"
    print(f"photo for Task 4b/4c: {PHOTO}, sha256 {digest}{pin}")


if __name__ == "__main__":
    main(*stage_args("python stages/download.py", 0, __doc__))
