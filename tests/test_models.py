"""Every registered model: forward/backward, trainable parameters, parameter counts."""
from __future__ import annotations

import hashlib

import pytest
import torch

from cifarcnn import models
from cifarcnn.errors import UserError
from cifarcnn.models import count_parameters, create_model, list_models

INPUT_SIZE = {"resnet18_transfer": 224}


def test_registry_holds_the_report_models():
    assert set(list_models()) == {"task2", "task3_model2", "task3e", "resnet18_transfer"}


@pytest.mark.parametrize("name", list_models())
def test_forward_backward(name):
    torch.manual_seed(0)
    model = create_model(name)  # random init: pretrained weights are the factory's option
    size = INPUT_SIZE.get(name, 32)
    logits = model(torch.randn(2, 3, size, size))
    assert logits.shape == (2, 10)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1])).backward()
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        else:
            assert p.grad is None, f"{pname} is frozen but got a gradient"


@pytest.mark.parametrize("name, params, total", [
    ("task2", {}, 390_410),  # the report's Task 1g
    ("task3_model2", {}, 826_730),
    ("task3_model2", {"dropout": False}, 826_730),  # dropout layers hold no parameters
    ("task3e", {}, 1_072_234),
])
def test_parameter_counts(name, params, total):
    counts = count_parameters(create_model(name, **params))
    assert counts == {"total": total, "trainable": total, "frozen": 0}


def test_resnet_transfer_freezes_all_but_layer4_and_fc():
    model = create_model("resnet18_transfer")
    counts = count_parameters(model)
    assert counts["total"] == 11_181_642  # torchvision resnet18 with a 10-way fc
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"layer4", "fc"}
    assert counts["trainable"] == 8_393_728 + 5_130
    assert model.fc.out_features == 10


def test_dropout_is_a_parameter_not_a_copy():
    with_dropout = create_model("task3_model2", dropout=True)
    without = create_model("task3_model2", dropout=False)
    assert [m.p for m in with_dropout.modules() if isinstance(m, torch.nn.Dropout)] == [0.4, 0.2]
    assert not any(isinstance(m, torch.nn.Dropout) for m in without.modules())
    assert [m.p for m in create_model("task3e", second_dropout=0.1).modules()
            if isinstance(m, torch.nn.Dropout)] == [0.4, 0.1]


def test_task3e_block_order_is_conv_relu_bn():
    layers = list(create_model("task3e"))
    kinds = [type(m).__name__ for m in layers[:7]]
    assert kinds == ["Conv2d", "ReLU", "BatchNorm2d", "Conv2d", "ReLU", "MaxPool2d", "Conv2d"]


def test_unknown_model_and_param_are_clear_errors():
    with pytest.raises(UserError, match="unknown model 'vgg'; known models: resnet18_transfer, task2"):
        create_model("vgg")
    with pytest.raises(UserError, match="model 'task2' has no parameter 'dropout'"):
        create_model("task2", dropout=True)


def test_resnet_weights_from_local_file_load_and_verify(tmp_path):
    from torchvision.models import resnet18

    torch.manual_seed(1)
    reference = resnet18(weights=None)
    torch.save(reference.state_dict(), tmp_path / "r18.pth")
    model = create_model("resnet18_transfer", pretrained=str(tmp_path / "r18.pth"))
    assert torch.equal(model.conv1.weight, reference.conv1.weight)
    assert torch.equal(model.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)


def test_imagenet_weights_offline_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(UserError, match=r"weights not found: .*fetch https://download\.pytorch\.org/models/"
                                        r"resnet18-f37072fd\.pth into data/pretrained/resnet18-f37072fd\.pth"):
        create_model("resnet18_transfer", pretrained="imagenet")


def test_imagenet_weights_with_wrong_sha256_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "pretrained").mkdir(parents=True)
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "data" / "pretrained" / "resnet18-f37072fd.pth")
    with pytest.raises(UserError, match="is not torchvision's f37072fd"):
        create_model("resnet18_transfer", pretrained="imagenet")


def test_weights_file_that_runs_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"conv1.weight": Evil()}, tmp_path / "evil.pth")  # pickles a global call
    with pytest.raises(UserError, match="not a loadable weights file"):
        create_model("resnet18_transfer", pretrained=str(tmp_path / "evil.pth"))


def test_imagenet_sha256_constant_is_torchvisions():
    # torchvision names the file by the first 8 hex digits of its SHA-256.
    assert models.RESNET18_IMAGENET_SHA256.startswith(models.RESNET18_IMAGENET_URL.split("-")[-1][:8])
    assert len(models.RESNET18_IMAGENET_SHA256) == 64
    assert hashlib.sha256(b"").hexdigest() != models.RESNET18_IMAGENET_SHA256


def test_pretrained_weights_are_the_factorys_option():
    assert models.has_pretrained("resnet18_transfer") and not models.has_pretrained("task2")
    assert "weights" not in models.model_params("resnet18_transfer")  # not a model parameter
    with pytest.raises(UserError, match="model 'task2' has no pretrained weights to load"):
        create_model("task2", pretrained="imagenet")
