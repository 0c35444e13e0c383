"""minisd.guidance: the MNIST sampler's settings, classifier-free guidance algebra, `generate`, save/load and training."""
import json
import pytest
import torch
from minisd.guidance import (CLASS_SCHEDULE, ClassifierFreeGuidance, best_guidance_scale, class_unet_config, generate, load_unet, mnist_scheduler,
                             save_unet, train_class_unet)
from minisd.schedulers import DDIMScheduler, DDPMScheduler
from minisd.unet import UNet


@pytest.fixture(scope='module')
def unet():
    torch.manual_seed(0)
    return UNet(class_unet_config(sample_size=8, block_out_channels=(8, 16, 16), norm_num_groups=4)).eval()


def test_mnist_scheduler_does_not_clip_and_uses_the_training_schedule():
    ddim, ddpm = mnist_scheduler(), mnist_scheduler('ddpm')
    assert isinstance(ddim, DDIMScheduler) and isinstance(ddpm, DDPMScheduler)
    for s in (ddim, ddpm):
        assert s.config.clip_sample is False
        torch.testing.assert_close(s.alphas_cumprod, DDPMScheduler(**CLASS_SCHEDULE).alphas_cumprod)
    assert ddim.config.timestep_spacing == 'trailing'
    ddim.set_timesteps(25)
    assert ddim.timesteps[0] == 999 and len(ddim.timesteps) == 25       # 'trailing' starts from pure noise
    assert mnist_scheduler(clip_sample=True).config.clip_sample is True  # overrides win


def test_mnist_scheduler_unknown_kind():
    with pytest.raises(ValueError, match="unknown sampler 'euler'"): mnist_scheduler('euler')


def test_cfg_algebra(unet):
    x, t, c = torch.randn(4, 1, 8, 8), torch.tensor(500), torch.tensor([1, 2, 3, 4])
    with torch.no_grad():
        e_c, e_u = unet(x, t, class_labels=c), unet(x, t, class_labels=torch.full((4,), 10))
        e_n = unet(x, t, class_labels=torch.full((4,), 7))
        torch.testing.assert_close(ClassifierFreeGuidance(unet, c, 1.)(x, t), e_c)
        torch.testing.assert_close(ClassifierFreeGuidance(unet, c, 0.)(x, t), e_u, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ClassifierFreeGuidance(unet, c, 3.)(x, t), e_u + 3 * (e_c - e_u), atol=1e-5, rtol=1e-5)
        # negative conditioning: one label broadcast as eps_u
        torch.testing.assert_close(ClassifierFreeGuidance(unet, c, 2., torch.tensor(7))(x, t), e_n + 2 * (e_c - e_n),
                                   atol=1e-5, rtol=1e-5)


def test_generate_defaults_to_the_unclipped_sampler(unet):
    labels = torch.arange(6) % 10
    a = generate(unet, labels, 2., 5, seed=3)
    assert a.shape == (6, 1, 8, 8) and a.min() >= 0 and a.max() <= 1
    torch.testing.assert_close(a, generate(unet, labels, 2., 5, scheduler=mnist_scheduler(), seed=3))
    # an untrained net predicts x0 far outside [-1, 1]: a clipping scheduler gives other images
    assert not torch.allclose(a, generate(unet, labels, 2., 5, scheduler=mnist_scheduler(clip_sample=True), seed=3))
    assert not torch.allclose(a, generate(unet, labels, 2., 5, seed=4))


def test_generate_with_ddpm(unet):
    x = generate(unet, torch.tensor([0, 1]), 1., 4, scheduler=mnist_scheduler('ddpm'), seed=0)
    assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all()
    assert not torch.allclose(x, generate(unet, torch.tensor([0, 1]), 1., 4, seed=0))   # not the DDIM default


