"""Numbers over seeds: spread, whether the report's number lies inside it, paired claims.

With one seed there is no spread: every function here says so rather than invent one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from scipy import stats as sps

CONFIDENCE = 0.95  # the interval the report's number is judged against (two-sided t-interval of the mean)
ALPHA = 0.05  # a paired claim is called significant below this p-value (Welch's t-test, two-sided)


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    sd: float | None  # sample standard deviation (n - 1); None for n = 1
    low: float  # min
    high: float  # max
    ci: tuple[float, float] | None  # CONFIDENCE t-interval of the mean; None for n = 1

    def text(self, digits: int = 2) -> str:
        """``73.12 ± 0.45 (n = 5)``, or ``73.12 (n = 1)`` with no fake spread."""
        if self.sd is None:
            return f"{self.mean:.{digits}f} (n = 1)"
        return f"{self.mean:.{digits}f} ± {self.sd:.{digits}f} (n = {self.n})"

    def range_text(self, digits: int = 2) -> str:
        return f"{self.low:.{digits}f}" if self.n == 1 else f"{self.low:.{digits}f}–{self.high:.{digits}f}"


def summarize(values: list[float]) -> Summary:
    if not values:
        raise ValueError("no values to summarise")
    n = len(values)
    mean = math.fsum(values) / n
    if n == 1:
        return Summary(1, mean, None, mean, mean, None)
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = sps.t.ppf(0.5 + CONFIDENCE / 2, n - 1) * sd / math.sqrt(n)
    return Summary(n, mean, sd, min(values), max(values), (mean - half, mean + half))


def verdict(reference: float, s: Summary) -> str:
    """Where the report's number lies against our seeds: inside our CONFIDENCE interval of the
    mean, above or below it; with one seed, plainly that there is no spread to judge by."""
    if s.ci is None:
        return "no spread (n = 1)"
    low, high = s.ci
    if reference < low:
        return f"report below our {CONFIDENCE:.0%} CI"
    if reference > high:
        return f"report above our {CONFIDENCE:.0%} CI"
    return f"inside our {CONFIDENCE:.0%} CI"


@dataclass(frozen=True)
class Comparison:
    difference: float  # mean(a) - mean(b)
    se: float | None  # Welch's standard error of the difference
    t: float | None
    df: float | None  # Welch-Satterthwaite degrees of freedom
    p: float | None  # two-sided
    n_a: int
    n_b: int


def welch(a: list[float], b: list[float]) -> Comparison:
    """Welch's unequal-variance t-test of mean(a) - mean(b); no test below two values a side."""
    sa, sb = summarize(a), summarize(b)
    diff = sa.mean - sb.mean
    if sa.sd is None or sb.sd is None:
        return Comparison(diff, None, None, None, None, sa.n, sb.n)
    va, vb = sa.sd ** 2 / sa.n, sb.sd ** 2 / sb.n
    se = math.sqrt(va + vb)
    if se == 0:  # identical values on both sides: no evidence either way
        return Comparison(diff, 0.0, None, None, 1.0 if diff == 0 else 0.0, sa.n, sb.n)
    t = diff / se
    df = (va + vb) ** 2 / (va ** 2 / (sa.n - 1) + vb ** 2 / (sb.n - 1))
    p = 2 * sps.t.sf(abs(t), df)
    return Comparison(diff, se, t, df, float(p), sa.n, sb.n)


def claim_sentence(winner: str, loser: str, c: Comparison, unit: str = "points") -> str:
    """``Model 2 beats Model 1 by 0.40 ± 0.30 points, p = 0.20: not significant with n = 5``."""
    n = f"n = {c.n_a}" if c.n_a == c.n_b else f"n = {c.n_a} and {c.n_b}"
    verb = "beats" if c.difference > 0 else "does not beat"
    if c.p is None:
        return (f"{winner} {verb} {loser} by {c.difference:+.2f} {unit} with {n}: "
                "no spread to test against (at least two seeds a side are needed)")
    sig = "significant" if c.p < ALPHA else "not significant"
    return (f"{winner} {verb} {loser}: {c.difference:+.2f} ± {c.se:.2f} {unit}, p = {c.p:.2g}: "
            f"{sig} with {n} (Welch's t-test, α = {ALPHA:g})")
