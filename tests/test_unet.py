"U-Net parity with diffusers' UNet2DConditionModel: identical state dicts (strict load) and outputs, config round trips."
import time
import pytest, torch
from torch.testing import assert_close
from minisd.unet import *

diffusers = pytest.importorskip('diffusers')

XA, DN, XU, UP = 'CrossAttnDownBlock2D', 'DownBlock2D', 'CrossAttnUpBlock2D', 'UpBlock2D'
TINY = dict(sample_size=16, in_channels=3, out_channels=2, block_out_channels=(8, 16), layers_per_block=1,
            down_block_types=(XA, DN), up_block_types=(UP, XU), attention_head_dim=2, cross_attention_dim=12,
            norm_num_groups=4)

# name -> (UNetConfig kwargs, input spatial size); each exercises a different config path
CONFIGS = {
    'tiny_cross':        (TINY, (16, 16)),
    'sd_like_3_levels':  (dict(TINY, block_out_channels=(8, 16, 16), layers_per_block=2, down_block_types=(XA, XA, DN),
                               up_block_types=(UP, XU, XU), attention_head_dim=(1, 2, 4)), (16, 16)),
    'linear_proj_upcast': (dict(TINY, use_linear_projection=True, upcast_attention=True, attention_head_dim=(2, 4),
                               down_block_types=(XA, XA), up_block_types=(XU, XU)), (8, 8)),
    'unconditional':     (dict(TINY, down_block_types=(DN, DN), up_block_types=(UP, UP), mid_block_type='UNetMidBlock2D',
                               cross_attention_dim=None), (16, 16)),
    'no_mid_block':      (dict(TINY, down_block_types=(DN, DN), up_block_types=(UP, UP), mid_block_type=None,
                               cross_attention_dim=None), (8, 8)),
    'class_embeds':      (dict(TINY, num_class_embeds=5), (8, 8)),
    'two_transformer_layers': (dict(TINY, transformer_layers_per_block=(2, 1), down_block_types=(XA, XA),
                               up_block_types=(XU, XU)), (8, 8)),
    'per_block_layers':  (dict(TINY, layers_per_block=(1, 2), freq_shift=1, flip_sin_to_cos=False,
                               mid_block_scale_factor=2.0, dropout=0.1, downsample_padding=0), (8, 8)),
    'odd_sizes':         (dict(TINY, block_out_channels=(8, 8, 16), down_block_types=(XA, DN, XA),
                               up_block_types=(XU, UP, XU)), (13, 7)),
    'mnist_text':        (UNetConfig.mnist(cross_attention_dim=16, num_class_embeds=10).__dict__, (32, 32)),
}

