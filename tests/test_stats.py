"""Statistics over seeds on inputs worked out by hand."""
from __future__ import annotations

import math

import pytest

from cifarcnn.stats import claim_sentence, paired, pooled_shift, single_run, summarize, verdict, welch


def t_two_sided_p(t: float, df: float, steps: int = 20_000) -> float:
    """P(|T| > |t|) for Student's t with ``df`` degrees of freedom, by Simpson's rule on its
    density: independent of the scipy code under test."""
    c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))

    def pdf(x: float) -> float:
        return c * (1 + x * x / df) ** (-(df + 1) / 2)

    h = abs(t) / steps
    inner = pdf(0) + pdf(abs(t)) + sum((4 if i % 2 else 2) * pdf(i * h) for i in range(1, steps))
    return 1 - 2 * inner * h / 3


def test_summary_mean_sd_range_and_t_interval():
    s = summarize([70.0, 72.0, 74.0])
    assert (s.n, s.mean, s.sd, s.low, s.high) == (3, 72.0, 2.0, 70.0, 74.0)
    half = 4.302653 * 2 / math.sqrt(3)  # t(0.975, df = 2) from a printed table
    assert s.ci == pytest.approx((72 - half, 72 + half), abs=1e-5)
    assert s.text() == "72.00 ± 2.00 (n = 3)" and s.range_text() == "70.00–74.00"


def test_one_or_two_seeds_give_no_verdict():
    s = summarize([73.5])
    assert s.sd is None and s.ci is None
    assert s.text() == "73.50 (n = 1)" and "±" not in s.text() and s.range_text() == "73.50"
    assert verdict(75.0, s) == "no verdict (n = 1; 3 seeds at least)"
    # n = 2: t(0.975, 1) = 12.7 would call nearly anything "inside"
    assert verdict(99.0, summarize([70.0, 72.0])) == "no verdict (n = 2; 3 seeds at least)"


def test_zero_spread_says_so():
    assert verdict(75.0, summarize([72.0, 72.0, 72.0])) == "no spread (all 3 seeds equal)"
    c = welch([72.0, 72.0], [71.0, 71.0])  # different means, no spread on either side: no test, not p = 0
    assert c.p is None
    assert claim_sentence("A", "B", c) == "A beats B by +1.00 points with n = 2: no test (no spread on either side)"
    d = paired([72.0, 73.0, 74.0], [71.0, 72.0, 73.0])  # every difference exactly +1
    assert d.p is None and "no spread in the differences" in claim_sentence("A", "B", d)


def test_prediction_interval_for_one_run_against_a_hand_computation():
    """The report's number is one run: could one new run of ours have given it?"""
    s = summarize([70.0, 72.0, 74.0, 71.0, 73.0])  # mean 72, s = sqrt(2.5)
    scale = math.sqrt(2.5) * math.sqrt(1 + 1 / 5)
    t_crit = 2.776445  # t(0.975, df = 4) from a printed table
    j = single_run(76.0, s)
    assert j.interval == pytest.approx((72 - t_crit * scale, 72 + t_crit * scale), abs=1e-5)
    assert j.t == pytest.approx(4 / scale) and j.df == 4
    assert j.p == pytest.approx(t_two_sided_p(4 / scale, 4), abs=1e-6)
    assert j.verdict.startswith("inside (95% PI 67.19–76.81; t = 2.31, p = 0.08")
    assert single_run(78.0, s).verdict.startswith("report above")
    assert single_run(66.0, s).verdict.startswith("report below")
    assert not s.ci[0] <= 76.0 <= s.ci[1]  # outside the mean's interval, yet one run could well give it


