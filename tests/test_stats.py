"""Statistics over seeds on inputs worked out by hand."""
from __future__ import annotations

import math

import pytest

from cifarcnn.stats import claim_sentence, summarize, verdict, welch


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


def test_one_seed_has_no_spread_and_says_so():
    s = summarize([73.5])
    assert s.sd is None and s.ci is None
    assert s.text() == "73.50 (n = 1)" and "±" not in s.text() and s.range_text() == "73.50"
    assert verdict(75.0, s) == "no spread (n = 1)"


def test_verdict_places_the_report_inside_above_or_below():
    s = summarize([70.0, 72.0, 74.0])  # 95% CI 67.03 .. 76.97
    assert verdict(72.0, s) == "inside our 95% CI"
    assert verdict(77.5, s) == "report above our 95% CI"
    assert verdict(66.0, s) == "report below our 95% CI"


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
        "Model 2 beats Model 1 by +1.00 points with n = 1: no spread to test against "
        "(at least two seeds a side are needed)")
