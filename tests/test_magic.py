"Tests of minisd.magic: finite differences vs autograd, the denoiser's score (Tweedie), the DSM step, the probability-flow walk."
import math
import pytest, torch
from torch import nn
from minisd.magic import (MagicModel, autograd_grad, finite_diff_grad, follow_gradient, dsm_step, sample_sigmas,
                          karras_sigmas, SIGMA_MIN, SIGMA_MAX)


def fake_digits(n=64, seed=0):
    "Blurry random strokes in [0,1]: a stand-in for digits."
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 1, 28, 28)
    for i in range(n):
        r, c = torch.randint(6, 20, (2,), generator=g).tolist()
        x[i, 0, r:r+8, c:c+2] = 1; x[i, 0, r:r+2, c:c+6] = 1
    return nn.functional.avg_pool2d(x, 3, 1, 1)


def smooth_net(seed=0):
    "A small smooth (SiLU) conv net scoring images: f(x) -> (B,), float64."
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.SiLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.SiLU(),
                        nn.Flatten(), nn.Linear(4 * 14 * 14, 1)).double()
    return lambda x: net(x).squeeze(1)


def random_model(seed=0):
    "A MagicModel whose last layer is random (not the zero init), so its score depends on the network."
    torch.manual_seed(seed)
    m = MagicModel(nf=8)
    nn.init.normal_(m.out.weight, std=0.1); nn.init.normal_(m.out.bias, std=0.1)
    return m.eval()


def test_finite_diff_matches_autograd_all_pixels():
    f = smooth_net()
    x = fake_digits(1, 3).double() + 0.2 * torch.randn(1, 1, 28, 28, dtype=torch.float64)
    ad, fd = autograd_grad(f, x), finite_diff_grad(f, x, eps=1e-5)
    assert ad.shape == x.shape and ad.abs().max() > 1e-4
    torch.testing.assert_close(fd, ad, rtol=1e-5, atol=1e-6 * ad.abs().max().item())


def test_finite_diff_subset_and_known_function():
    f = lambda o: (o**3).flatten(1).sum(1)
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    g = finite_diff_grad(f, x, idx=[0, 7, 17])
    flat = g.flatten()
    torch.testing.assert_close(flat[[0, 7, 17]], 3 * x.flatten()[[0, 7, 17]]**2, rtol=1e-6, atol=1e-8)
    assert flat[[1, 2, 16]].abs().sum() == 0 and g.shape == x.shape


def test_autograd_grad_per_image():
    "A batch gives each image's own gradient (images don't interact); no graph leaks out."
    f = smooth_net()
    x = fake_digits(4).double()
    g = autograd_grad(f, x)
    for i in range(4): torch.testing.assert_close(g[i:i+1], autograd_grad(f, x[i:i+1]))
    assert not g.requires_grad and not x.requires_grad


def test_untrained_model_is_a_gaussian_score():
    "Zero-initialised last layer: D = c_skip x, so the score is that of N(0, sigma_data² + sigma²): -x / (sd² + sigma²)."
    m = MagicModel(nf=8).eval()
    x = torch.randn(3, 1, 28, 28)
    for sigma in (0.05, 0.5, 5.):
        torch.testing.assert_close(m.score(x, sigma), -x / (0.31**2 + sigma**2), rtol=1e-5, atol=1e-5)


def test_score_is_tweedie_and_per_image_sigma():
    "score = (D - x) / sigma², and a (B,) sigma gives each image its own level."
    m = random_model()
    x = fake_digits(3)
    sig = torch.tensor([0.1, 0.5, 2.0])
    with torch.no_grad():
        s = m.score(x, sig)
        torch.testing.assert_close(s, (m(x, sig) - x) / sig.view(-1, 1, 1, 1)**2)
        for i in range(3): torch.testing.assert_close(s[i:i+1], m.score(x[i:i+1], sig[i].item()), rtol=1e-4, atol=1e-4)


def test_sample_sigmas_log_normal():
    s = sample_sigmas(20000, p_mean=-1.2, p_std=1.2, generator=torch.Generator().manual_seed(0))
    assert (s > 0).all()
    assert abs(s.log().mean().item() + 1.2) < 0.05 and abs(s.log().std().item() - 1.2) < 0.05


