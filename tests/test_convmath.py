"""Task 1: the report's numbers, computed, cross-checked with torch; impossible sizes refused."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cifarcnn import convmath
from cifarcnn.convmath import (IMAGE_1A, SOBEL_X, conv2d_torch, convolve2d, kernel_for, output_size,
                               parameter_table, same_padding, torch_output_size)
from cifarcnn.models import create_model

ROOT = Path(__file__).resolve().parents[1]
REPORT_1A = [[-2, 1, -11, 2, 13], [-10, 4, -8, -2, 18], [-14, 1, 5, -6, 9]]


def test_1a_convolution_matches_report_and_torch():
    result = convolve2d(IMAGE_1A, SOBEL_X, padding=1)
    assert result.tolist() == REPORT_1A
    np.testing.assert_array_equal(conv2d_torch(IMAGE_1A, SOBEL_X, 1), result)


def test_convolution_flips_the_kernel():
    impulse = np.zeros((3, 3), int)
    impulse[1, 1] = 1
    kernel = np.arange(9).reshape(3, 3)
    # Convolving an impulse reproduces the kernel itself (correlation would give it flipped).
    assert convolve2d(impulse, kernel, padding=1).tolist() == kernel.tolist()


@pytest.mark.parametrize("fn, args, expected", [
    (same_padding, (5, 1, 32), 2),  # 1c
    (kernel_for, (512, 504, 0, 1), 9),  # 1d
    (output_size, (504, 2, 0, 2), 252),  # 1e
    (output_size, (252, 3, 0, 1), 250),  # 1f
])
def test_1c_to_1f(fn, args, expected):
    assert fn(*args) == expected


def test_sizes_agree_with_torch_layers():
    for size, k, p, s in [(32, 5, 2, 1), (512, 9, 0, 1), (252, 3, 0, 1), (33, 3, 1, 2), (7, 7, 3, 3)]:
        assert output_size(size, k, p, s) == torch_output_size(size, k, p, s)
    assert output_size(504, 2, 0, 2) == torch_output_size(504, 2, 0, 2, pool=True)


@pytest.mark.parametrize("args, message", [
    ((5, 9, 1, 1), "kernel size 9 is larger than the padded input 7"),
    ((32, 4, 0, 3), r"output size \(32 - 4 \+ 2\*0\) / 3 \+ 1 = 31/3 is not an integer"),
    ((32, 5, 2, 0), "stride must be > 0, got 0"),
    ((32, 5, -1, 1), "padding must be >= 0"),
    ((32.5, 5, 2, 1), "input size must be an integer"),
])
def test_impossible_sizes_are_refused(args, message):
    with pytest.raises(ValueError, match=message):
        output_size(*args)


def test_impossible_padding_and_kernel():
    with pytest.raises(ValueError, match="no integer padding keeps size 32 with kernel 4"):
        same_padding(4, 1, 32)
    with pytest.raises(ValueError, match="output size 600 is impossible from input 512"):
        kernel_for(512, 600)


def test_1g_parameter_table_from_the_model():
    rows = parameter_table(create_model("task2"))
    assert [r["parameters"] for r in rows] == [2432, 51264, 204928, 131136, 650]
    assert [r["weight_shape"] for r in rows] == ["5x5x3x32", "5x5x32x64", "5x5x64x128", "2048x64", "64x10"]
    assert sum(r["weights"] for r in rows) == 390_112 and sum(r["biases"] for r in rows) == 298


def test_task1_answers_all_checked():
    answers = convmath.task1_answers()
    assert answers["1a"]["result"] == REPORT_1A
    assert (answers["1c"]["padding"], answers["1d"]["kernel"], answers["1e"]["output"], answers["1f"]["output"]) == (2, 9, 252, 250)
    assert all(a["checked_with_torch"] for a in answers.values())


def test_calculations_stage_writes_report_json_and_figure(tmp_path):
    import shutil
    shutil.copytree(ROOT / "stages", tmp_path / "stages")
    proc = subprocess.run([sys.executable, "stages/calculations.py"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "reports" / "task1.json").read_text())
    assert data["parameters"]["task2"]["total"] == 390_410
    assert data["parameters"]["resnet18_transfer"]["frozen"] == 2_782_784
    md = (tmp_path / "reports" / "task1.md").read_text()
    assert "**390,410**" in md and "**9**" in md and "**252**" in md and "**250**" in md
    png = (tmp_path / "reports" / "figures" / "task1a_convolution.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20_000
