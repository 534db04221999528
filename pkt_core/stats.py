"""The study's statistics as plain functions on arrays: t-intervals and p-values over units
(families, or seeds within one family), Holm and Benjamini-Hochberg with the intervals dual to
them, a paired bootstrap over families, seeds and test items, and the power of the design.

No pandas, no I/O: report.py turns tables into the arrays these take.
"""
from __future__ import annotations

import numpy as np
from scipy import optimize, stats

POWER = 0.8


# ---- one comparison over its units --------------------------------------------------------------
def t_test(diffs, level: float = 0.95) -> tuple[float, float, float, float]:
    """Mean of paired differences, its two-sided t-interval at `level`, and the one-sample t-test's
    two-sided p-value (H0: mean 0). nan interval and p below 2 units; a zero spread gives the point
    interval and p = 1 (mean 0) or 0 (mean != 0), where scipy would return nan."""
    d = np.asarray(diffs, dtype=float)
    mean = float(d.mean()) if d.size else float("nan")
    if d.size < 2:
        return mean, float("nan"), float("nan"), float("nan")
    sd = float(d.std(ddof=1))
    if sd == 0:
        return mean, mean, mean, 1.0 if mean == 0 else 0.0
    half = stats.t.ppf(0.5 + level / 2, d.size - 1) * sd / np.sqrt(d.size)
    p = 2 * stats.t.sf(abs(mean) / (sd / np.sqrt(d.size)), d.size - 1)
    return mean, mean - half, mean + half, float(p)


# ---- multiple comparisons ------------------------------------------------------------------------
def _ranked(p):
    """p as floats, empty (adjusted p, reject, local alpha) arrays, and the non-nan indices by ascending p."""
    p = np.asarray(p, dtype=float)
    idx = np.flatnonzero(~np.isnan(p))
    order = idx[np.argsort(p[idx], kind="stable")]
    return p, np.full(p.shape, np.nan), np.zeros(p.shape, bool), np.full(p.shape, np.nan), order


def holm(p, alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Holm's step-down over m p-values: (adjusted p, reject, local alpha).

    The k-th smallest p is tested at alpha / (m - k + 1) while every smaller one was rejected; a
    comparison's local alpha is the level of the step that decided it (the step where the procedure
    stopped, for the ones it kept), so the t-interval at 1 - local alpha excludes 0 exactly when
    Holm rejects. nan p-values are left out (nan adjusted, not rejected)."""
    p, adj, reject, local, order = _ranked(p)
    m = order.size
    if not m:
        return adj, reject, local
    steps = alpha / (m - np.arange(m))  # alpha/m, alpha/(m-1), ..., alpha
    adj[order] = np.minimum(1.0, np.maximum.accumulate(p[order] * (m - np.arange(m))))
    passed = p[order] <= steps
    stop = m if passed.all() else int(np.argmin(passed))  # first step that fails
    reject[order[:stop]] = True
    local[order[:stop]] = steps[:stop]
    if stop < m:
        local[order[stop:]] = steps[stop]
    return adj, reject, local


def bh(p, alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Benjamini-Hochberg over m p-values: (adjusted p, reject, local alpha).

    Rejects the R smallest, R the largest k with p_(k) <= k alpha / m. The local alpha R alpha / m
    (alpha / m when R = 0) is the level of the false-coverage-rate intervals of Benjamini and
    Yekutieli (2005): the t-interval at 1 - R alpha / m excludes 0 exactly for the rejected ones.
    nan p-values are left out."""
    p, adj, reject, local, order = _ranked(p)
    m = order.size
    if not m:
        return adj, reject, local
    ranked = p[order] * m / np.arange(1, m + 1)
    adj[order] = np.minimum(1.0, np.minimum.accumulate(ranked[::-1])[::-1])
    below = np.flatnonzero(p[order] <= alpha * np.arange(1, m + 1) / m)
    r = int(below.max()) + 1 if below.size else 0
    reject[order[:r]] = True
    local[order] = alpha * max(r, 1) / m
    return adj, reject, local


