"""metrics.kid: the estimate and its standard error against independent computations.

FID, precision/recall and the classifier statistics are tested in test_evaluate.py, on features
and on the images of its tiny classifier.
"""

import pytest
import torch

import metrics as M

F64 = torch.float64


def normal(n, d, seed, shift=0.0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=F64) + shift


def brute_mmd2(x, y):
    """Gretton et al. 2012, eq. 3, one kernel value at a time with k(a, b) = (a.b / d + 1)^3."""
    def k(a, b):
        return (sum(float(p) * float(q) for p, q in zip(a, b)) / len(a) + 1) ** 3

    m, n = len(x), len(y)
    within_x = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    within_y = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    across = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return within_x + within_y - 2 * across


def test_kid_is_the_unbiased_mmd2_of_a_double_loop():
    x, y = normal(6, 3, 0), normal(9, 3, 1, shift=0.5)
    value, _ = M.kid(x, y, chunk=4)  # chunks that do not divide the sets
    assert value == pytest.approx(brute_mmd2(x, y), rel=1e-12)
    assert M.kid(y, x)[0] == pytest.approx(value, rel=1e-12)


def test_kid_se_is_the_delete_one_jackknife():
    """Recompute the estimate with each sample of either set left out (Arvesen 1969):
    se^2 = (m-1)/m sum_i (kid_-x_i - mean)^2 + (n-1)/n sum_j (kid_-y_j - mean)^2."""
    x, y = normal(7, 3, 2), normal(5, 3, 3, shift=0.3)
    _, se = M.kid(x, y, chunk=3)
    spread = 0.0
    for a, b, drop_from_x in ((x, y, True), (y, x, False)):
        loo = torch.tensor([brute_mmd2(torch.cat([a[:i], a[i + 1:]]), b) if drop_from_x
                            else brute_mmd2(b, torch.cat([a[:i], a[i + 1:]])) for i in range(len(a))], dtype=F64)
        spread += (len(a) - 1) / len(a) * (loo - loo.mean()).square().sum().item()
    assert se == pytest.approx(spread ** 0.5, rel=1e-9)


def test_kid_of_one_distribution_is_within_three_standard_errors_of_zero():
    for seed in range(8):
        value, se = M.kid(normal(300, 16, 2 * seed), normal(300, 16, 2 * seed + 1))
        assert abs(value) < 3 * se, (seed, value, se)


def test_kid_of_shifted_distributions_is_many_standard_errors_above_zero():
    value, se = M.kid(normal(300, 16, 0), normal(300, 16, 1, shift=1.0))
    assert value > 10 * se


def test_kid_se_shrinks_like_one_over_sqrt_n_when_the_distributions_differ():
    se_small, se_large = (M.kid(normal(n, 8, 0), normal(n, 8, 1, shift=0.3))[1] for n in (200, 800))
    assert 1.6 < se_small / se_large < 2.5  # sqrt(4) = 2


@pytest.mark.parametrize("shift, low, high", [(0.0, 1.0, 2.0), (0.3, 0.85, 1.4)])
def test_kid_se_matches_the_spread_over_fresh_draws(shift, low, high):
    """se claims the standard deviation of kid over repeated draws of both sets: draw them 200 times
    and compare. The jackknife errs wide where the distributions agree (degenerate U-statistic, about
    1.45x here) and is close where they differ; it must never be much narrower."""
    values, ses = [], []
    for r in range(200):
        value, se = M.kid(normal(100, 8, 2 * r), normal(100, 8, 2 * r + 1, shift))
        values.append(value)
        ses.append(se)
    ratio = torch.tensor(ses).square().mean().sqrt() / torch.tensor(values).std()
    assert low < ratio < high, ratio


def test_kid_needs_three_samples_per_set():
    with pytest.raises(ValueError, match="at least 3 samples"):
        M.kid(normal(2, 4, 0), normal(10, 4, 1))
