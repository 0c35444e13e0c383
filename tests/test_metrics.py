"""minisd.metrics: Fréchet distance against closed forms and a NumPy reference, KID's unbiasedness, prompt accuracy."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from minisd.metrics import (frechet_distance, fid, gaussian_stats, sqrtm_psd, kid, mmd2_unbiased, prompt_accuracy,
                            classify, MnistClassifier, mnist_classifier, save_classifier, CLASSIFIER_PATH)


def _rand_spd(d, g, k=None):
    a = torch.randn(d, k or 2 * d, generator=g, dtype=torch.float64)
    return a @ a.T / a.shape[1]


def test_fid_of_a_set_with_itself_is_zero():
    f = torch.randn(500, 32, generator=torch.Generator().manual_seed(0))
    assert abs(fid(f, f)) < 1e-6


def test_frechet_distance_commuting_closed_form():
    # N(m1, a^2 I) vs N(m2, b^2 I) in d dims: |m1-m2|^2 + d (a - b)^2
    d, m1, m2 = 10, torch.zeros(10), torch.full((10,), 0.5)
    assert frechet_distance(m1, 4 * torch.eye(d), m2, 9 * torch.eye(d)) == pytest.approx(d * 0.25 + d * 1.0, rel=1e-9)
    # diagonal covariances: sum (sqrt(s1) - sqrt(s2))^2
    s1, s2 = torch.rand(d, dtype=torch.float64) + 0.1, torch.rand(d, dtype=torch.float64) + 0.1
    ref = ((s1.sqrt() - s2.sqrt()) ** 2).sum().item()
    assert frechet_distance(m1, torch.diag(s1), m1, torch.diag(s2)) == pytest.approx(ref, rel=1e-9)


def test_frechet_distance_matches_numpy_reference():
    # the textbook formula: trace of sqrtm(S1 S2) from the (real, non-negative) eigenvalues of the non-symmetric product
    g = torch.Generator().manual_seed(1)
    for d in (2, 7, 40):
        s1, s2, mu1, mu2 = _rand_spd(d, g), _rand_spd(d, g), torch.randn(d, generator=g), torch.randn(d, generator=g)
        ev = np.linalg.eigvals(s1.numpy() @ s2.numpy()).real.clip(0)
        ref = ((mu1 - mu2) ** 2).sum().item() + s1.trace().item() + s2.trace().item() - 2 * np.sqrt(ev).sum()
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-7, abs=1e-8)
    # singular (rank-deficient) covariances, as with fewer samples than feature dimensions
    s1, s2 = _rand_spd(20, g, k=5), _rand_spd(20, g, k=8)
    ev = np.linalg.eigvals(s1.numpy() @ s2.numpy()).real.clip(0)
    ref = s1.trace().item() + s2.trace().item() - 2 * np.sqrt(ev).sum()
    assert frechet_distance(torch.zeros(20), s1, torch.zeros(20), s2) == pytest.approx(ref, rel=1e-6, abs=1e-6)


def test_sqrtm_psd():
    s = _rand_spd(12, torch.Generator().manual_seed(2))
    r = sqrtm_psd(s)
    torch.testing.assert_close(r @ r, s)
    torch.testing.assert_close(r, r.T)


def test_fid_of_gaussian_samples_converges_to_formula():
    # samples of N(m1, S1) and N(m2, S2): the empirical FID approaches the closed form as n grows
    g = torch.Generator().manual_seed(3)
    d = 4
    s1, s2 = _rand_spd(d, g), _rand_spd(d, g)
    m1, m2 = torch.zeros(d, dtype=torch.float64), torch.full((d,), 0.3, dtype=torch.float64)
    exact = frechet_distance(m1, s1, m2, s2)
    n = 200_000
    x1 = m1 + torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(s1).T
    x2 = m2 + torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(s2).T
    assert fid(x1, x2) == pytest.approx(exact, rel=0.03, abs=3e-3)
    mu, sig = gaussian_stats(x1)
    torch.testing.assert_close(sig, s1, atol=0.03, rtol=0.03)


def test_kid_unbiased_near_zero_for_same_distribution():
    g = torch.Generator().manual_seed(4)
    draws = [(torch.randn(300, 16, generator=g), torch.randn(300, 16, generator=g)) for _ in range(20)]
    vals = np.array([kid(p, q, subsets=5, seed=i)[0] for i, (p, q) in enumerate(draws)])
    sem = vals.std(ddof=1) / np.sqrt(len(vals))
    assert abs(vals.mean()) < 4 * sem + 1e-4        # unbiased: zero on average for equal distributions
    # the biased (V-statistic) estimate, keeping the k(x, x) terms, is clearly positive on the same data
    k = lambda a, b: (a @ b.T / 16 + 1) ** 3
    biased = np.mean([(k(p, p).mean() + k(q, q).mean() - 2 * k(p, q).mean()).item() for p, q in draws])
    assert biased > 20 * sem               # ~40 standard errors away from 0
    p, q = torch.randn(300, 16, generator=g), torch.randn(300, 16, generator=g) + 0.5
    assert kid(p, q, subsets=10)[0] > 0.05


def test_mmd2_unbiased_matches_explicit_sum():
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    k = lambda a, b: (a @ b / 3 + 1) ** 3
    kxx = sum(k(x[i], x[j]) for i in range(6) for j in range(6) if i != j) / (6 * 5)
    kyy = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / (5 * 4)
    kxy = sum(k(x[i], y[j]) for i in range(6) for j in range(5)) / (6 * 5)
    assert mmd2_unbiased(x, y).item() == pytest.approx((kxx + kyy - 2 * kxy).item(), rel=1e-10)


def test_kid_rejects_tiny_sets():
    with pytest.raises(ValueError):
        kid(torch.randn(1, 4), torch.randn(10, 4))


def test_prompt_accuracy_on_known_predictions():
    preds = torch.tensor([3, 3, 1, 0, 9, 9, 9, 2])
    fake = lambda x: F.one_hot(preds[: len(x)], 10).float()   # a "classifier" with fixed answers
    imgs = torch.zeros(8, 1, 28, 28)
    assert prompt_accuracy(imgs, torch.tensor([3, 3, 1, 0, 9, 9, 9, 2]), fake) == 1.0
    assert prompt_accuracy(imgs, torch.tensor([3, 0, 1, 0, 0, 9, 0, 0]), fake) == 0.5
    assert prompt_accuracy(imgs, [0] * 8, fake) == pytest.approx(1 / 8)


def test_classifier_save_load_roundtrip(tmp_path):
    m = MnistClassifier().eval()
    p = save_classifier(m, tmp_path / 'c.safetensors')
    m2 = mnist_classifier(path=p)
    x = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(m2(x), m(x))
    with pytest.raises(FileNotFoundError):
        mnist_classifier(path=tmp_path / 'missing.safetensors')


@pytest.mark.skipif(not CLASSIFIER_PATH.exists(), reason='shipped classifier weights missing')
def test_shipped_classifier_accuracy_and_size():
    from minisd.data import load_mnist
    assert CLASSIFIER_PATH.stat().st_size < 1_000_000
    x, y = load_mnist('valid', source='embedded')
    feats, logits = classify(x, mnist_classifier())
    assert (logits.argmax(-1) == y).float().mean() > 0.98
    assert feats.shape == (len(x), 64) and feats.dtype == torch.float64


def test_shipped_classifier_has_no_opinion_off_the_digits():
    # outlier exposure (lesson 07): confident on real digits, never on noise or other non-digits
    from minisd.metrics import mnist_classifier, confident_share, non_digits
    from minisd.data import load_mnist
    clf = mnist_classifier()
    xv, _ = load_mnist('valid', 'embedded')
    g = torch.Generator().manual_seed(0)
    assert confident_share(xv, 0.9, clf) > 0.9
    assert confident_share(torch.rand(500, 1, 28, 28, generator=g), 0.9, clf) < 0.02
    assert confident_share(non_digits(xv[:500], g), 0.9, clf) < 0.05
    assert confident_share(torch.zeros(10, 1, 28, 28), 0.9, clf) == 0   # a blank page is no digit either


def test_non_digits_are_in_range_and_varied():
    from minisd.metrics import non_digits
    x = torch.rand(64, 1, 28, 28)
    nd = non_digits(x, torch.Generator().manual_seed(0))
    assert nd.shape == x.shape and nd.min() >= 0 and nd.max() <= 1
    assert len({round(float(o.mean()), 3) for o in nd}) > 32   # not one image repeated


def test_confident_share_threshold():
    from minisd.metrics import confident_share
    logits = torch.tensor([[10., 0, 0, 0, 0, 0, 0, 0, 0, 0], [1., 0, 0, 0, 0, 0, 0, 0, 0, 0]])
    f = lambda x: logits[:len(x)]
    x = torch.rand(2, 1, 28, 28)
    assert confident_share(x, 0.9, f) == 0.5 and confident_share(x, 0.2, f) == 1.0


def test_confident_share_rejects_a_threshold_that_is_no_probability():
    from minisd.metrics import confident_share
    with pytest.raises(ValueError, match="threshold"):
        confident_share(torch.rand(2, 1, 28, 28), 90, lambda x: torch.zeros(len(x), 10))


def test_non_digits_names_a_wrong_shape():
    from minisd.metrics import non_digits
    with pytest.raises(ValueError, match=r"\(B, C, H, W\).*\(28, 28\)"):
        non_digits(torch.rand(28, 28))
