"""Full-size SD 1.5 on a CUDA GPU in fp16: minisd against diffusers/transformers with the same random weights.

Skipped without CUDA. On the GPU machine: `python3 -m pytest -q tests/test_cuda.py` (bench/gpu.sh runs it first).
"""
import copy, warnings
import pytest, torch
from minisd.unet import UNet, UNetConfig
from minisd.vae import AutoencoderKL, VAEConfig
from minisd.clip import CLIPTextModel, CLIPTextConfig
from minisd.tokenizer import CLIPTokenizer
from minisd.pipeline import StableDiffusion
from minisd.schedulers import DDIMScheduler
from minisd.checkpoints import empty_weights

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')]
diffusers = pytest.importorskip('diffusers')
transformers = pytest.importorskip('transformers')

SCHED = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear',
             clip_sample=False, set_alpha_to_one=False, steps_offset=1)
CAPTIONS = ["a photograph of an astronaut riding a horse", "a watercolor painting of a fox in the snow",
            "a bowl of fruit on a wooden table, studio lighting"]
DEV = 'cuda'


def share(ours_cls, config, ref):
    "A minisd module holding `ref`'s very tensors."
    with empty_weights(): ours = ours_cls(config)
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    return ours.to(DEV).eval()


def psnr(a, b): return (10 * torch.log10(1 / ((a.double() - b.double()) ** 2).mean())).item()


@pytest.fixture(scope='module')
def pipes(tmp_path_factory):
    "Random full-size SD 1.5 in fp16, built on the GPU: diffusers' pipeline, and minisd's on the same tensors; a small trained tokenizer."
    torch.manual_seed(0)
    with torch.device(DEV):
        unet = diffusers.UNet2DConditionModel.from_config(UNetConfig.sd15().to_dict()).eval().half()
        vae = diffusers.AutoencoderKL.from_config(VAEConfig.sd15().to_dict()).eval().half()
        text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIPTextConfig.sd15().to_dict())).eval().half()
    tok_dir = tmp_path_factory.mktemp('tok')
    CLIPTokenizer.train(CAPTIONS * 4, vocab_size=600).save_pretrained(tok_dir)
    dp = diffusers.StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=transformers.CLIPTokenizer.from_pretrained(tok_dir),
                                           scheduler=diffusers.DDIMScheduler(**SCHED), safety_checker=None,
                                           feature_extractor=None, requires_safety_checker=False)
    dp.set_progress_bar_config(disable=True)
    mp = StableDiffusion(share(UNet, UNetConfig.sd15(), unet), share(AutoencoderKL, VAEConfig.sd15(), vae),
                         share(CLIPTextModel, CLIPTextConfig.sd15(), text), CLIPTokenizer.from_pretrained(tok_dir), DDIMScheduler(**SCHED))
    mp.set_progress_bar_config(disable=True)
    return mp, dp


def test_fp16_unet_step_matches(pipes):
    mp, dp = pipes
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 64, 64, generator=g).to(DEV, torch.float16)
    ehs = torch.randn(2, 77, 768, generator=g).to(DEV, torch.float16)
    t = torch.tensor(981, device=DEV)
    with torch.inference_mode():
        ours, theirs = mp.unet(x, t, encoder_hidden_states=ehs), dp.unet(x, t, encoder_hidden_states=ehs).sample
    assert ours.dtype == torch.float16 and torch.isfinite(ours).all()
    rel = ((ours.double() - theirs.double()).norm() / theirs.double().norm()).item()
    assert rel < 1e-2, rel


def test_fp16_image_psnr(pipes):
    "The same 512x512 image (10 DDIM steps, CFG 7.5, same latents) from both pipelines, PSNR >= 35 dB."
    mp, dp = pipes
    lat = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0)).to(DEV, torch.float16)
    kw = dict(prompt=CAPTIONS[0], num_inference_steps=10, guidance_scale=7.5, latents=lat, output_type='pt')
    with warnings.catch_warnings():
        warnings.simplefilter('error')   # no fp32 fallback expected here: the fp16 VAE must not overflow
        ours = mp(**kw)
    theirs = dp(**kw).images.float()
    assert ours.shape == theirs.shape == (1, 3, 512, 512) and torch.isfinite(ours).all()
    assert ours.std() > 0.01   # not a constant image, which any two implementations would agree on
    assert psnr(ours, theirs) >= 35


def test_fp16_vae_decode_falls_back_to_fp32(pipes):
    "A VAE whose fp16 decode overflows: minisd warns, decodes in fp32 and gives diffusers' fp32 decode of the same weights."
    mp, dp = pipes
    hot = copy.deepcopy(dp.vae)
    with torch.no_grad(): hot.decoder.conv_in.weight.mul_(1e5)   # fp16 activations overflow right after this conv
    ours = StableDiffusion(mp.unet, share(AutoencoderKL, VAEConfig.sd15(), hot), mp.text_encoder, mp.tokenizer, mp.scheduler)
    lat = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(2)).to(DEV, torch.float16)
    with torch.inference_mode():
        assert not torch.isfinite(hot.decode(lat / 0.18215).sample).all()   # the case is real: plain fp16 fails
        with pytest.warns(UserWarning, match='decoding again in float32'):
            img = ours.decode_latents(lat)
        ref = (copy.deepcopy(hot).float().decode((lat / 0.18215).float()).sample / 2 + 0.5).clamp(0, 1)
    assert img.dtype == torch.float32 and torch.isfinite(img).all() and img.std() > 0.01
    assert next(ours.vae.parameters()).dtype == torch.float16   # the fallback left the pipeline's VAE in fp16
    torch.testing.assert_close(img, ref, atol=5e-3, rtol=0)
