"""Sample-quality metrics: pure functions of feature (or pixel) tensors, each checkable against its paper.

Features are (N, D) tensors, one row per image; the maths runs in float64. Nothing here knows
where the features come from: evaluate.py supplies them (the penultimate layer of its MNIST
classifier) and decides which sets to compare.

    fid                     Heusel et al. 2017, eq. 6
    kid                     Binkowski et al. 2018: unbiased MMD^2 (Gretton et al. 2012, Lemma 6) with
                            a cubic kernel, over the full sets, with its jackknife standard error
    kid_over_subsets        the same estimate averaged over random subsets, with the spread of one subset
    precision_recall        Kynkaanniemi et al. 2019, eqs. 1-2
    confidence_stats        max-softmax probability of a classifier
    class_histogram,        share of samples per predicted class, and its entropy / log(#classes)
    normalized_entropy
    nearest_train_distance  pixel L2 from each sample to its nearest training image
"""

import math

import torch

CONFIDENT = 0.9  # a max-softmax probability above this counts as a confident reading


# ----------------------------------------------------------------------------
# FID
# ----------------------------------------------------------------------------

def _mean_cov(feats):
    x = torch.as_tensor(feats, dtype=torch.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"need an (N, D) feature matrix with N >= 2, got shape {tuple(x.shape)}")
    mu = x.mean(0)
    xc = x - mu
    return mu, xc.T @ xc / (len(x) - 1)


def _sqrtm_psd(s):
    """Square root of a symmetric positive semi-definite matrix via its eigenvectors."""
    w, v = torch.linalg.eigh(s)
    return (v * w.clamp(min=0).sqrt()) @ v.T  # round-off can make tiny eigenvalues negative


def fid(feats1, feats2):
    """Frechet distance between Gaussians fitted to two feature sets (Heusel et al. 2017, eq. 6):
    |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2), with unbiased covariances, in float64.

    S1^1/2 S2 S1^1/2 is symmetric PSD with the eigenvalues of S1 S2, so tr sqrt(S1 S2) is the sum
    of the roots of its eigenvalues: no general matrix square root.
    """
    mu1, s1 = _mean_cov(feats1)
    mu2, s2 = _mean_cov(feats2)
    r1 = _sqrtm_psd(s1)
    m = r1 @ s2 @ r1
    eig = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0)
    d = (mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * eig.sqrt().sum()
    return max(d.item(), 0.0)  # a distance; only round-off makes it negative


# ----------------------------------------------------------------------------
# KID
# ----------------------------------------------------------------------------

def cubic_kernel(a, b):
    """KID's kernel k(x, y) = (x.y / d + 1)^3 (Binkowski et al. 2018) between the rows of a (M, D)
    and b (N, D): (M, N)."""
    return (a @ b.T / a.shape[1] + 1) ** 3


def _kernel_diagonal(a):
    """k(a_i, a_i) for every row of a."""
    return (a.square().sum(1) / a.shape[1] + 1) ** 3


def _kernel_sums(a, b, chunk):
    """Row and column sums of cubic_kernel(a, b), chunk rows at a time (10k x 10k at once is 800 MB)."""
    rows, cols = [], torch.zeros(len(b), dtype=torch.float64)
    for i in range(0, len(a), chunk):
        k = cubic_kernel(a[i:i + chunk], b)
        rows.append(k.sum(1))
        cols += k.sum(0)
    return torch.cat(rows), cols


def _two_feature_sets(feats1, feats2, minimum):
    x = torch.as_tensor(feats1, dtype=torch.float64)
    y = torch.as_tensor(feats2, dtype=torch.float64)
    if min(len(x), len(y)) < minimum:
        raise ValueError(f"KID needs at least {minimum} samples in each set, got {len(x)} and {len(y)}")
    return x, y


def kid(feats1, feats2, chunk=1000):
    """Kernel Inception Distance over the full sets and its standard error: (kid, se), floats.

    KID (Binkowski et al. 2018) is the unbiased estimate of MMD^2 (Gretton et al. 2012, Lemma 6,
    eq. 3) with the kernel k of cubic_kernel; for sets x (m rows) and y (n rows)
        kid = A / (m (m-1)) + B / (n (n-1)) - 2 C / (m n),
    A = sum_i a_i, a_i = sum_{j != i} k(x_i, x_j), B = sum_j b_j likewise over y (the diagonal
    k(x_i, x_i) left out is what makes it unbiased), C = sum_i c_i, c_i = sum_j k(x_i, y_j),
    and d_j = sum_i k(x_i, y_j).

    se is the delete-one jackknife for two-sample U-statistics (Arvesen 1969): the spread of the
    estimate over leaving out each x_i and each y_j in turn. Leaving out x_i changes only A and
    C, so the jackknife has the closed form
        se^2 = 4 / (m (m-1)) sum_i (u_i - mean u)^2 + 4 / (n (n-1)) sum_j (v_j - mean v)^2,
        u_i = a_i / (m-2) - c_i / n,   v_j = b_j / (n-2) - d_j / m.
    It estimates the sampling spread of this very number and, like the delete-one jackknife in
    general (Efron & Stein 1981), errs wide rather than narrow: by simulation about 1.4x when the
    distributions agree and within a few per cent when they differ (tests/test_metrics.py). It
    shrinks like 1 / sqrt(n) when they differ and like 1 / n when they agree (the U-statistic is
    then degenerate).
    """
    x, y = _two_feature_sets(feats1, feats2, 3)  # one left out, a set still needs a pair for its within term
    m, n = len(x), len(y)
    xx, _ = _kernel_sums(x, x, chunk)
    yy, _ = _kernel_sums(y, y, chunk)
    c, d = _kernel_sums(x, y, chunk)
    a = xx - _kernel_diagonal(x)  # leave out k(x_i, x_i)
    b = yy - _kernel_diagonal(y)
    value = a.sum() / (m * (m - 1)) + b.sum() / (n * (n - 1)) - 2 * c.sum() / (m * n)
    u, v = a / (m - 2) - c / n, b / (n - 2) - d / m
    var = 4 * (u - u.mean()).square().sum() / (m * (m - 1)) + 4 * (v - v.mean()).square().sum() / (n * (n - 1))
    return value.item(), var.sqrt().item()


def kid_over_subsets(feats1, feats2, num_subsets=100, subset_size=1000, seed=0):
    """(mean, std) over random subset pairs of the unbiased MMD^2 with cubic_kernel.

    The subset protocol of much GAN evaluation code. The mean estimates the same number as kid();
    the std is the spread of a single subset's estimate, not the standard error of the mean (the
    subsets overlap): use kid() for an error bar.
    """
    x, y = _two_feature_sets(feats1, feats2, 2)
    m = min(subset_size, len(x), len(y))
    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(num_subsets):
        a = x[torch.randperm(len(x), generator=gen)[:m]]
        b = y[torch.randperm(len(y), generator=gen)[:m]]
        kxx, kyy, kxy = cubic_kernel(a, a), cubic_kernel(b, b), cubic_kernel(a, b)
        within = (kxx.sum() - kxx.trace() + kyy.sum() - kyy.trace()) / (m * (m - 1))
        values.append(within - 2 * kxy.mean())
    values = torch.stack(values)
    return values.mean().item(), values.std(correction=0).item()


# ----------------------------------------------------------------------------
# Improved precision and recall
# ----------------------------------------------------------------------------

def knn_radii(x, k=3, chunk=1000):
    """Distance from each row of x to its k-th nearest other row."""
    radii = torch.empty(len(x), dtype=x.dtype)
    for i in range(0, len(x), chunk):
        d = torch.cdist(x[i:i + chunk], x)
        radii[i:i + chunk] = d.topk(k + 1, dim=1, largest=False).values[:, k]  # [:, 0] is itself
    return radii


def manifold_coverage(query, ref, ref_radii, chunk=1000):
    """Share of query rows within ref_radii[j] of some ref row j: the mean over the query of
    f(query, ref) of Kynkaanniemi et al. 2019, eq. 1."""
    inside = torch.empty(len(query), dtype=torch.bool)
    for i in range(0, len(query), chunk):
        d = torch.cdist(query[i:i + chunk], ref)
        inside[i:i + chunk] = (d <= ref_radii[None, :]).any(1)
    return inside.double().mean().item()


def precision_recall(real_feats, fake_feats, k=3, chunk=1000):
    """Improved precision and recall (Kynkaanniemi et al. 2019, eqs. 1-2), each in [0, 1].

    Every set is a union of balls, one per point, of radius its k-NN distance.
    Precision: share of fakes inside the real union (are samples realistic?).
    Recall: share of reals inside the fake union (is the data covered?).
    Distances come in chunks of `chunk` rows, so 10k x 10k needs ~80 MB.
    """
    real = torch.as_tensor(real_feats, dtype=torch.float64)
    fake = torch.as_tensor(fake_feats, dtype=torch.float64)
    if len(real) <= k or len(fake) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} points per set")
    precision = manifold_coverage(fake, real, knn_radii(real, k, chunk), chunk)
    recall = manifold_coverage(real, fake, knn_radii(fake, k, chunk), chunk)
    return precision, recall


