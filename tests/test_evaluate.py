"""Invariants of evaluate.py (and of the metrics it reports) on tiny synthetic data: blob "digits" and a
tiny classifier; the inpainting read back on conftest's synthetic MNIST files with an untrained tiny DDPM."""

import json
import math
import os
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import editing
import evaluate as E
import metrics as M
from configuration import DEFAULTS, merge
from conftest import TINY as TINY_DDPM, randomised
from fileio import build, save_checkpoint
from mnist import MNIST

TINY = {"c1": 4, "c2": 8, "hidden": 16}


def blob_digits(n, seed=0, noise=0.2):
    """Class c is a bright blob at its own spot of a 3x4 grid, plus noise; in [-1, 1]."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    cy = (6 + 8 * (labels // 4)).float()[:, None, None]
    cx = (5 + 6 * (labels % 4)).float()[:, None, None]
    blob = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 2.5 ** 2))
    images = 2 * blob - 1 + noise * torch.randn(n, 28, 28, generator=gen)
    return images.clamp(-1, 1)[:, None], labels


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def tiny():
    """A tiny classifier trained on blob digits in well under a second."""
    x, y = blob_digits(400, seed=0)
    tx, ty = blob_digits(200, seed=1)
    model, acc = E.train_classifier(x, y, tx, ty, arch=TINY, epochs=5, batch_size=32, lr=1e-2,
                                    log=quiet)
    return model, acc, (x, y, tx, ty)


def feats_of(model, images):
    return E.classifier_outputs(model, images)[0]


# --- FID ---------------------------------------------------------------------

def test_fid_self_zero_and_symmetric():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(500, 16, generator=gen) @ torch.randn(16, 16, generator=gen)
    b = torch.randn(400, 16, generator=gen) * 2 + 1
    scale = torch.cov(a.T.double()).trace().item()
    assert M.fid(a, a) < 1e-6 * scale
    assert M.fid(a, b) == pytest.approx(M.fid(b, a), rel=1e-8)


def test_fid_matches_closed_form_1d():
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(300, 1, generator=gen, dtype=torch.float64) * 2 + 3
    b = torch.randn(200, 1, generator=gen, dtype=torch.float64) * 0.5 - 1
    m1, m2, s1, s2 = a.mean(), b.mean(), a.var(), b.var()  # var is unbiased, like np.cov
    expected = (m1 - m2) ** 2 + s1 + s2 - 2 * torch.sqrt(s1 * s2)
    assert M.fid(a, b) == pytest.approx(expected.item(), rel=1e-10)


def gaussian_with_exact_stats(n, mean, var, seed):
    """Rows whose sample mean is exactly `mean` and sample covariance exactly diag(var)."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, len(mean), generator=gen, dtype=torch.float64)
    q, _ = torch.linalg.qr(z - z.mean(0))  # orthonormal columns, each summing to 0
    return q * torch.sqrt(var * (n - 1)) + mean


def test_fid_matches_closed_form_diagonal():
    m1, v1 = torch.tensor([0.0, 1.0, -2.0, 5.0], dtype=torch.float64), torch.tensor([1.0, 4.0, 0.25, 9.0], dtype=torch.float64)
    m2, v2 = torch.tensor([1.0, 1.0, 0.0, 3.0], dtype=torch.float64), torch.tensor([2.0, 1.0, 0.25, 1.0], dtype=torch.float64)
    a = gaussian_with_exact_stats(200, m1, v1, seed=2)
    b = gaussian_with_exact_stats(300, m2, v2, seed=3)
    expected = ((m1 - m2) ** 2 + v1 + v2 - 2 * torch.sqrt(v1 * v2)).sum().item()
    assert M.fid(a, b) == pytest.approx(expected, rel=1e-9)
    # a rotation applied to both sets keeps the distance (the trace term is not diagonal any more)
    rot, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64))
    assert M.fid(a @ rot, b @ rot) == pytest.approx(expected, rel=1e-9)


def test_fid_grows_with_feature_noise():
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(1000, 8, generator=gen)
    noise = torch.randn(1000, 8, generator=gen)
    fids = [M.fid(a, a + s * noise) for s in (0.0, 0.3, 1.0, 3.0)]
    assert fids == sorted(fids) and fids[0] < fids[1]