def build_pair(kw, seed=0):
    "(minisd UNet, diffusers UNet) of config `kw` with diffusers' random weights loaded strictly into ours."
    cfg = UNetConfig(**kw)
    torch.manual_seed(seed)
    ref = diffusers.UNet2DConditionModel.from_config(cfg.to_dict()).eval()
    with torch.no_grad():   # diffusers zero-inits nothing, but make every weight non-trivial anyway
        for p in ref.parameters(): p.add_(torch.randn_like(p) * 0.02)
    ours = UNet(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref, cfg

def inputs(cfg, hw, bs=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(bs, cfg.in_channels, *hw, generator=g)
    ehs = torch.randn(bs, 7, cfg.cross_attention_dim, generator=g) if cfg.cross_attention_dim else None
    labels = torch.randint(0, cfg.num_class_embeds, (bs,), generator=g) if cfg.num_class_embeds else None
    return x, ehs, labels

@pytest.mark.parametrize('name', list(CONFIGS))
def test_parity(name):
    kw, hw = CONFIGS[name]
    ours, ref, cfg = build_pair(kw)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    x, ehs, labels = inputs(cfg, hw)
    with torch.no_grad():
        for t in (torch.tensor([3, 999]), 500, torch.tensor(17.5)):
            want = ref(x, t, encoder_hidden_states=ehs, class_labels=labels).sample
            got = ours(x, t, encoder_hidden_states=ehs, class_labels=labels)
            assert got.shape == (x.shape[0], cfg.out_channels, *hw)
            assert_close(got, want, atol=1e-5, rtol=1e-5)

@pytest.mark.parametrize('name', list(CONFIGS))
def test_config_round_trip(name):
    cfg = UNetConfig(**CONFIGS[name][0])
    ref = diffusers.UNet2DConditionModel.from_config(cfg.to_dict())
    back = UNetConfig.from_dict(dict(ref.config))    # diffusers' full config, every default key included
    assert back == cfg
    assert UNetConfig.from_dict(cfg.to_dict()) == cfg

def test_num_attention_heads_is_the_same_architecture():
    "num_attention_heads (which diffusers refuses) is written as attention_head_dim, diffusers' spelling of heads."
    cfg = UNetConfig(**dict(TINY, num_attention_heads=(4, 8), attention_head_dim=99))
    assert cfg.num_heads == (4, 8)
    ours, ref, _ = build_pair(cfg.__dict__)
    assert ref.down_blocks[0].attentions[0].transformer_blocks[0].attn1.heads == 4
    assert ours.down_blocks[0].attentions[0].transformer_blocks[0].attn1.heads == 4
    x, ehs, _ = inputs(cfg, (8, 8))
    with torch.no_grad(): assert_close(ours(x, 10, ehs), ref(x, 10, ehs).sample, atol=1e-5, rtol=1e-5)

def test_heads_change_the_function():
    "Same weights, different head split -> different output (guards against ignoring the head count)."
    a = UNet(UNetConfig(**dict(TINY, attention_head_dim=1))).eval()
    b = UNet(UNetConfig(**dict(TINY, attention_head_dim=4))).eval()
    b.load_state_dict(a.state_dict())
    x, ehs, _ = inputs(UNetConfig(**TINY), (8, 8))
    with torch.no_grad(): assert not torch.allclose(a(x, 10, ehs), b(x, 10, ehs), atol=1e-4)

def test_presets_match_diffusers_layout():
    for cfg in (UNetConfig.sd15(), UNetConfig.sd21(), UNetConfig.mnist(), UNetConfig.mnist(cross_attention_dim=32)):
        with torch.device('meta'):
            ours, ref = UNet(cfg), diffusers.UNet2DConditionModel.from_config(cfg.to_dict())
        assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert UNetConfig.sd21().use_linear_projection and UNetConfig.sd21().upcast_attention
    assert UNetConfig.sd21().num_heads == (5, 10, 20, 20) and UNetConfig.sd15().num_heads == (8,) * 4

def test_mnist_size():
    n = sum(p.numel() for p in UNet(UNetConfig.mnist()).parameters())
    assert 1e6 < n < 3e6

def test_timestep_forms_agree():
    ours, _, cfg = build_pair(TINY)
    x, ehs, _ = inputs(cfg, (8, 8))
    with torch.no_grad():
        a = ours(x, 42, ehs)
        for t in (torch.tensor(42), torch.tensor([42, 42]), torch.tensor([42.]), 42.0):
            assert_close(ours(x, t, ehs), a)
        assert not torch.allclose(ours(x, 43, ehs), a)

def test_upcast_attention_half():
    "upcast_attention computes attention in fp32 and returns the input dtype."
    attn = Attention(16, heads=2, dim_head=8, upcast_attention=True).half()
    x = torch.randn(1, 5, 16).half()
    out = attn(x)
    assert out.dtype == torch.float16
    assert_close(out.float(), Attention.forward(attn.float(), x.float()), atol=2e-3, rtol=2e-3)

def test_errors():
    ours, _, cfg = build_pair(dict(TINY, num_class_embeds=3))
    x, ehs, labels = inputs(cfg, (8, 8))
    with pytest.raises(ValueError, match='encoder_hidden_states'): ours(x, 1, class_labels=labels)
    with pytest.raises(ValueError, match='class_labels'): ours(x, 1, ehs)
    with pytest.raises(ValueError, match='unsupported block type'): UNetConfig(down_block_types=('AttnDownBlock2D',) * 4)
    with pytest.raises(ValueError, match='cross_attention_dim'): UNetConfig(cross_attention_dim=None)
    with pytest.raises(ValueError, match='only_cross_attention'): UNetConfig(only_cross_attention=True)
    with pytest.raises(ValueError, match='layers_per_block'): UNetConfig(layers_per_block=(1, 2))
    with pytest.raises(ValueError, match='one down and one up'): UNetConfig(block_out_channels=(8, 16))
    for k, v in dict(act_fn='gelu', time_embedding_type='fourier', class_embed_type='timestep', resnet_time_scale_shift='scale_shift',
                     addition_embed_type='text_time', conv_in_kernel=7).items():
        with pytest.raises(ValueError, match=k): UNetConfig.from_dict({**UNetConfig.sd15().to_dict(), k: v})
    # unknown bookkeeping keys are ignored
    assert UNetConfig.from_dict({**UNetConfig.sd15().to_dict(), '_diffusers_version': '0.6.0', '_name_or_path': 'x'}) == UNetConfig.sd15()

@pytest.mark.slow
def test_sd15_full_size_parity():
    "SD 1.5 at full size with random weights: batch 1, 64x64 latents, 77 tokens."
    cfg = UNetConfig.sd15()
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel.from_config(cfg.to_dict()).eval()
    with torch.device('meta'): ours = UNet(cfg)
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)   # share the tensors: no second 3.4 GB copy
    ours.eval()
    x, ehs = torch.randn(1, 4, 64, 64), torch.randn(1, 77, 768)
    with torch.no_grad():
        t0 = time.time(); want = ref(x, 981, ehs).sample; t1 = time.time()
        got = ours(x, 981, ehs); t2 = time.time()
    print(f"SD1.5 U-Net forward: diffusers {t1-t0:.1f}s, minisd {t2-t1:.1f}s")
    assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_bad_inputs_clear_errors():
    "Mis-shaped inputs name the expected shape instead of failing deep inside a conv or matmul."
    unet = UNet(UNetConfig.mnist(cross_attention_dim=16)).eval()
    x, ehs = torch.randn(1, 1, 32, 32), torch.randn(1, 5, 16)
    with pytest.raises(ValueError, match=r'\(B, 1, H, W\).*\(1, 3, 32, 32\)'): unet(torch.randn(1, 3, 32, 32), 10, ehs)
    with pytest.raises(ValueError, match=r'\(B, S, 16\).*\(1, 5, 7\)'): unet(x, 10, torch.randn(1, 5, 7))
    with pytest.raises(ValueError, match='pass encoder_hidden_states'): unet(x, 10)
    with torch.no_grad(): assert unet(x, 10, ehs).shape == x.shape
