"""Full-size Stable Diffusion checks on CPU, random weights, fp32, the same weights on both sides (slow).

What test_unet.py / test_vae.py already cover at full size is not repeated here (SD 1.5 U-Net at batch 1, VAE decode of
32x32 latents). Added: both text encoders (SD 1.5: OpenAI CLIP ViT-L/14; SD 2.1: OpenCLIP ViT-H/14, 23 layers), the SD 2.1
U-Net (linear projections, per-level heads, 1024-wide text, upcast attention) at CFG batch 2, the VAE encoder at
256x256, and a whole txt2img run of both pipelines at full model size (64x64 pixels, 2 DDIM steps, CFG, negative prompt).
Run with `pytest -q tests/test_sd_fullsize.py --runslow -s` (-s prints timings); ~2 min with OMP_NUM_THREADS=1 on a
shared 2-core machine (two threads there are oversubscribed and take ~13 min).
"""
import gc, time
import pytest, torch
from torch.testing import assert_close
from minisd.unet import UNet, UNetConfig
from minisd.vae import AutoencoderKL, VAEConfig
from minisd.clip import CLIPTextModel, CLIPTextConfig
from minisd.tokenizer import CLIPTokenizer
from minisd.pipeline import StableDiffusion
from minisd.schedulers import DDIMScheduler
from minisd.checkpoints import empty_weights

diffusers = pytest.importorskip('diffusers')
transformers = pytest.importorskip('transformers')
pytestmark = pytest.mark.slow

TEXT = {'sd15': CLIPTextConfig.sd15, 'sd21': CLIPTextConfig.sd21}
UNETS = {'sd15': UNetConfig.sd15, 'sd21': UNetConfig.sd21}
SCHED = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear',
             clip_sample=False, set_alpha_to_one=False, steps_offset=1)
PREDICTION = {'sd15': 'epsilon', 'sd21': 'v_prediction'}


@pytest.fixture(autouse=True)
def free_memory():
    "Full-size models are GBs: drop each test's before the next one builds its own."
    yield
    gc.collect()


def share(ours_cls, config, ref:torch.nn.Module) -> torch.nn.Module:
    "A minisd module holding `ref`'s tensors: parameters built on the meta device (no memory, no init), then `assign`ed."
    with empty_weights(): ours = ours_cls(config)
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    return ours.eval()


def timed(f):
    t0 = time.perf_counter(); out = f(); return out, time.perf_counter() - t0


def text_pair(version):
    cfg = TEXT[version]()
    torch.manual_seed(0)
    ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg.to_dict())).eval()
    return cfg, ref, share(CLIPTextModel, cfg, ref)


def ids_like_a_tokenizer(B=2, n_words=(5, 30), pad=49407):
    "(B, 77) ids: start, words, end, padding; the end token is the highest id (legacy pooling at argmax)."
    g = torch.Generator().manual_seed(1)
    ids = torch.full((B, 77), pad)
    for b, n in enumerate(n_words[:B]):
        ids[b, 0], ids[b, 1:n + 1], ids[b, n + 1] = 49406, torch.randint(0, 49000, (n,), generator=g), 49407
    return ids


@pytest.mark.parametrize('version', ['sd15', 'sd21'])
def test_text_encoder_full_size(version):
    "Last hidden state, pooled output and the penultimate layer (clip skip 1, SD 2's usual input) equal transformers'."
    cfg, ref, ours = text_pair(version)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    ids = ids_like_a_tokenizer(pad=49407 if version == 'sd15' else 0)   # SD 2 pads with '!' (id 0)
    with torch.no_grad():
        want, t_ref = timed(lambda: ref(ids, output_hidden_states=True))
        got, t_ours = timed(lambda: ours.text_model(ids))
        skipped = ours(ids, clip_skip=1)
    print(f"\n{version} text encoder 2x77: transformers {t_ref:.2f}s, minisd {t_ours:.2f}s")
    assert got.last_hidden_state.shape == (2, 77, cfg.hidden_size)
    assert_close(got.last_hidden_state, want.last_hidden_state, atol=1e-4, rtol=1e-4)
    assert_close(got.pooler_output, want.pooler_output, atol=1e-4, rtol=1e-4)
    assert_close(skipped, ref.final_layer_norm(want.hidden_states[-2]), atol=1e-4, rtol=1e-4)


