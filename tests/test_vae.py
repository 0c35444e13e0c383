"VAE parity with diffusers' AutoencoderKL (strict load, encode/decode/forward), DiagonalGaussian against the reference formulas."
import time
import pytest, torch
from torch.testing import assert_close
from minisd.vae import *

diffusers = pytest.importorskip('diffusers')
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

CONFIGS = {
    'two_levels':   dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                         norm_num_groups=4, sample_size=16),
    'three_levels': dict(in_channels=1, out_channels=2, latent_channels=3, block_out_channels=(8, 8, 16), layers_per_block=2,
                         norm_num_groups=4, sample_size=16, scaling_factor=0.5),
    'no_mid_attention': dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                         norm_num_groups=4, mid_block_add_attention=False),
    'mnist':        VAEConfig.mnist().__dict__,
}

def build_pair(kw, seed=0):
    cfg = VAEConfig(**kw)
    torch.manual_seed(seed)
    ref = diffusers.AutoencoderKL.from_config(cfg.to_dict()).eval()
    with torch.no_grad():
        for p in ref.parameters(): p.add_(torch.randn_like(p) * 0.02)
    ours = AutoencoderKL(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref, cfg

@pytest.mark.parametrize('name', list(CONFIGS))
def test_parity(name):
    ours, ref, cfg = build_pair(CONFIGS[name])
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg.in_channels, 16, 16, generator=g)
    with torch.no_grad():
        post, rpost = ours.encode(x), ref.encode(x).latent_dist
        f = cfg.downscale
        assert post.mean.shape == (2, cfg.latent_channels, 16 // f, 16 // f)
        assert_close(post.mean, rpost.mean, atol=1e-5, rtol=1e-5)
        assert_close(post.logvar, rpost.logvar, atol=1e-5, rtol=1e-5)
        assert_close(post.std, rpost.std, atol=1e-5, rtol=1e-5)
        assert_close(post.kl(), rpost.kl(), atol=1e-4, rtol=1e-5)
        z = torch.randn(2, cfg.latent_channels, 4, 4, generator=g)
        assert_close(ours.decode(z), ref.decode(z).sample, atol=1e-5, rtol=1e-5)
        assert_close(ours(x), ref(x).sample, atol=1e-5, rtol=1e-5)
        got = ours(x, sample_posterior=True, generator=torch.Generator().manual_seed(7))
        want = ref(x, sample_posterior=True, generator=torch.Generator().manual_seed(7)).sample
        assert_close(got, want, atol=1e-5, rtol=1e-5)

@pytest.mark.parametrize('name', list(CONFIGS))
def test_config_round_trip(name):
    cfg = VAEConfig(**CONFIGS[name])
    ref = diffusers.AutoencoderKL.from_config(cfg.to_dict())
    assert VAEConfig.from_dict(dict(ref.config)) == cfg   # diffusers' full config, every default key included
    assert VAEConfig.from_dict(cfg.to_dict()) == cfg

def test_sd_preset_layout():
    cfg = VAEConfig.sd15()
    assert (cfg.in_channels, cfg.latent_channels, cfg.block_out_channels, cfg.scaling_factor) == (3, 4, (128, 256, 512, 512), 0.18215)
    with torch.device('meta'):
        ours, ref = AutoencoderKL(cfg), diffusers.AutoencoderKL.from_config(cfg.to_dict())
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert VAEConfig.from_dict({'_class_name': 'AutoencoderKL', 'block_out_channels': [128, 256, 512, 512],
                                'down_block_types': ['DownEncoderBlock2D'] * 4, 'up_block_types': ['UpDecoderBlock2D'] * 4,
                                'sample_size': 768, 'force_upcast': True, 'latents_mean': None}).sample_size == 768

def test_asymmetric_downsample_padding():
    "The VAE pads (0,1,0,1) before its stride-2 conv: a 17x17 input gives 8x8, not 9x9 (diffusers agrees)."
    ours, ref, cfg = build_pair(CONFIGS['two_levels'])
    x = torch.randn(1, 3, 17, 17)
    with torch.no_grad():
        m = ours.encode(x).mean
        assert m.shape[-2:] == (8, 8)
        assert_close(m, ref.encode(x).latent_dist.mean, atol=1e-5, rtol=1e-5)

def test_diagonal_gaussian_sample_matches_reference():
    params = torch.randn(3, 8, 5, 5)
    ours, ref = DiagonalGaussian(params), DiagonalGaussianDistribution(params)
    z = ours.sample(torch.Generator().manual_seed(3))
    eps = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(3))
    assert_close(z, ours.mean + ours.std * eps)
    assert_close(z, ref.sample(torch.Generator().manual_seed(3)))
    assert not torch.allclose(z, ours.sample(torch.Generator().manual_seed(4)))
    assert torch.equal(ours.mode(), params[:, :4])
    gens = lambda: [torch.Generator().manual_seed(s) for s in (5, 6, 7)]   # one generator per batch item
    assert_close(ours.sample(gens()), ref.sample(gens()))

