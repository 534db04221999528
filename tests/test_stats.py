"""pkt_core.stats against independent computations: scipy's t-test and t-interval, Holm and
Benjamini-Hochberg by brute force (closed testing; the step-up definition) and scipy's
false_discovery_control, the bootstrap against exact enumeration and the analytic variance, and
the power against simulated experiments."""
import itertools

import numpy as np
import pytest
from scipy import stats as sp

from pkt.core import stats


@pytest.mark.parametrize("n", [2, 3, 6, 11])
def test_t_test_matches_scipy(n):
    rng = np.random.default_rng(n)
    for _ in range(20):
        d = rng.normal(rng.normal(), rng.uniform(0.1, 2), size=n)
        mean, lo, hi, p = stats.t_test(d, 0.9)
        ref = sp.ttest_1samp(d, 0.0)
        assert p == pytest.approx(ref.pvalue, rel=1e-10)
        assert (lo, hi) == pytest.approx(sp.t.interval(0.9, n - 1, loc=d.mean(), scale=sp.sem(d)), rel=1e-10)
        assert mean == pytest.approx(d.mean())


def test_t_test_degenerate_cases():
    assert np.isnan(stats.t_test([0.3])[1]) and np.isnan(stats.t_test([0.3])[3])
    assert stats.t_test([0.0, 0.0, 0.0]) == (0.0, 0.0, 0.0, 1.0)  # identical runs: no difference at all
    assert stats.t_test([0.2, 0.2]) == (0.2, 0.2, 0.2, 0.0)


# ---- Holm -----------------------------------------------------------------------------------------
def holm_closed_testing(p, alpha):
    """Holm is the closed testing procedure over Bonferroni tests: H_i is rejected iff every
    intersection hypothesis containing i is rejected by Bonferroni (some p_j <= alpha/|S|, j in S)."""
    m = len(p)
    out = []
    for i in range(m):
        others = [j for j in range(m) if j != i]
        out.append(all(min(p[j] for j in (i, *s)) <= alpha / (len(s) + 1)
                       for k in range(m) for s in itertools.combinations(others, k)))
    return np.array(out)


def test_holm_hand_computed_case():
    # m = 4, alpha = 0.05: steps 0.0125, 0.0167, 0.025, 0.05
    p = [0.010, 0.040, 0.015, 0.30]
    adj, reject, local = stats.holm(p, 0.05)
    assert adj == pytest.approx([0.04, 0.08, 0.045, 0.30])
    assert reject.tolist() == [True, False, True, False]
    assert local == pytest.approx([0.0125, 0.025, 0.05 / 3, 0.025])  # kept ones: the step that stopped


@pytest.mark.parametrize("m", [1, 2, 3, 5, 6])
def test_holm_matches_closed_testing(m):
    rng = np.random.default_rng(m)
    for _ in range(200):
        p = np.round(rng.uniform(0, 0.1, size=m) ** rng.uniform(0.5, 2), 4)
        adj, reject, _ = stats.holm(p, 0.05)
        assert reject.tolist() == holm_closed_testing(p, 0.05).tolist(), p
        assert ((adj <= 0.05) == reject).all()


def test_holm_and_bh_leave_nan_out():
    adj, reject, local = stats.holm([0.01, np.nan, 0.02])
    assert np.isnan(adj[1]) and not reject[1] and adj[[0, 2]] == pytest.approx([0.02, 0.02])
    adj, reject, _ = stats.bh([np.nan, 0.01, 0.04])
    assert np.isnan(adj[0]) and adj[[1, 2]] == pytest.approx([0.02, 0.04])


# ---- Benjamini-Hochberg -----------------------------------------------------------------------------
def bh_by_definition(p, alpha):
    """Reject every p <= p_(k*), k* the largest k with p_(k) <= k alpha / m."""
    m, s = len(p), np.sort(p)
    ks = [k for k in range(1, m + 1) if s[k - 1] <= k * alpha / m]
    return np.array([x <= s[max(ks) - 1] for x in p]) if ks else np.zeros(m, bool)


def test_bh_hand_computed_case():
    p = [0.001, 0.008, 0.039, 0.041, 0.042, 0.06, 0.074, 0.205]  # the textbook example, m = 8
    adj, reject, local = stats.bh(p, 0.05)
    assert reject.tolist() == [True, True, False, False, False, False, False, False]
    assert adj[:2] == pytest.approx([0.008, 0.032]) and adj[2] == pytest.approx(0.042 * 8 / 5)
    assert local == pytest.approx(np.full(8, 2 * 0.05 / 8))


@pytest.mark.parametrize("m", [1, 2, 4, 9, 30])
def test_bh_matches_definition_and_scipy(m):
    rng = np.random.default_rng(100 + m)
    for _ in range(100):
        p = rng.uniform(0, 0.2, size=m) ** rng.uniform(0.5, 3)
        adj, reject, _ = stats.bh(p, 0.05)
        assert reject.tolist() == bh_by_definition(p, 0.05).tolist()
        assert adj == pytest.approx(sp.false_discovery_control(p, method="bh"))


