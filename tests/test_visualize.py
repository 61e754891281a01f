"""Task 4b/4c: shapes, index checks, bad inputs, and a hand-set edge filter that finds stripes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from fixtures import stripes_photo
from PIL import Image

from cifarcnn import figures
from cifarcnn.errors import UserError
from cifarcnn.models import create_model
from cifarcnn.visualize import first_layer, load_photo, minmax, visualize


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("resnet18_transfer").eval()


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "stripes.png"
    Image.fromarray(stripes_photo()).save(path)
    return path


def test_shapes_and_scaling(model, photo):
    out = visualize(model, photo, [14, 26, 32, 49, 52], list(range(10)))
    assert out["photo"].shape == (224, 224, 3)
    assert [f.shape for f in out["filters"]] == [(7, 7, 3)] * 5
    assert [a.shape for a in out["first_activations"]] == [(112, 112)] * 5
    assert [a.shape for a in out["last_activations"]] == [(7, 7)] * 10
    assert out["last_shape"] == [512, 7, 7]
    for arr in out["filters"] + out["first_activations"] + out["last_activations"]:
        assert arr.min() >= 0 and arr.max() <= 1 and arr.max() == pytest.approx(1.0)


def test_train_mode_figure_uses_the_photos_statistics_and_leaves_the_model_alone(model, photo):
    """Figure 10 as the original computed it: BatchNorm in train mode normalises by this photo's
    statistics, so the maps differ from eval mode; the model's running statistics do not move."""
    import torch

    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = visualize(model, photo, [14], list(range(10)))
    assert [a.shape for a in out["last_activations_train_mode"]] == [(7, 7)] * 10
    assert any(not np.allclose(a, b) for a, b in zip(out["last_activations"], out["last_activations_train_mode"]))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and not model.training


def test_photo_is_resized_to_224(tmp_path):
    Image.fromarray(np.zeros((300, 500, 3), np.uint8)).save(tmp_path / "wide.jpg")
    pixels, x = load_photo(tmp_path / "wide.jpg")
    assert pixels.shape == (224, 224, 3) and x.shape == (1, 3, 224, 224)
    assert x[0, 0, 0, 0].item() == pytest.approx(-0.485 / 0.229, rel=1e-5)  # ImageNet-normalised black


def test_vertical_edge_filter_peaks_on_vertical_stripes(model, photo):
    """A hand-set conv1 filter (vertical edge detector): strongest on stripe edges, not inside them."""
    with torch.no_grad():
        model.conv1.weight.zero_()
        model.conv1.weight[0, :, :, 2] = -1.0
        model.conv1.weight[0, :, :, 4] = 1.0
        model.conv1.weight[1, :, 2, :] = -1.0  # a horizontal edge detector, for contrast
        model.conv1.weight[1, :, 4, :] = 1.0
    _, x = load_photo(photo)
    _, acts = first_layer(model, x, [0, 1])
    vertical, horizontal = acts[0].abs(), acts[1].abs()
    column_profile = vertical[10:50].mean(0)  # top half: pure stripes, period 16 px -> 8 at stride 2
    assert column_profile.max() > 10 * column_profile.median().clamp(min=1e-6)
    peaks = torch.nonzero(column_profile > column_profile.max() / 2).flatten()
    assert len(peaks) >= 20 and (peaks[1:] - peaks[:-1]).min() >= 1
    assert vertical[10:50].mean() > 5 * horizontal[10:50].mean()


def test_minmax():
    t = torch.tensor([[2.0, 4.0], [6.0, 10.0]])
    assert torch.equal(minmax(t), torch.tensor([[0.0, 0.25], [0.5, 1.0]]))
    assert torch.equal(minmax(torch.ones(3)), torch.zeros(3))


@pytest.mark.parametrize("filters, acts, message", [
    ([14, 64], list(range(10)), r"viz\.filter_indices: index 64 is out of range; the layer has 64 \(0\.\.63\)"),
    ([14], [512], r"viz\.activation_indices: index 512 is out of range; the layer has 512"),
    ([], [0], r"viz\.filter_indices: give at least one index"),
])
def test_bad_indices(model, photo, filters, acts, message):
    with pytest.raises(UserError, match=message):
        visualize(model, photo, filters, acts)


def test_not_an_image(tmp_path, model):
    (tmp_path / "notes.txt").write_text("not a photo")
    with pytest.raises(UserError, match=r"viz\.image: .*notes\.txt is not an image PIL can read"):
        visualize(model, tmp_path / "notes.txt", [0], [0])
    with pytest.raises(UserError, match=r"viz\.image: .*missing\.jpg does not exist"):
        load_photo(tmp_path / "missing.jpg")


def test_figures_are_pngs(model, photo, tmp_path):
    out = visualize(model, photo, [14, 26], [0, 1, 2])
    a = figures.first_layer_figure(out["filters"], out["first_activations"], [14, 26], tmp_path / "b.png")
    b = figures.last_layer_figure(out["last_activations"], [0, 1, 2], tmp_path / "c.png")
    for path in (a, b):
        assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