# ----------------------------------------------------------------------------
# Classifier readings, memorisation
# ----------------------------------------------------------------------------

def confidence_stats(probs, threshold=CONFIDENT):
    """(mean max-softmax, share of samples whose max-softmax > threshold) of probs (N, classes)."""
    conf = probs.max(1).values.double()
    return conf.mean().item(), (conf > threshold).double().mean().item()


def class_histogram(labels, num_classes=10):
    """Share of samples per class, float64, sums to 1."""
    return torch.bincount(labels, minlength=num_classes).double() / len(labels)


def normalized_entropy(hist):
    """Entropy of a histogram divided by log(#classes): 1 uniform, 0 one class."""
    p = hist[hist > 0]
    h = -(p * p.log()).sum() / math.log(len(hist))
    return abs(h.item())  # h >= 0; abs turns the -0.0 of a single class into 0.0


@torch.no_grad()
def nearest_train_distance(samples, train_images, chunk=500, device="cpu"):
    """Pixel-space L2 distance from each sample to its nearest training image.

    The nearest image is found with a float32 matmul (|a-b|^2 = |a|^2 + |b|^2
    - 2 a.b, the fast path torch.cdist also takes), then its distance is
    recomputed exactly, so a copied training image gives exactly 0.
    10k samples x 60k train images take about 6 s on 2 CPU cores.
    """
    a = samples.reshape(len(samples), -1).float().to(device)
    b = train_images.reshape(len(train_images), -1).float().to(device)
    b2 = b.square().sum(1)
    out = torch.empty(len(a))
    for i in range(0, len(a), chunk):
        q = a[i:i + chunk]
        nearest = (b2[None, :] - 2 * q @ b.T).argmin(1)  # |q|^2 is the same along a row
        out[i:i + chunk] = (q - b[nearest]).norm(dim=1).cpu()
    return out