def test_karras_sigmas():
    s = karras_sigmas(10)
    assert len(s) == 11 and math.isclose(s[0].item(), SIGMA_MAX, rel_tol=1e-5) and math.isclose(s[-1].item(), SIGMA_MIN, rel_tol=1e-4)
    assert (s[1:] < s[:-1]).all()


class _Learn:
    def __init__(self, m): self.model, self.training = m, True


def test_dsm_step_is_the_weighted_denoising_loss_and_trains():
    "dsm_step = mean of (sigma² + sd²)/(sigma sd)² (D(x0 + sigma eps) - x0)²; gradient descent on it lowers it."
    x = fake_digits(32)
    m = random_model().train()
    learn = _Learn(m)
    torch.manual_seed(1); loss = dsm_step(learn, (x,))
    torch.manual_seed(1)
    sigma = sample_sigmas(len(x)); eps = torch.randn_like(x)
    s, sd = sigma.view(-1, 1, 1, 1), m.sigma_data
    want = ((s**2 + sd**2) / (s * sd)**2 * (m(x + s * eps, sigma) - x)**2).mean()
    torch.testing.assert_close(loss, want)
    # it is Vincent's DSM loss ||sigma * score + eps||² up to the weight sigma² (s² + sd²)/(s sd)²
    g = m.score(x + s * eps, sigma)
    torch.testing.assert_close(loss, ((s**2 + sd**2) / sd**2 * (s * g + eps)**2).mean(), rtol=1e-4, atol=1e-4)
    opt = torch.optim.Adam(m.parameters(), 3e-3)
    losses = []
    for _ in range(20):
        torch.manual_seed(1); l = dsm_step(learn, (x,)); losses.append(l.item())
        opt.zero_grad(); l.backward(); opt.step()
    assert losses[-1] < 0.9 * losses[0]


def test_follow_gradient_exact_gaussian():
    "With the exact score of Gaussian data N(mu, s²), the probability-flow walk turns noise into N(mu, s²)."
    mu, s = 0.3, 0.2
    score = lambda x, sigma: -(x - mu) / (s**2 + sigma**2)
    x_T = (s**2 + SIGMA_MAX**2) ** 0.5 * torch.randn(4000, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    traj = follow_gradient(score, x=x_T, steps=50)
    assert traj.shape == (52, 4000, 1, 2, 2) and torch.equal(traj[0], x_T)
    assert abs(traj[-1].mean().item() - mu) < 0.01 and abs(traj[-1].std().item() - s) < 0.01


def test_follow_gradient_ancestral_exact_gaussian():
    "noise=1 (ancestral steps) also turns noise into N(mu, s²) with the exact score (first order: many steps); noise=0 is the ODE."
    mu, s = 0.3, 0.2
    score = lambda x, sigma: -(x - mu) / (s**2 + sigma**2)
    x_T = (s**2 + SIGMA_MAX**2) ** 0.5 * torch.randn(4000, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    traj = follow_gradient(score, x=x_T, steps=200, noise=1., generator=torch.Generator().manual_seed(1))
    assert abs(traj[-1].mean().item() - mu) < 0.01 and abs(traj[-1].std().item() - s) < 0.015
    assert torch.equal(follow_gradient(score, x=x_T, steps=10, noise=0.), follow_gradient(score, x=x_T, steps=10))
    # the fresh noise changes the path, and a seeded generator reproduces it
    a = follow_gradient(score, x=x_T[:8], steps=10, noise=1., generator=torch.Generator().manual_seed(3))
    b = follow_gradient(score, x=x_T[:8], steps=10, noise=1., generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.allclose(a[-1], follow_gradient(score, x=x_T[:8], steps=10)[-1])


def test_follow_gradient_rejects_bad_noise():
    with pytest.raises(ValueError, match="noise must be in"): follow_gradient(lambda x, s: -x, n=1, noise=1.5)
    with pytest.raises(ValueError, match="noise must be in"): follow_gradient(lambda x, s: -x, n=1, noise=-0.1)


def test_follow_gradient_reproducible_with_a_model():
    m = random_model()
    a = follow_gradient(m.score, n=2, steps=3, generator=torch.Generator().manual_seed(0))
    b = follow_gradient(m.score, n=2, steps=3, generator=torch.Generator().manual_seed(0))
    assert a.shape == (5, 2, 1, 28, 28) and torch.equal(a, b) and torch.isfinite(a).all()