def test_sd21_unet_full_size():
    "SD 2.1's U-Net (linear projections, heads 5/10/20/20, 1024-wide text, upcast): CFG batch 2, 64x64 latents."
    cfg = UNetConfig.sd21()
    assert cfg.use_linear_projection and cfg.upcast_attention and cfg.cross_attention_dim == 1024
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel.from_config(cfg.to_dict()).eval()
    assert ref.config.use_linear_projection and ref.config.upcast_attention
    ours = share(UNet, cfg, ref)
    g = torch.Generator().manual_seed(1)
    x, ehs = torch.randn(2, 4, 64, 64, generator=g), torch.randn(2, 77, 1024, generator=g)
    with torch.no_grad():
        want, t_ref = timed(lambda: ref(x, torch.tensor([801, 801]), ehs).sample)
        got, t_ours = timed(lambda: ours(x, torch.tensor([801, 801]), ehs))
    print(f"\nSD2.1 U-Net 2x4x64x64: diffusers {t_ref:.1f}s, minisd {t_ours:.1f}s")
    assert got.shape == (2, 4, 64, 64)
    assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got[0], got[1])   # the two halves of the batch really differ


def test_sd_vae_full_size_encode():
    "The SD VAE encoder at full size: posterior mean and log-variance of a 1x3x256x256 image (-> 1x4x32x32)."
    cfg = VAEConfig.sd15()
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL.from_config(cfg.to_dict()).eval()
    ours = share(AutoencoderKL, cfg, ref)
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        want, t_ref = timed(lambda: ref.encode(x).latent_dist)
        got, t_ours = timed(lambda: ours.encode(x))
    print(f"\nSD VAE encode 256x256: diffusers {t_ref:.1f}s, minisd {t_ours:.1f}s")
    assert got.mean.shape == (1, 4, 32, 32)
    assert_close(got.mean, want.mean, atol=1e-4, rtol=1e-4)
    assert_close(got.logvar, want.logvar, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('version', ['sd15', 'sd21'])
def test_pipeline_full_size_two_ddim_steps(version, tmp_path):
    "Both pipelines at full model size on the same modules: 64x64 pixels (8x8 latents), 2 DDIM steps, CFG 7.5, negative prompt."
    tok = CLIPTokenizer.train(["a photograph of an astronaut riding a horse", "a red cube on a blue sphere"] * 3,
                              vocab_size=600, **({'pad_token': '!'} if version == 'sd21' else {}))
    tok.save_pretrained(tmp_path)
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel.from_config(UNETS[version]().to_dict()).eval()
    vae = diffusers.AutoencoderKL.from_config(VAEConfig.sd15().to_dict()).eval()
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT[version]().to_dict())).eval()
    sched = dict(SCHED, prediction_type=PREDICTION[version])
    dp = diffusers.StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=transformers.CLIPTokenizer.from_pretrained(tmp_path),
                                           scheduler=diffusers.DDIMScheduler(**sched), safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
    dp.set_progress_bar_config(disable=True)
    pipe = StableDiffusion(share(UNet, UNetConfig.from_dict(dict(unet.config)), unet),
                           share(AutoencoderKL, VAEConfig.from_dict(dict(vae.config)), vae),
                           share(CLIPTextModel, TEXT[version](), text), CLIPTokenizer.from_pretrained(tmp_path), DDIMScheduler(**sched))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.tokenizer('a red cube').tolist() == dp.tokenizer('a red cube', padding='max_length', return_tensors='pt').input_ids.tolist()
    kw = dict(prompt='a photograph of an astronaut riding a horse', negative_prompt='a red cube', num_inference_steps=2,
              guidance_scale=7.5, height=64, width=64, output_type='pt')
    want, t_ref = timed(lambda: dp(**kw, generator=torch.Generator().manual_seed(0)).images)
    got, t_ours = timed(lambda: pipe(**kw, generator=torch.Generator().manual_seed(0)))
    print(f"\n{version} txt2img 64x64, 2 steps: diffusers {t_ref:.1f}s, minisd {t_ours:.1f}s")
    assert got.shape == (1, 3, 64, 64) and got.std() > 0
    assert_close(got, want, atol=1e-4, rtol=1e-4)