def test_h200_verdicts_from_its_five_seeds():
    """bench/results/gpu_seeds_h200.json: task2 and task3d_no_dropout inside, task3e and task3d_dropout
    above (the issue's table, t to its two decimals)."""
    import json
    from pathlib import Path

    runs = json.loads((Path(__file__).resolve().parents[1] / "bench/results/gpu_seeds_h200.json").read_text())["runs"]
    for run, report, where, t in [("task2", 73.58, "inside", 2.03), ("task3e", 80.89, "report above", 3.03),
                                  ("task3d_dropout", 75.22, "report above", 3.22),
                                  ("task3d_no_dropout", 71.40, "inside", 0.47)]:
        s = summarize([100 * seed["test_acc"] for seed in runs[run].values()])
        j = single_run(report, s)
        assert s.n == 5 and j.verdict.startswith(where) and j.t == pytest.approx(t, abs=0.006), (run, j)


def test_pooled_shift_over_the_five_independent_report_numbers():
    """report − ours on task2, task3a_model1, task3a_model2, task3d_no_dropout and task3e (H200, five seeds)."""
    shift = pooled_shift([73.58 - 71.21, 75.09 - 73.11, 75.22 - 72.88, 71.40 - 70.63, 80.89 - 78.12])
    assert shift.n == 5 and shift.mean == pytest.approx(2.046) and shift.sd == pytest.approx(0.766, abs=1e-3)
    assert shift.t == pytest.approx(5.97, abs=0.01) and shift.p == pytest.approx(0.004, abs=5e-4)
    assert shift.p == pytest.approx(t_two_sided_p(shift.t, 4), abs=1e-6)


def test_paired_test_on_paired_seeds_against_a_hand_computation():
    a, b = [73.0, 74.0, 73.5, 72.5, 74.5], [71.0, 72.5, 71.0, 71.0, 72.0]  # differences 2, 1.5, 2.5, 1.5, 2.5
    c = paired(a, b)
    assert c.difference == pytest.approx(2.0) and c.se == pytest.approx(0.5 / math.sqrt(5))
    assert c.t == pytest.approx(2.0 / (0.5 / math.sqrt(5))) and c.df == 4 and c.test == "paired t-test"
    assert c.p == pytest.approx(t_two_sided_p(c.t, 4), abs=1e-6)
    assert c.p < welch(a, b).p  # pairing removes the noise the two runs of a seed share
    assert "(paired t-test, α = 0.05)" in claim_sentence("dropout", "no dropout", c)
    with pytest.raises(ValueError):
        paired([1.0, 2.0], [1.0])


def test_welch_against_a_hand_computation():
    a, b = [1.0, 2.0, 3.0, 4.0, 5.0], [2.0, 4.0, 6.0]
    # means 3 and 4; variances 2.5 and 4; se^2 = 2.5/5 + 4/3
    se = math.sqrt(0.5 + 4 / 3)
    t = -1 / se
    df = (0.5 + 4 / 3) ** 2 / (0.5 ** 2 / 4 + (4 / 3) ** 2 / 2)
    assert df == pytest.approx(3.5329, abs=1e-4)
    c = welch(a, b)
    assert (c.difference, c.n_a, c.n_b) == (-1.0, 5, 3)
    assert c.se == pytest.approx(se) and c.t == pytest.approx(t) and c.df == pytest.approx(df)
    assert c.p == pytest.approx(t_two_sided_p(t, df), abs=1e-6)
    assert 0.5 < c.p < 0.55


def test_claim_sentences():
    far = welch([75.0, 75.2, 74.8, 75.1, 74.9], [72.0, 72.2, 71.8, 72.1, 71.9])
    text = claim_sentence("Model 2", "Model 1", far)
    assert text.startswith("Model 2 beats Model 1: +3.00 ± 0.10 points, p = ")
    assert text.endswith("significant with n = 5 (Welch's t-test, α = 0.05)") and "not significant" not in text
    near = welch([73.0, 74.0, 72.0], [72.9, 73.8, 72.1])
    assert "not significant with n = 3" in claim_sentence("Model 2", "Model 1", near)
    single = welch([73.0], [72.0])
    assert single.p is None
    assert claim_sentence("Model 2", "Model 1", single) == (
        "Model 2 beats Model 1 by +1.00 points with n = 1: no test (at least two seeds a side are needed)")
