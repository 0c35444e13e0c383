"Memory savers: VAE slicing and tiling (against diffusers' tiled VAE), gradient checkpointing (same gradients)."
import pytest, torch
from torch.testing import assert_close
from minisd.unet import UNet, UNetConfig
from minisd.vae import AutoencoderKL, VAEConfig

diffusers = pytest.importorskip('diffusers')
from tiny_sd import same_weights


def vae_pair(**over):
    "(minisd, diffusers) AutoencoderKL with the same random weights; sample_size 16 -> 8x8-latent tiles."
    cfg = VAEConfig(**{**dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                              norm_num_groups=4, sample_size=16), **over})
    return same_weights(AutoencoderKL, diffusers.AutoencoderKL, cfg)


@pytest.mark.parametrize('shape', [(1, 4, 12, 12), (2, 4, 20, 13), (1, 4, 8, 30), (1, 4, 7, 7)])
def test_tiled_decode_equals_diffusers(shape):
    ours, ref = vae_pair()
    assert (ours.tile_sample_min_size, ours.tile_latent_min_size, ours.tile_overlap_factor) == \
           (ref.tile_sample_min_size, ref.tile_latent_min_size, ref.tile_overlap_factor)
    z = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    ours.enable_tiling(); ref.enable_tiling()
    with torch.no_grad():
        got, expected = ours.decode(z), ref.decode(z).sample
        assert_close(got, expected, rtol=1e-5, atol=1e-5)
        ours.disable_tiling()
        untiled = ours.decode(z)
    if max(shape[-2:]) > 8: assert not torch.allclose(got, untiled, atol=1e-4)   # tiling really happened
    else: assert_close(got, untiled, rtol=0, atol=0)                           # small enough: one tile, no tiling


@pytest.mark.parametrize('hw', [(24, 24), (40, 17)])
def test_tiled_encode_equals_diffusers(hw):
    ours, ref = vae_pair()
    x = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(2))
    ours.enable_tiling(); ref.enable_tiling()
    with torch.no_grad():
        got, expected = ours.encode(x), ref.encode(x).latent_dist
        assert_close(got.mean, expected.mean, rtol=1e-5, atol=1e-5)
        assert_close(got.logvar, expected.logvar, rtol=1e-5, atol=1e-5)
        ours.disable_tiling()
        assert not torch.allclose(ours.encode(x).mean, got.mean, atol=1e-4)


def test_slicing_same_result_and_combines_with_tiling():
    ours, ref = vae_pair()
    z = torch.randn(3, 4, 12, 12, generator=torch.Generator().manual_seed(3))
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        plain, plain_enc = ours.decode(z), ours.encode(x).mean
        ours.enable_slicing()
        assert_close(ours.decode(z), plain, rtol=1e-5, atol=1e-5)   # one image at a time: the same up to float rounding
        assert_close(ours.encode(x).mean, plain_enc, rtol=1e-5, atol=1e-5)
        ours.enable_tiling(); ref.enable_tiling(); ref.enable_slicing()
        assert_close(ours.decode(z), ref.decode(z).sample, rtol=1e-5, atol=1e-5)
    ours.disable_slicing(); ours.disable_tiling()
    assert not ours.use_slicing and not ours.use_tiling


def test_gradient_checkpointing_same_gradients():
    "Same loss and gradients (dropout included: checkpoint replays the RNG), with far fewer activations kept for backward."
    cfg = UNetConfig.mnist(cross_attention_dim=16, dropout=0.1)
    torch.manual_seed(0)
    unet = UNet(cfg).train()
    x, ehs = torch.randn(2, 1, 16, 16), torch.randn(2, 5, 16)

    params = {id(p) for p in unet.parameters()}

    def grads():
        unet.zero_grad()
        torch.manual_seed(7)
        xg = x.clone().requires_grad_()
        saved = []   # bytes of the activations autograd keeps for the backward pass (weights excluded)
        def pack(t):
            if id(t) not in params: saved.append(t.numel() * t.element_size())
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = unet(xg, 10, ehs).square().mean()
        loss.backward()
        return loss.detach(), xg.grad, {k: p.grad.clone() for k, p in unet.named_parameters()}, sum(saved)

    loss0, gx0, gw0, kept0 = grads()
    assert not unet.is_gradient_checkpointing
    unet.enable_gradient_checkpointing()
    assert unet.is_gradient_checkpointing
    loss1, gx1, gw1, kept1 = grads()
    assert kept1 < kept0 / 3, (kept0, kept1)   # only the blocks' inputs are kept
    assert_close(loss1, loss0, rtol=0, atol=0)
    assert_close(gx1, gx0, rtol=1e-6, atol=1e-7)
    for k in gw0: assert_close(gw1[k], gw0[k], rtol=1e-6, atol=1e-7, msg=k)
    with torch.no_grad(): unet(x, 10, ehs)   # no recomputation without gradients: plain forward
    unet.disable_gradient_checkpointing()
    assert not unet.is_gradient_checkpointing


