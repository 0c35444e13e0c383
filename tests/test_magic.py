"Tests of minisd.magic: finite differences vs autograd, the Gaussian part, the DSM step, following the gradient raises f."
import math
import pytest, torch
from torch import nn
from minisd.magic import (MagicModel, autograd_grad, finite_diff_grad, follow_gradient, dsm_step, sample_sigmas,
                          SIGMA_MIN, SIGMA_MAX)


def fake_digits(n=64, seed=0):
    "Blurry random strokes in [0,1]: a stand-in for digits with a non-trivial covariance."
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 1, 28, 28)
    for i in range(n):
        r, c = torch.randint(6, 20, (2,), generator=g).tolist()
        x[i, 0, r:r+8, c:c+2] = 1; x[i, 0, r:r+2, c:c+6] = 1
    return nn.functional.avg_pool2d(x, 3, 1, 1)


def random_model(seed=0, dtype=torch.float64):
    "A MagicModel with a fitted Gaussian and a random (non-zero) MLP."
    torch.manual_seed(seed)
    m = MagicModel(nh=32).fit_gaussian(fake_digits())
    nn.init.normal_(m.net[-1].weight, std=0.5); nn.init.normal_(m.net[-1].bias)
    return m.to(dtype)


def test_finite_diff_matches_autograd_all_pixels():
    m = random_model()
    x = fake_digits(1, 3).double() + 0.2 * torch.randn(1, 1, 28, 28, dtype=torch.float64)
    for sigma in (0.05, 0.5, 2.0):
        f = lambda o: m(o, sigma)
        ad, fd = autograd_grad(f, x), finite_diff_grad(f, x, eps=1e-5)
        assert ad.shape == x.shape and ad.abs().max() > 1e-3
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
    m = random_model()
    x = fake_digits(4).double()
    g = autograd_grad(lambda o: m(o, 0.3), x)
    for i in range(4): torch.testing.assert_close(g[i:i+1], autograd_grad(lambda o: m(o, 0.3), x[i:i+1]))
    assert not g.requires_grad and not x.requires_grad


def test_untrained_model_is_the_gaussian():
    "Zero-initialised last layer: f is exactly log N(x; mu, Sigma + sigma^2 I) up to a constant."
    x = fake_digits(200)
    m = MagicModel(nh=16).fit_gaussian(x).double()
    d = (x[:3].flatten(1) - x.flatten(1).mean(0)).double()
    cov = torch.cov(x.flatten(1).T).double() + 0.3**2 * torch.eye(784, dtype=torch.float64)
    want = -0.5 * (d @ torch.linalg.solve(cov, d.T)).diagonal()
    torch.testing.assert_close(m(x[:3].double(), 0.3), want, rtol=1e-4, atol=1e-3)


def test_sample_sigmas_range():
    s = sample_sigmas(10000, generator=torch.Generator().manual_seed(0))
    assert SIGMA_MIN <= s.min() and s.max() <= SIGMA_MAX
    # log-uniform: the median is the geometric mean of the range
    assert abs(s.median().log().item() - 0.5 * (math.log(SIGMA_MIN) + math.log(SIGMA_MAX))) < 0.1


class _Learn:
    def __init__(self, m): self.model, self.training = m, True


def test_dsm_step_is_the_dsm_loss_and_trains():
    "dsm_step computes ||-sigma grad f(x0 + sigma eps) - eps||^2, and gradient descent on it lowers it."
    x = fake_digits(32)
    m = random_model(dtype=torch.float32)
    learn = _Learn(m)
    torch.manual_seed(1); loss = dsm_step(learn, (x,))
    torch.manual_seed(1)
    sigma = sample_sigmas(len(x)); eps = torch.randn_like(x)
    g = autograd_grad(lambda o: m(o, sigma), x + sigma.view(-1, 1, 1, 1) * eps)
    torch.testing.assert_close(loss, ((-sigma.view(-1, 1, 1, 1) * g - eps)**2).mean())
    # trainable through the gradient (create_graph): every layer gets a gradient, and steps on a fixed batch lower it
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in m.net.named_parameters() if not n.endswith('4.bias'))
    opt = torch.optim.Adam(m.parameters(), 3e-3)
    losses = []
    for _ in range(20):
        torch.manual_seed(1); l = dsm_step(learn, (x,)); losses.append(l.item())
        opt.zero_grad(); l.backward(); opt.step()
    assert losses[-1] < 0.9 * losses[0]
    # in eval (validation under no_grad) it still works, without building a graph
    learn.training = False
    with torch.no_grad(): assert not dsm_step(learn, (x,)).requires_grad


def test_following_the_gradient_raises_f():
    m = random_model(dtype=torch.float32)
    traj = follow_gradient(m, n=8, steps=12, generator=torch.Generator().manual_seed(0))
    assert traj.shape == (14, 8, 1, 28, 28)
    sig = torch.exp(torch.linspace(math.log(SIGMA_MAX), math.log(SIGMA_MIN), 13))
    with torch.no_grad():
        for k in range(12):  # each step goes uphill at its noise level
            assert (m(traj[k+1], sig[k]) > m(traj[k], sig[k])).all(), k
        # and the end is far more probable than the start, judged at the smallest noise level
        assert m(traj[-1], SIGMA_MIN).mean() > m(traj[0], SIGMA_MIN).mean() + 1000
    # an explicit start and a generator make it reproducible
    x0 = torch.randn(2, 1, 28, 28)
    a, b = follow_gradient(m, x=x0, steps=3), follow_gradient(m, x=x0, steps=3)
    assert torch.equal(a, b) and torch.equal(a[0], x0)