def test_best_guidance_scale():
    r = lambda fid, acc: dict(fid=fid, prompt_accuracy=acc)
    res = {1.: r(0.3, 0.96), 1.1: r(0.5, 0.94), 1.25: r(0.8, 0.97), 2.: r(3., 0.99)}
    assert best_guidance_scale(res) == 1.25                  # s = 1 is not guidance; 1.1 misses 95%
    assert best_guidance_scale(res, min_accuracy=0.9) == 1.1
    assert best_guidance_scale({2.: r(3., 0.5), 3.: r(5., 0.6)}) == 2.   # none reaches it: the best FID
    with pytest.raises(ValueError, match='no guided scale'): best_guidance_scale({1.: r(0.3, 0.96)})


def test_save_load_roundtrip(unet, tmp_path):
    save_unet(unet, tmp_path / 'm')
    assert json.loads((tmp_path / 'm' / 'config.json').read_text())['num_class_embeds'] == 11
    back = load_unet(tmp_path / 'm')
    assert not back.training
    x, t, c = torch.randn(2, 1, 8, 8), torch.tensor(10), torch.tensor([3, 10])
    with torch.no_grad(): torch.testing.assert_close(back(x, t, class_labels=c), unet(x, t, class_labels=c))


def test_train_class_unet_tiny():
    learn = train_class_unet(epochs=1, n_train=64, progress=False, sample_size=28, block_out_channels=(8, 8, 8),
                             norm_num_groups=4)
    assert learn.n_steps == 2 and not learn.model.training                      # 64 digits, batches of 32
    assert learn.model.config.num_class_embeds == 11
    assert len(learn.recorder.losses) == 2 and all(0 < l < 10 for l in learn.recorder.losses)   # one finite loss per step


@pytest.mark.parametrize('labels', [[3, 11], [-1], [[1, 2]], [1.5], []])
def test_generate_rejects_bad_labels(unet, labels):
    with pytest.raises(ValueError, match=r'class ids in \[0, 10\]'): generate(unet, labels, 2., 2)


def test_generate_rejects_a_bad_negative_label(unet):
    with pytest.raises(ValueError, match='uncond_labels'): generate(unet, [1, 2], 2., 2, uncond_labels=12)


def test_snr_weights_favour_the_noisy_steps():
    "1 + min(1/SNR, cap), mean 1: flat at the cap for the noisiest steps, rising with t, and the cap's ratio kept."
    from minisd.guidance import snr_weights
    sched = DDPMScheduler(**CLASS_SCHEDULE)
    w = snr_weights(sched)
    ab = sched.alphas_cumprod.double()
    ref = 1 + ((1 - ab) / ab).clamp(max=20)
    torch.testing.assert_close(w, (ref / ref.mean()).float())
    assert w.shape == (1000,) and torch.all(w[1:] >= w[:-1]) and w[-1] == w.max() and w[-1] / w[0] > 20
    torch.testing.assert_close(snr_weights(sched, 0.), torch.ones(1000))   # cap 0: the simple loss
    with pytest.raises(ValueError, match='max_weight'): snr_weights(sched, -1.)


def test_widen_conv_in_new_channels_start_silent():
    "A widened U-Net ignores its new input channels until trained; the old channels keep their weights."
    from minisd.guidance import widen_conv_in
    u = UNet(class_unet_config(num_class_embeds=None))
    w = widen_conv_in(u, 11)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad(): torch.testing.assert_close(w(torch.cat([x, torch.randn(2, 10, 28, 28)], 1), 10), u(x, 10))
    assert w.config.in_channels == 11 and torch.equal(w.conv_in.weight[:, :1], u.conv_in.weight)


def test_cfg_step_passes_its_weights_to_the_loss():
    "Zero weights give a zero loss, ones the plain loss (the same random draws)."
    from types import SimpleNamespace
    from minisd.guidance import cfg_step
    sched = DDPMScheduler(**CLASS_SCHEDULE)
    learn = SimpleNamespace(model=UNet(class_unet_config()))
    batch = (torch.rand(4, 1, 28, 28) * 2 - 1, torch.tensor([1, 2, 3, 4]))
    assert cfg_step(sched, weights=torch.zeros(1000))(learn, batch).item() == 0
    torch.manual_seed(0); plain = cfg_step(sched)(learn, batch)
    torch.manual_seed(0); torch.testing.assert_close(cfg_step(sched, weights=torch.ones(1000))(learn, batch), plain)