def test_diagonal_gaussian_kl_and_clamp():
    params = torch.randn(4, 6, 3, 2) * 3
    ours = DiagonalGaussian(params)
    mean, logvar = params[:, :3], params[:, 3:].clamp(-30, 20)
    want = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).sum(dim=[1, 2, 3])
    assert ours.kl().shape == (4,)
    assert_close(ours.kl(), want)
    assert_close(ours.kl(), DiagonalGaussianDistribution(params).kl())
    assert torch.all(DiagonalGaussian(torch.randn(2, 4, 3, 3)).kl() > 0)
    assert_close(DiagonalGaussian(torch.zeros(2, 4, 3, 3)).kl(), torch.zeros(2))
    extreme = DiagonalGaussian(torch.cat([torch.zeros(1, 1, 1, 1), torch.tensor([[[[1e3]]]])], 1))
    assert extreme.logvar.item() == 20. and torch.isfinite(extreme.var).all()
    assert DiagonalGaussian(torch.cat([torch.zeros(1, 1, 1, 1), torch.tensor([[[[-1e3]]]])], 1)).logvar.item() == -30.

def test_kl_gradient_pulls_toward_standard_normal():
    params = (torch.randn(2, 8, 4, 4) * 2).requires_grad_()
    DiagonalGaussian(params).kl().sum().backward()
    mean = params[:, :4].detach()
    assert_close(params.grad[:, :4], mean)   # d/dmean of 0.5*mean^2

def test_errors():
    with pytest.raises(ValueError, match='act_fn'): VAEConfig.from_dict({'act_fn': 'relu'})
    with pytest.raises(ValueError, match='use_quant_conv'): VAEConfig.from_dict({'use_quant_conv': False})
    with pytest.raises(ValueError, match='down_block_types'):
        VAEConfig.from_dict({'block_out_channels': [8, 16], 'down_block_types': ['DownEncoderBlock2D', 'AttnDownEncoderBlock2D']})
    with pytest.raises(ValueError, match='up_block_types'):
        VAEConfig.from_dict({'block_out_channels': [8, 16], 'up_block_types': ['UpDecoderBlock2D']})

@pytest.mark.slow
def test_sd_vae_full_size_decode():
    "The SD VAE at full size with random weights: decode a 1x4x32x32 latent (-> 1x3x256x256)."
    cfg = VAEConfig.sd15()
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL.from_config(cfg.to_dict()).eval()
    with torch.device('meta'): ours = AutoencoderKL(cfg)
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    ours.eval()
    z = torch.randn(1, 4, 32, 32)
    with torch.no_grad():
        t0 = time.time(); want = ref.decode(z).sample; t1 = time.time()
        got = ours.decode(z); t2 = time.time()
    print(f"SD VAE decode 32x32 latents: diffusers {t1-t0:.1f}s, minisd {t2-t1:.1f}s")
    assert got.shape == (1, 3, 256, 256)
    assert_close(got, want, atol=1e-4, rtol=1e-4)