# ---- item-level uncertainty ------------------------------------------------------------------------
def bootstrap_draws(tables: list[np.ndarray], draws: int = 4000, seed: int = 0) -> np.ndarray:
    """Paired bootstrap of the mean difference over units, seeds and items.

    tables: one [seeds x items] array of paired differences (subject - control, the same seed and
    test item) per unit (family). Each draw resamples the units with replacement (when there are
    two or more), then within each unit its seeds and its items, and returns the mean over drawn
    units of the mean over drawn seeds x items. Returns the [draws] statistics."""
    rng = np.random.default_rng(seed)
    tables = [np.asarray(t, dtype=float) for t in tables]
    n = len(tables)
    # within[u][:, j]: unit u resampled for slot j of each draw, independently per slot, so a unit
    # drawn twice in one draw gets two independent resamples of its seeds and items
    within = np.empty((n, draws, n))
    for u, d in enumerate(tables):
        s, i = d.shape
        w = rng.multinomial(s, np.full(s, 1 / s), size=draws * n)  # how often each seed is drawn
        v = rng.multinomial(i, np.full(i, 1 / i), size=draws * n)  # how often each item is drawn
        within[u] = (((w @ d) * v).sum(axis=1) / (s * i)).reshape(draws, n)
    if n == 1:
        return within[0, :, 0]
    pick = rng.integers(0, n, size=(draws, n))
    return within[pick, np.arange(draws)[:, None], np.arange(n)[None, :]].mean(axis=1)


def bootstrap_interval(tables: list[np.ndarray], level: float = 0.95, draws: int = 4000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile interval of bootstrap_draws at `level`."""
    b = bootstrap_draws(tables, draws, seed)
    lo, hi = np.quantile(b, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


# ---- power -----------------------------------------------------------------------------------------
def power(effect: float, sd: float, n: int, alpha: float = 0.05) -> float:
    """Power of the two-sided one-sample t-test at level alpha over n units whose differences have
    standard deviation sd, when the true mean difference is `effect` (noncentral t)."""
    if n < 2 or sd <= 0:
        return float("nan")
    df, nc = n - 1, abs(effect) * np.sqrt(n) / sd
    crit = stats.t.ppf(1 - alpha / 2, df)
    p = float(stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc))
    return p if np.isfinite(p) else float(nc > crit)  # scipy's nct gives nan far out in the tail


def min_detectable(sd: float, n: int, alpha: float = 0.05, target: float = POWER) -> float:
    """The smallest true mean difference the t-test over n units detects with probability `target`."""
    if n < 2 or not sd > 0:
        return float("nan")
    hi = sd
    while power(hi, sd, n, alpha) < target:
        hi *= 2
    return float(optimize.brentq(lambda e: power(e, sd, n, alpha) - target, 0.0, hi, xtol=1e-12 * sd))


def units_needed(effect: float, sd: float, alpha: float = 0.05, target: float = POWER,
                 most: int = 100_000) -> int | None:
    """Units (families or seeds) the t-test needs to detect `effect` with probability `target`, given
    the spread sd of one unit's difference; None when `effect` is 0 or more than `most` are needed."""
    if not sd > 0 or effect == 0 or not np.isfinite(effect):
        return None
    lo, hi = 2, 2
    while power(effect, sd, hi, alpha) < target:
        if hi >= most:
            return None
        lo, hi = hi, min(most, hi * 2)
    while lo < hi:  # power rises with n: the smallest n that reaches the target
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if power(effect, sd, mid, alpha) < target else (lo, mid)
    return lo


def seeds_needed(effect: float, family_means, seed_sd: float, seeds: int, alpha: float = 0.05,
                 target: float = POWER, most: int = 10_000) -> int | None:
    """Seeds per family the t-test over these families needs for `effect`: a family's mean difference
    over k seeds varies as tau^2 + seed_sd^2 / k, tau^2 (between families) estimated from the
    observed family means, which were taken over `seeds` seeds. None when even `most` seeds would
    not do (the spread between families alone is too large)."""
    fm = np.asarray(family_means, dtype=float)
    n = fm.size
    if n < 2 or effect == 0 or not np.isfinite(effect):
        return None
    tau2 = max(0.0, float(fm.var(ddof=1)) - seed_sd ** 2 / seeds)
    if tau2 > 0 and power(effect, np.sqrt(tau2), n, alpha) < target:
        return None
    for k in range(1, most + 1):
        sd = np.sqrt(tau2 + seed_sd ** 2 / k)
        if sd == 0 or power(effect, sd, n, alpha) >= target:
            return k
    return None