def test_corrected_intervals_are_dual_to_the_corrections():
    """The t-interval at 1 - local alpha excludes 0 exactly for the comparisons the procedure rejects."""
    rng = np.random.default_rng(7)
    for _ in range(100):
        tables = [rng.normal(rng.normal(0, 0.6), 1, size=6) for _ in range(rng.integers(2, 9))]
        p = np.array([stats.t_test(d)[3] for d in tables])
        for correct in (stats.holm, stats.bh):
            _, reject, local = correct(p, 0.05)
            for d, r, a in zip(tables, reject, local):
                _, lo, hi, _ = stats.t_test(d, 1 - a)
                assert (lo > 0 or hi < 0) == r


# ---- the bootstrap ------------------------------------------------------------------------------------
def test_bootstrap_one_seed_has_the_analytic_variance():
    """One unit, one seed: the bootstrap of a mean over n items has mean x-bar and variance s^2/n
    with the plug-in s^2 (ddof=0)."""
    d = np.array([[0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0]])
    b = stats.bootstrap_draws([d], draws=200_000, seed=1)
    assert b.mean() == pytest.approx(d.mean(), abs=2e-3)
    assert b.var() == pytest.approx(d.var() / d.size, rel=0.02)


def exact_two_way(d):
    """Every equally likely resample of seeds and items of one [seeds x items] table."""
    s, i = d.shape
    return np.array([d[np.ix_(rows, cols)].mean() for rows in itertools.product(range(s), repeat=s)
                     for cols in itertools.product(range(i), repeat=i)])


def test_bootstrap_over_seeds_and_items_matches_enumeration():
    d = np.array([[0.1, -0.4, 0.7], [0.5, 0.2, -0.1]])
    exact = exact_two_way(d)
    b = stats.bootstrap_draws([d], draws=200_000, seed=2)
    assert b.mean() == pytest.approx(exact.mean(), abs=2e-3)
    assert b.var() == pytest.approx(exact.var(), rel=0.02)
    lo, hi = stats.bootstrap_interval([d], 0.9, draws=200_000, seed=2)
    assert np.mean(exact < lo) == pytest.approx(0.05, abs=0.02) and np.mean(exact > hi) == pytest.approx(0.05, abs=0.02)


def test_bootstrap_over_families_matches_enumeration():
    """Families resampled, and each drawn family resampled on its own (a family drawn twice gets two
    independent resamples)."""
    fams = [np.array([[0.0, 0.6]]), np.array([[1.0, 2.0], [1.4, 1.0]])]
    within = [exact_two_way(f) for f in fams]  # each family's exact within-resample distribution
    exact = np.array([(x + y) / 2 for a, b in itertools.product(range(2), repeat=2)
                      for x in within[a] for y in within[b]])
    # the enumeration weights each pick (a, b) by len(within[a]) * len(within[b]): reweight to 1/4 each
    weights = np.concatenate([np.full(len(within[a]) * len(within[b]), 1 / (4 * len(within[a]) * len(within[b])))
                              for a, b in itertools.product(range(2), repeat=2)])
    mean = np.sum(weights * exact)
    var = np.sum(weights * (exact - mean) ** 2)
    b = stats.bootstrap_draws(fams, draws=200_000, seed=3)
    assert b.mean() == pytest.approx(mean, abs=3e-3)
    assert b.var() == pytest.approx(var, rel=0.02)


# ---- power ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,alpha", [(6, 0.05), (8, 0.025), (4, 0.05)])
def test_min_detectable_effect_has_80_percent_power_in_simulation(n, alpha):
    sd = 0.3
    effect = stats.min_detectable(sd, n, alpha)
    assert stats.power(effect, sd, n, alpha) == pytest.approx(0.8, abs=1e-6)
    rng = np.random.default_rng(n)
    sims = rng.normal(effect, sd, size=(20_000, n))
    rate = np.mean(sp.ttest_1samp(sims, 0.0, axis=1).pvalue < alpha)
    assert rate == pytest.approx(0.8, abs=0.015)


def test_units_needed_is_the_smallest_n_with_enough_power():
    for effect, sd in ((0.1, 0.3), (0.02, 0.05), (0.5, 0.2)):
        n = stats.units_needed(effect, sd)
        assert stats.power(effect, sd, n) >= 0.8 and (n == 2 or stats.power(effect, sd, n - 1) < 0.8)
    assert stats.units_needed(0.0, 0.3) is None


def test_seeds_needed_follows_the_variance_split():
    """Family means over 2 seeds: between-family variance tau^2 = var(means) - seed_sd^2 / 2."""
    means = np.array([0.10, 0.30, 0.18, 0.25, 0.05, 0.22])
    seed_sd = 0.1
    k = stats.seeds_needed(0.1, means, seed_sd, seeds=2)
    tau2 = means.var(ddof=1) - seed_sd ** 2 / 2
    assert tau2 > 0 and k > 1
    sd_k = lambda k: np.sqrt(tau2 + seed_sd ** 2 / k)
    assert stats.power(0.1, sd_k(k), 6) >= 0.8 and stats.power(0.1, sd_k(k - 1), 6) < 0.8
    # when the families alone differ too much, no number of seeds helps
    assert stats.seeds_needed(0.01, [0.0, 1.0, -1.0], 0.1, seeds=2) is None