def test_fid_grows_with_image_noise_and_blur(tiny):
    model, _, _ = tiny
    real, _ = blob_digits(500, seed=10)
    fake, _ = blob_digits(500, seed=11)
    ref = feats_of(model, real)
    noisy = [M.fid(ref, feats_of(model, (fake + s * torch.randn_like(fake)).clamp(-1, 1)))
             for s in (0.0, 0.3, 0.7, 1.5)]
    assert noisy == sorted(noisy), noisy
    blurred = [M.fid(ref, feats_of(model, F.avg_pool2d(fake, k, 1, k // 2, count_include_pad=False)))
               for k in (1, 3, 7, 13)]
    assert blurred == sorted(blurred), blurred


# --- KID, precision / recall -------------------------------------------------

def test_kid_near_zero_for_same_set_and_larger_when_shifted():
    gen = torch.Generator().manual_seed(6)
    a = torch.randn(2000, 16, generator=gen)
    same, _ = M.kid_over_subsets(a, a.clone(), num_subsets=20, subset_size=500)
    shifted, std = M.kid_over_subsets(a, a + 0.5, num_subsets=20, subset_size=500)
    assert std >= 0
    assert abs(same) < 0.05 * shifted


def test_kid_is_unbiased_for_two_independent_samples_of_one_distribution():
    """E[MMD^2_u] = 0 when both sets come from the same distribution; keeping the diagonal k(x, x)
    (the biased estimator) adds about 2 (E k(x, x) - E k(x, y)) / m, here ~0.1 at m = 100."""
    gen = torch.Generator().manual_seed(7)
    a, b = torch.randn(3000, 16, generator=gen), torch.randn(3000, 16, generator=gen)
    mean, std = M.kid_over_subsets(a, b, num_subsets=200, subset_size=100)
    assert abs(mean) < 4 * std / math.sqrt(200)  # within four standard errors of 0
    assert abs(mean) < 0.02


def clusters(centres, n_per, seed, spread=0.05):
    gen = torch.Generator().manual_seed(seed)
    return torch.cat([c + spread * torch.randn(n_per, len(c), generator=gen) for c in centres])


def test_precision_recall_tell_a_half_covering_generator_from_a_noisy_one():
    """Real data in 10 tight clusters (in 2-D, where 3-NN balls of 200 points cover another sample of
    the same cluster almost entirely); samples that cover 5 of them are all realistic (precision ~1)
    but miss half the data (recall ~1/2); swapping the arguments swaps the two."""
    angles = torch.arange(10) * 2 * math.pi / 10
    centres = 3 * torch.stack([angles.cos(), angles.sin()], 1)
    real = clusters(centres, 200, seed=0)
    half = clusters(centres[:5], 200, seed=1)
    precision, recall = M.precision_recall(real, half)
    assert precision > 0.95 and abs(recall - 0.5) < 0.05
    swapped = M.precision_recall(half, real)
    assert abs(swapped[0] - 0.5) < 0.05 and swapped[1] > 0.95


def test_knn_radius_is_the_distance_to_the_kth_other_point():
    """Points 0, 1, ..., 9 on a line: the 3rd nearest other point of an interior point is 2 away
    (1, 1, 2), of an end point 3 away."""
    line = torch.arange(10, dtype=torch.float64)[:, None]
    radii = M.knn_radii(line, k=3)
    assert radii[0] == radii[-1] == 3 and radii[1] == radii[-2] == 2
    assert torch.all(radii[2:-2] == 2)


def test_precision_recall():
    gen = torch.Generator().manual_seed(7)
    real = torch.randn(300, 8, generator=gen)
    near = real + 0.3 * torch.randn(300, 8, generator=gen)
    far = real + 20.0
    assert M.precision_recall(real, real.clone(), chunk=64) == (1.0, 1.0)
    p_near, r_near = M.precision_recall(real, near, chunk=64)
    p_far, r_far = M.precision_recall(real, far, chunk=64)
    for v in (p_near, r_near, p_far, r_far):
        assert 0.0 <= v <= 1.0
    assert p_far == 0.0 and p_far < p_near


def test_precision_recall_chunking_does_not_matter():
    gen = torch.Generator().manual_seed(8)
    real, fake = torch.randn(200, 4, generator=gen), torch.randn(150, 4, generator=gen) + 0.5
    assert M.precision_recall(real, fake, chunk=7) == M.precision_recall(real, fake, chunk=1000)


# --- class statistics, memorisation -----------------------------------------

def test_class_entropy():
    uniform = M.class_histogram(torch.arange(100) % 10)
    assert uniform.sum().item() == pytest.approx(1.0)
    assert M.normalized_entropy(uniform) == pytest.approx(1.0, abs=1e-12)
    single = M.normalized_entropy(M.class_histogram(torch.full((50,), 3)))
    assert single == 0.0 and math.copysign(1, single) == 1  # not -0.0 in the table


def test_confidence_stats():
    probs = torch.tensor([[0.95, 0.05], [0.5, 0.5], [0.2, 0.8], [0.0, 1.0]])
    mean, frac = M.confidence_stats(probs)
    assert mean == pytest.approx((0.95 + 0.5 + 0.8 + 1.0) / 4)
    assert frac == 0.5


def test_nearest_train_distance():
    train, _ = blob_digits(300, seed=12)
    copies = train[torch.tensor([0, 17, 299, 17])]
    assert torch.equal(M.nearest_train_distance(copies, train, chunk=3), torch.zeros(4))
    other, _ = blob_digits(20, seed=13)
    d = M.nearest_train_distance(other, train)
    brute = torch.cdist(other.flatten(1).double(), train.flatten(1).double()).min(1).values
    assert torch.allclose(d.double(), brute, atol=1e-3)


# --- classifier cache ----------------------------------------------------------

def test_classifier_learns_blobs(tiny):
    assert tiny[1] > 0.9


def test_classifier_cache_round_trip(tiny, tmp_path):
    model, acc, (x, *_ ) = tiny
    path = str(tmp_path / "classifier.pt")
    E.save_classifier(path, model, acc, TINY)
    loaded, loaded_acc = E.load_classifier(path, TINY)
    assert loaded_acc == pytest.approx(acc)
    f1, p1 = E.classifier_outputs(model, x[:50])
    f2, p2 = E.classifier_outputs(loaded, x[:50])
    assert torch.equal(f1, f2) and torch.equal(p1, p2)
    assert not os.path.exists(path + ".tmp")
    logs = []
    _, again = E.get_classifier(path, *tiny[2], arch=TINY, log=logs.append)
    assert again == pytest.approx(acc) and "training" not in " ".join(logs)


def bad_cache(path, kind, model):
    if kind == "garbage":
        path.write_bytes(b"\x00 definitely not a torch file \xff" * 10)
    elif kind == "wrong_keys":
        torch.save({"weights": model.state_dict()}, path)
    elif kind == "wrong_shapes":
        other = E.Classifier(c1=3, c2=8, hidden=16)
        torch.save({"state_dict": other.state_dict(), "test_acc": 1.0, "arch": TINY}, path)
    elif kind == "other_arch":
        torch.save({"state_dict": model.state_dict(), "test_acc": 1.0, "arch": TINY}, path)


@pytest.mark.parametrize("kind", ["garbage", "wrong_keys", "wrong_shapes", "other_arch"])
def test_corrupt_cache_triggers_retraining(tiny, tmp_path, kind):
    model, _, data = tiny
    path = tmp_path / "classifier.pt"
    bad_cache(path, kind, model)
    arch = dict(TINY, hidden=12) if kind == "other_arch" else TINY
    logs = []
    new, acc = E.get_classifier(str(path), *data, arch=arch, epochs=1, batch_size=64, log=logs.append)
    assert "retraining" in logs[0]
    assert 0.0 <= acc <= 1.0 and new.fc1.out_features == arch["hidden"]
    assert E.load_classifier(str(path), arch)[1] == pytest.approx(acc)  # replaced by a good one


# --- evaluate_images on a tiny fake MNIST folder ----------------------------

def write_idx(path, array, magic):
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", s) for s in array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def fake_mnist(root, tiny):
    _, _, (x, y, tx, ty) = tiny
    to_u8 = lambda im: ((im[:, 0] + 1) * 127.5).round().clamp(0, 255).byte().numpy()
    write_idx(root / "train-images-idx3-ubyte", to_u8(x), 2051)
    write_idx(root / "train-labels-idx1-ubyte", y.numpy(), 2049)
    write_idx(root / "t10k-images-idx3-ubyte", to_u8(tx), 2051)
    write_idx(root / "t10k-labels-idx1-ubyte", ty.numpy(), 2049)
    return E.to_float(torch.from_numpy(to_u8(x)))  # the train images as MNIST reads them


def test_evaluate_images_end_to_end(tiny, tmp_path, monkeypatch):
    model, acc, _ = tiny
    train_x = fake_mnist(tmp_path, tiny)
    samples = train_x[:60]  # pure copies of training digits
    kw = dict(classifier=(model, acc), log=quiet)
    result = E.evaluate_images(samples, str(tmp_path), **kw)
    s, floor = result["samples"], result["floor"]
    assert s["nearest_train_l2"] == 0.0 and floor["nearest_train_l2"] > 0
    for res in (s, floor):
        assert res["n"] == 60 and 0 <= res["precision"] <= 1 and 0 <= res["recall"] <= 1
        assert sum(res["class_hist"]) == pytest.approx(1.0) and 0 <= res["class_entropy"] <= 1
    json.dumps(result)  # everything is plain JSON
    assert E.format_table(result).count("\n") >= len(E.ROWS)

    # the floor now comes from the cache: computing it again would fail
    monkeypatch.setattr(E, "real_floor", lambda *a, **k: pytest.fail("floor not cached"))
    assert E.evaluate_images(samples, str(tmp_path), **kw)["floor"] == floor


def test_score_reports_kid_over_the_full_sets_with_its_standard_error(tiny):
    model, _, (x, _, tx, _) = tiny
    real_feats = feats_of(model, tx)
    r = E.score(x, model, real_feats)
    rms = real_feats.double().square().mean().sqrt()
    assert (r["kid"], r["kid_se"]) == M.kid(feats_of(model, x) / rms, real_feats / rms)
    assert r["kid_se"] > 0
    row = dict(r, nearest_train_l2=0.0)
    table = E.format_table({"samples": row, "floor": row, "split": "test", "classifier_val_acc": 1.0})
    assert f"KID standard error{r['kid_se']:>22.4g}" in table


# --- command line ------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    ([], "one of the arguments --ckpt --images is required"),
    (["--ckpt", "a.pt", "--images", "dir"], "not allowed with"),
])
def test_cli_needs_exactly_one_source(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        E.main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_cli_rejects_missing_checkpoint_and_bad_pngs(tmp_path, capsys):
    with pytest.raises(SystemExit):
        E.main(["--ckpt", str(tmp_path / "nope.pt")])
    assert "not found" in capsys.readouterr().err
    Image.new("L", (56, 28)).save(tmp_path / "grid.png")
    with pytest.raises(SystemExit) as exc:
        E.main(["--images", str(tmp_path), "--data", str(tmp_path / "data")])
    assert "28x28" in str(exc.value.code)


def test_png_folder_round_trip(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    for i, p in enumerate(pixels):
        Image.fromarray(p).save(tmp_path / f"{i:03d}.png")
    images = E.load_png_folder(str(tmp_path))
    assert images.shape == (5, 1, 28, 28) and images.min() >= -1 and images.max() <= 1
    assert torch.equal(images, E.to_float(torch.from_numpy(pixels)))
    assert len(E.load_png_folder(str(tmp_path), limit=2)) == 2


def test_label_accuracy_for_conditional_samples(tiny):
    model, _, (x, y, tx, ty) = tiny
    real_feats = feats_of(model, tx)
    asked = y.clone()
    asked[:100] = (asked[:100] + 1) % 10  # the first 100 were "asked" for the wrong digit
    r = E.score(x, model, real_feats, labels=asked)
    read = E.classifier_outputs(model, x)[1].argmax(1)
    assert r["label_accuracy"] == pytest.approx((read == asked).float().mean().item())
    for d in range(10):
        assert r["per_digit_accuracy"][d] == pytest.approx((read == asked)[asked == d].float().mean().item())
    assert r["label_accuracy"] < E.score(x, model, real_feats, labels=y)["label_accuracy"]


def test_a_broken_png_is_a_one_line_error(tmp_path):
    for i in range(4):
        Image.new("L", (28, 28)).save(tmp_path / f"{i}.png")
    (tmp_path / "4.png").write_bytes((tmp_path / "0.png").read_bytes()[:40])  # cut off mid-file
    with pytest.raises(SystemExit) as exc:
        E.main(["--images", str(tmp_path), "--data", str(tmp_path / "data")])
    assert "4.png is not a readable PNG" in str(exc.value.code) and "\n" not in str(exc.value.code)


# --- inpainting read back (measure_editing) ---------------------------------

def tiny_checkpoint(tmp_path):
    """An untrained tiny DDPM: enough to run every fill and round trip end to end."""
    cfg = merge(DEFAULTS, {"model": TINY_DDPM["model"], "diffusion": {"num_timesteps": 20}})
    torch.manual_seed(0)
    model, _ = build(cfg)
    path = str(tmp_path / "run" / "last.pt")
    save_checkpoint(path, {"model": model.state_dict(), "ema": model.state_dict(), "optimizer": {}, "step": 0,
                           "config": cfg})
    return path


def test_nearest_fill_takes_the_hole_of_the_training_image_nearest_on_the_known_pixels():
    gen = torch.Generator().manual_seed(0)
    train = torch.rand(50, 1, 28, 28, generator=gen) * 2 - 1
    images = torch.rand(5, 1, 28, 28, generator=gen) * 2 - 1
    keep = (torch.rand(1, 28, 28, generator=gen) > 0.4).float()
    known = keep.expand_as(images) > 0.5
    images[2] = torch.where(known[2], train[37], images[2])  # train[37] on the known pixels
    filled = E.nearest_fill(images, keep, train, chunk=7)  # chunks that do not divide the training set
    assert torch.equal(filled[known], images[known])
    for i, image in enumerate(images):
        distances = [(image - t)[known[i]].double().square().sum().item() for t in train]
        nearest = train[distances.index(min(distances))]
        assert torch.equal(filled[i][~known[i]], nearest[~known[i]])
    assert torch.equal(filled[2], train[37])


def test_measure_editing_rows_and_baselines(tmp_path, mnist_root):
    ckpt = tiny_checkpoint(tmp_path)
    res = E.measure_editing(ckpt, mnist_root, num_images=6, settings=((3, 1, 1), (4, 2, 2), (4, 2, 2, "noisy_end")),
                            round_trip_steps=(4,), round_trip_images=3, completions=2, split="val", log=quiet)
    baselines = ["original (upper bound)", "hole left black (background)", "noise fill",
                 "nearest training image on the known half"]
    repaint = {"RePaint, ddpm 3 steps, no resampling": (3, 1, 1),
               "RePaint, ddpm 4 steps, jumps 2, resample 2, clean_end": (4, 2, 2),
               "RePaint, ddpm 4 steps, jumps 2, resample 2, noisy_end": (4, 2, 2, "noisy_end")}
    assert list(res["rows"]) == baselines + list(repaint) and list(res["round_trip"]) == ["4 steps, autoguidance 1"]
    assert res["num_images"] == 6 and res["mask"] == "bottom"
    for r in res["rows"].values():
        assert 0 <= r["read_back"] <= 1 and 0 <= r["hole_abs_err"] <= 2
    for name, setting in repaint.items():
        r = res["rows"][name]
        assert r["network_steps"] == editing.network_steps(*setting) and 0 <= r["majority"] <= 1 and r["seconds"] > 0
    for r in res["round_trip"].values():
        assert 0 <= r["mean_abs"] <= r["max_abs"] <= 2

    clf, acc = E.load_classifier(os.path.join(mnist_root, E.CLASSIFIER_FILE), E.ARCH)  # trained and cached by the run
    val = MNIST(mnist_root, "val")  # the split asked for, not the test images
    images, labels = E.to_float(val.images[:6]), val.labels[:6]
    hole = editing.make_mask("bottom").expand_as(images) < 0.5
    original, black = res["rows"]["original (upper bound)"], res["rows"]["hole left black (background)"]
    assert res["classifier_val_acc"] == pytest.approx(acc)
    assert original["read_back"] == pytest.approx(E.accuracy(clf, images, labels)) and original["hole_abs_err"] == 0
    assert black["hole_abs_err"] == pytest.approx((images[hole] + 1).mean().item())


def test_measure_editing_refuses_a_fill_that_changes_known_pixels(tmp_path, mnist_root, monkeypatch):
    inpaint = editing.inpaint

    def tampered(*args, **kwargs):
        out = inpaint(*args, **kwargs).clone()
        out[0, 0, 0, 0, 0] += 0.5  # the top row is known under the bottom mask
        return out

    monkeypatch.setattr(editing, "inpaint", tampered)
    with pytest.raises(RuntimeError, match="changed known pixels"):
        E.measure_editing(tiny_checkpoint(tmp_path), mnist_root, num_images=2, settings=((2, 1, 1),), baselines=False,
                          round_trip_steps=(), log=quiet)


def test_inpaint_eval_cli_prints_both_tables(tmp_path, mnist_root, capsys):
    E.main(["--ckpt", tiny_checkpoint(tmp_path), "--data", mnist_root, "--verify_data", "false", "--device", "cpu",
            "--inpaint_eval", "3", "--repaint", "2:1:1", "--round_trip_steps", "3"])
    out = capsys.readouterr().out
    assert "3 MNIST test images, mask bottom" in out
    assert "| fill | read back as the true digit |" in out and "| DDIM encode + decode |" in out
    for row in ["| original (upper bound) |", "| nearest training image on the known half |",
                "| RePaint, ddpm 2 steps, no resampling |", "| 3 steps, autoguidance 1 |"]:
        assert row in out


# --- asking for a digit: the judge -------------------------------------------

def test_a_conditional_evaluation_reports_what_a_second_classifier_reads_per_digit(tmp_path, mnist_root):
    cfg = merge(DEFAULTS, {"model": dict(TINY_DDPM["model"], num_classes=10), "diffusion": {"num_timesteps": 20}})
    torch.manual_seed(0)
    model = randomised(build(cfg)[0])
    ckpt = str(tmp_path / "cond" / "last.pt")
    save_checkpoint(ckpt, {"model": model.state_dict(), "ema": model.state_dict(), "optimizer": {}, "step": 0,
                           "config": cfg})
    E.main(["--ckpt", ckpt, "--num_samples", "20", "--steps", "3", "--guidance_sweep", "0,2", "--data", mnist_root,
            "--verify_data", "false", "--device", "cpu"])
    (name,) = [f for f in os.listdir(tmp_path / "cond") if f.startswith("eval_")]
    result = json.load(open(tmp_path / "cond" / name))
    assert [row["guidance"] for row in result["guidance_sweep"]] == [0.0, 2.0]

    # the judge is its own classifier (another width and seed), cached beside the first one
    judge, acc = E.load_classifier(os.path.join(mnist_root, E.JUDGE_FILE), E.JUDGE_ARCH)
    first, _ = E.load_classifier(os.path.join(mnist_root, E.CLASSIFIER_FILE), E.ARCH)
    assert judge.fc1.out_features != first.fc1.out_features and result["judge"]["val_acc"] == pytest.approx(acc)
    # and its per-digit figures are its readings of the samples asked for each digit (20 samples: 2 per digit)
    images, labels = E.sample_from_checkpoint(E.parse_args(["--ckpt", ckpt, "--num_samples", "20", "--steps", "3",
                                                            "--device", "cpu"]), None)
    read = E.classifier_outputs(judge, images)[1].argmax(1)
    assert result["judge"]["per_digit_accuracy"] == pytest.approx(
        [(read[labels == d] == d).float().mean().item() for d in range(10)])
