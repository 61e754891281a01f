"""Numbers over seeds: spread, whether one run of ours could have given the report's number,
whether the report sits above ours across runs, and the report's paired claims.

Each number in the report comes from one run, so it is judged against a *prediction interval*
for one new run of ours (mean ± t(0.975, n−1) · s · √(1 + 1/n)), not against the interval of our
mean. Below three seeds no verdict is given: t(0.975, 1) = 12.7 makes nearly any number "inside".
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from scipy import stats as sps

CONFIDENCE = 0.95  # two-sided: the prediction interval, and the t-interval of our mean shown beside it
ALPHA = 0.05  # a claim or a shift is called significant below this p-value (two-sided)
MIN_SEEDS = 3  # fewest seeds for a verdict: with 2, t(0.975, 1) = 12.7 and nearly everything is "inside"


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


def no_spread(s: Summary) -> bool:
    """Every value equal, up to float rounding (accuracies computed two ways can differ by 1e-14)."""
    return s.sd is not None and s.sd <= 1e-9 * max(1.0, abs(s.mean))


@dataclass(frozen=True)
class Judgement:
    """Could one run of ours have produced ``reference``? ``verdict`` is the sentence shown."""
    verdict: str
    interval: tuple[float, float] | None = None  # CONFIDENCE prediction interval for one new run
    t: float | None = None  # (reference - mean) / (s · √(1 + 1/n))
    df: int | None = None
    p: float | None = None  # two-sided


def single_run(reference: float, s: Summary) -> Judgement:
    """The report's one-run number against a prediction interval for one new run of ours."""
    if s.n < MIN_SEEDS:
        return Judgement(f"no verdict (n = {s.n}; {MIN_SEEDS} seeds at least)")
    if no_spread(s):
        return Judgement(f"no spread (all {s.n} seeds equal)")
    scale = s.sd * math.sqrt(1 + 1 / s.n)
    df = s.n - 1
    half = sps.t.ppf(0.5 + CONFIDENCE / 2, df) * scale
    t = (reference - s.mean) / scale
    p = float(2 * sps.t.sf(abs(t), df))
    low, high = s.mean - half, s.mean + half
    where = "report above" if reference > high else "report below" if reference < low else "inside"
    return Judgement(f"{where} ({CONFIDENCE:.0%} PI {low:.2f}–{high:.2f}; t = {t:.2f}, p = {p:.2g})",
                     (low, high), t, df, p)


def verdict(reference: float, s: Summary) -> str:
    return single_run(reference, s).verdict


@dataclass(frozen=True)
class Shift:
    """A one-sample t-test of report − ours over several runs: a systematic offset."""
    n: int
    mean: float
    sd: float | None
    t: float | None
    p: float | None


def pooled_shift(differences: list[float]) -> Shift:
    """Is the report above ours across runs? ``differences``: report − our mean, one per
    independent report number; a one-sample t-test of their mean against 0."""
    s = summarize(differences)
    if s.sd is None or no_spread(s):
        return Shift(s.n, s.mean, s.sd, None, None)
    t = s.mean / (s.sd / math.sqrt(s.n))
    return Shift(s.n, s.mean, s.sd, t, float(2 * sps.t.sf(abs(t), s.n - 1)))


@dataclass(frozen=True)
class Comparison:
    difference: float  # mean(a) - mean(b)
    se: float | None  # standard error of the difference
    t: float | None
    df: float | None  # Welch-Satterthwaite, or n - 1 for paired seeds
    p: float | None  # two-sided; None: no test (too few seeds, or no spread)
    n_a: int
    n_b: int
    test: str = "Welch's t-test"
    why_none: str = ""  # when p is None: what was missing


def welch(a: list[float], b: list[float]) -> Comparison:
    """Welch's unequal-variance t-test of mean(a) - mean(b); no test below two values a side."""
    sa, sb = summarize(a), summarize(b)
    diff = sa.mean - sb.mean
    if sa.sd is None or sb.sd is None:
        return Comparison(diff, None, None, None, None, sa.n, sb.n, why_none="at least two seeds a side are needed")
    va, vb = sa.sd ** 2 / sa.n, sb.sd ** 2 / sb.n
    se = math.sqrt(va + vb)
    if no_spread(sa) and no_spread(sb):  # every seed equal on both sides: nothing to test the difference against
        return Comparison(diff, 0.0, None, None, None, sa.n, sb.n, why_none="no spread on either side")
    t = diff / se
    df = (va + vb) ** 2 / (va ** 2 / (sa.n - 1) + vb ** 2 / (sb.n - 1))
    return Comparison(diff, se, t, df, float(2 * sps.t.sf(abs(t), df)), sa.n, sb.n)


def paired(a: list[float], b: list[float]) -> Comparison:
    """A paired t-test of a - b, seed by seed (runs with the same seed share initial weights and
    batches, so their difference has less noise than either)."""
    if len(a) != len(b):
        raise ValueError("paired runs need the same seeds")
    d = summarize([x - y for x, y in zip(a, b)])
    n = len(a)
    if d.sd is None:
        return Comparison(d.mean, None, None, None, None, n, n, "paired t-test", "at least two seeds are needed")
    if no_spread(d):
        return Comparison(d.mean, 0.0, None, None, None, n, n, "paired t-test", "no spread in the differences")
    se = d.sd / math.sqrt(n)
    t = d.mean / se
    return Comparison(d.mean, se, t, n - 1, float(2 * sps.t.sf(abs(t), n - 1)), n, n, "paired t-test")


def difference_text(c: Comparison, unit: str = "points") -> str:
    """``+0.40 ± 0.30 points, p = 0.2: not significant with n = 5 (Welch's t-test, α = 0.05)``, or
    ``+0.40 points with n = 2: no test (why)``: the one wording of a tested difference."""
    n = f"n = {c.n_a}" if c.n_a == c.n_b else f"n = {c.n_a} and {c.n_b}"
    u = f" {unit}" if unit else ""
    if c.p is None:
        return f"{c.difference:+.2f}{u} with {n}: no test ({c.why_none})"
    sig = "significant" if c.p < ALPHA else "not significant"
    return f"{c.difference:+.2f} ± {c.se:.2f}{u}, p = {c.p:.2g}: {sig} with {n} ({c.test}, α = {ALPHA:g})"


def claim_sentence(winner: str, loser: str, c: Comparison, unit: str = "points") -> str:
    """``Model 2 beats Model 1: +0.40 ± 0.30 points, p = 0.2: not significant with n = 5 (Welch's t-test, α = 0.05)``."""
    verb = "beats" if c.difference > 0 else "does not beat"
    return f"{winner} {verb} {loser}" + (" by " if c.p is None else ": ") + difference_text(c, unit)