# ---------------------------------------------------------------------------------------------------------------------
# Pipeline level: attention slicing, VAE slicing/tiling and model CPU offload leave the images unchanged
def tiny_pipe():
    from minisd.pipeline import StableDiffusion
    from minisd.clip import CLIPTextModel, CLIPTextConfig
    from minisd.tokenizer import CLIPTokenizer
    from minisd.schedulers import DDIMScheduler
    tok = CLIPTokenizer.train(["a handwritten digit seven", "the number three", "a bold two", "six"], vocab_size=600)
    torch.manual_seed(0)
    unet = UNet(UNetConfig(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
                           down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'), up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'),
                           cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8))
    vae = AutoencoderKL(VAEConfig(in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                                  sample_size=16, scaling_factor=0.5))
    te = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id))
    pipe = StableDiffusion(unet, vae, te, tok, DDIMScheduler(beta_schedule='scaled_linear', beta_start=0.00085, beta_end=0.012,
                                                             clip_sample=False, set_alpha_to_one=False, steps_offset=1))
    pipe.set_progress_bar_config(disable=True)
    return pipe

KW = dict(prompt=["a bold two", "six"], num_inference_steps=3, guidance_scale=5., output_type="pt")
def gen(): return torch.Generator().manual_seed(0)


def test_pipeline_attention_slicing_same_images():
    pipe = tiny_pipe()
    plain = pipe(**KW, generator=gen())
    for s in ('auto', 'max', 1):
        pipe.enable_attention_slicing(s)
        assert all(type(p).__name__ == 'SlicedAttnProcessor' for p in pipe.unet.attn_processors.values())
        assert_close(pipe(**KW, generator=gen()), plain, rtol=1e-5, atol=1e-5)
    pipe.disable_attention_slicing()
    assert_close(pipe(**KW, generator=gen()), plain, rtol=0, atol=0)


def test_pipeline_vae_tiling_large_image():
    "A 32x32 image from a VAE trained at 16x16: tiling really tiles, and matches decoding the same latents tile by tile."
    pipe = tiny_pipe()
    lat = pipe(**{**KW, 'output_type': 'latent'}, height=32, width=32, generator=gen())
    pipe.vae.enable_tiling()
    tiled = pipe(**KW, height=32, width=32, generator=gen())
    with torch.no_grad(): expected = (pipe.vae.tiled_decode(lat / pipe.vae.config.scaling_factor) / 2 + 0.5).clamp(0, 1)
    assert_close(tiled, expected, rtol=0, atol=0)
    pipe.vae.disable_tiling()
    assert not torch.allclose(pipe(**KW, height=32, width=32, generator=gen()), tiled, atol=1e-4)


@pytest.mark.skipif(torch.cuda.is_available() or torch.backends.mps.is_available(), reason='has an accelerator')
def test_model_cpu_offload_without_accelerator_is_a_noop_warning():
    pipe = tiny_pipe()
    plain = pipe(**KW, generator=gen())
    with pytest.warns(UserWarning, match='no accelerator.*no-op'):
        pipe.enable_model_cpu_offload()
    assert pipe.device.type == 'cpu' and pipe._offload_hooks == []
    assert_close(pipe(**KW, generator=gen()), plain, rtol=0, atol=0)


@pytest.mark.gpu
def test_model_cpu_offload_cuda():
    "Each model on the GPU only while it runs; same images as the pipeline on the GPU; a lower peak of GPU memory."
    pipe = tiny_pipe().to('cuda')
    g = lambda: torch.Generator('cuda').manual_seed(0)
    torch.cuda.reset_peak_memory_stats()
    plain = pipe(**KW, generator=g())
    pipe.enable_model_cpu_offload()
    assert pipe.device.type == 'cuda' and all(p.device.type == 'cpu' for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters())
    seen = []
    pipe.unet.register_forward_hook(lambda m, a, o: seen.append((next(pipe.unet.parameters()).device.type, next(pipe.text_encoder.parameters()).device.type)))
    out = pipe(**KW, generator=g())
    assert_close(out, plain, rtol=1e-5, atol=1e-5)
    assert set(seen) == {('cuda', 'cpu')}   # the U-Net ran on the GPU while the text encoder waited on the CPU
    pipe.remove_all_hooks()
    assert all(p.device.type == 'cpu' for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters())
