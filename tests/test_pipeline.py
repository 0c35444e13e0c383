"StableDiffusion pipeline: images equal diffusers' (both directions, txt2img and img2img), save/load, bad input."
import json, shutil, warnings
import pytest, torch
from PIL import Image
from torch.testing import assert_close
from minisd.pipeline import StableDiffusion
from minisd.core import randn_tensor
from minisd.unet import UNet, UNetConfig
from minisd.vae import AutoencoderKL, VAEConfig
from minisd.clip import CLIPTextModel, CLIPTextConfig
from minisd.tokenizer import CLIPTokenizer
from minisd.schedulers import DDIMScheduler, DDPMScheduler
from tiny_sd import UNET, vae_cfg, SCHED, ATOL, gen

diffusers = pytest.importorskip('diffusers')
transformers = pytest.importorskip('transformers')

CAPTIONS = ["a handwritten digit seven", "the number three", "a picture of a zero", "a drawing of the digit one",
            "an image of the number nine", "a bold two", "a thin five", "a sloppy eight", "a neat four", "six"]
KW = dict(num_inference_steps=3, guidance_scale=6.0)


@pytest.fixture(scope='module')
def tokenizer(): return CLIPTokenizer.train(CAPTIONS, vocab_size=600)

def text_cfg(tok):
    return dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)

def minisd_pipe(tok, channels=1, seed=0):
    torch.manual_seed(seed)
    # random (not zero) output convs so that every step changes the latents
    pipe = StableDiffusion(UNet(UNetConfig.from_dict(UNET)), AutoencoderKL(VAEConfig.from_dict(vae_cfg(channels))),
                           CLIPTextModel(CLIPTextConfig.from_dict(text_cfg(tok))), tok, DDIMScheduler(**SCHED))
    pipe.set_progress_bar_config(disable=True)
    return pipe

def diffusers_load(path, cls=None):
    cls = cls or diffusers.StableDiffusionPipeline
    dp = cls.from_pretrained(path, safety_checker=None)
    dp.set_progress_bar_config(disable=True)
    return dp

@pytest.fixture(scope='module')
def saved1(tokenizer, tmp_path_factory):
    "A 1-channel (MNIST-like) minisd pipeline, saved."
    pipe = minisd_pipe(tokenizer, 1)
    d = tmp_path_factory.mktemp('sd1')
    pipe.save_pretrained(d)
    return pipe, d

@pytest.fixture(scope='module')
def from_diffusers(tokenizer, tmp_path_factory):
    "A tiny 3-channel pipeline built and saved by diffusers/transformers, with random weights."
    tdir = tmp_path_factory.mktemp('tok')
    tokenizer.save_pretrained(tdir)
    torch.manual_seed(1)
    dp = diffusers.StableDiffusionPipeline(
        unet=diffusers.UNet2DConditionModel(**UNET), vae=diffusers.AutoencoderKL(**vae_cfg(3)),
        text_encoder=transformers.CLIPTextModel(transformers.CLIPTextConfig(**text_cfg(tokenizer))),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(tdir), scheduler=diffusers.DDIMScheduler(**SCHED),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    dp.set_progress_bar_config(disable=True)
    d = tmp_path_factory.mktemp('dsd')
    dp.save_pretrained(d)
    return dp, d

# --------------------------------------------------------------------------------------------------------------
# minisd -> diffusers

def test_saved_layout(saved1):
    pipe, d = saved1
    index = json.loads((d/'model_index.json').read_text())
    assert index['_class_name'] == 'StableDiffusionPipeline'
    assert index['unet'] == ['diffusers', 'UNet2DConditionModel'] and index['vae'] == ['diffusers', 'AutoencoderKL']
    assert index['text_encoder'] == ['transformers', 'CLIPTextModel'] and index['tokenizer'] == ['transformers', 'CLIPTokenizer']
    assert index['scheduler'] == ['diffusers', 'DDIMScheduler'] and index['safety_checker'] == [None, None]
    for f in ('unet/config.json', 'unet/diffusion_pytorch_model.safetensors', 'vae/config.json',
              'vae/diffusion_pytorch_model.safetensors', 'text_encoder/config.json', 'text_encoder/model.safetensors',
              'tokenizer/vocab.json', 'tokenizer/merges.txt', 'scheduler/scheduler_config.json'):
        assert (d/f).is_file(), f
    assert json.loads((d/'unet/config.json').read_text())['_class_name'] == 'UNet2DConditionModel'
    assert json.loads((d/'text_encoder/config.json').read_text())['architectures'] == ['CLIPTextModel']
    assert not list(d.rglob('*.tmp'))

def test_diffusers_runs_minisd_pipeline_same_latents(saved1):
    "diffusers loads the 1-channel minisd folder and makes the same images from the same latents (CFG + negative prompt)."
    pipe, d = saved1
    dp = diffusers_load(d)
    lat = torch.randn(2, 4, 4, 4, generator=gen(0))
    args = dict(prompt=["a neat four", "a thin five"], negative_prompt=["six", "a bold two"], latents=lat, **KW)
    ours = pipe(**args, output_type='pt')
    theirs = dp(**args, output_type='pt').images
    assert ours.shape == (2, 1, 16, 16)
    assert_close(ours, theirs, **ATOL)
    assert (ours - ours.mean()).abs().max() > 1e-3   # not a constant image
    pil = dp(**args).images
    assert pil[0].mode == 'L' and pil[0].size == (16, 16)

def test_same_generator_same_images_as_diffusers(saved1):
    pipe, d = saved1
    dp = diffusers_load(d)
    for g in (lambda: gen(3), lambda: [gen(3), gen(4)]):
        args = dict(prompt="a sloppy eight", num_images_per_prompt=2, output_type='pt', **KW)
        assert_close(pipe(**args, generator=g()), dp(**args, generator=g()).images, **ATOL)

def test_clip_skip_matches_transformers(saved1):
    "clip_skip=1: the penultimate layer + final layer norm (transformers' model), for the prompt only, as diffusers does."
    pipe, d = saved1
    dp = diffusers_load(d)
    te = dp.text_encoder   # transformers 5's CLIPTextModel has no `.text_model`, which diffusers' clip_skip path needs
    ids = dp.tokenizer(["a neat four"], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        hs = te(ids, output_hidden_states=True).hidden_states
        cond = (te.final_layer_norm if hasattr(te, 'final_layer_norm') else te.text_model.final_layer_norm)(hs[-2])
        uncond = te(dp.tokenizer(["six"], padding="max_length", max_length=77, return_tensors="pt").input_ids)[0]
    ours_c, ours_u = pipe.encode_prompt("a neat four", "six", clip_skip=1)
    assert_close(ours_c, cond, **ATOL); assert_close(ours_u, uncond, **ATOL)
    lat = torch.randn(1, 4, 4, 4, generator=gen(1))
    a = pipe("a neat four", negative_prompt="six", latents=lat, output_type='pt', clip_skip=1, **KW)
    assert_close(a, dp(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=lat, output_type='pt', **KW).images, **ATOL)
    assert not torch.allclose(a, pipe("a neat four", negative_prompt="six", latents=lat, output_type='pt', **KW), atol=1e-4)

def test_img2img_matches_diffusers_1channel(saved1):
    pipe, d = saved1
    dp = diffusers_load(d, diffusers.StableDiffusionImg2ImgPipeline)
    im = Image.fromarray((torch.rand(16, 16, generator=gen(5)) * 255).byte().numpy(), mode='L')
    for strength, g in ((0.6, lambda: gen(7)), (1.0, lambda: [gen(7), gen(8)])):
        args = dict(prompt="a drawing of the digit one", negative_prompt="six", image=im, strength=strength,
                    num_images_per_prompt=2, output_type='pt', num_inference_steps=5, guidance_scale=5.0)
        assert_close(pipe(**args, generator=g()), dp(**args, generator=g()).images, **ATOL)

# --------------------------------------------------------------------------------------------------------------
# diffusers -> minisd

def test_minisd_loads_diffusers_pipeline(from_diffusers):
    dp, d = from_diffusers
    pipe = StableDiffusion.from_pretrained(d); pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler) is DDIMScheduler and pipe.vae_scale_factor == 4
    lat = torch.randn(1, 4, 4, 4, generator=gen(2))
    args = dict(prompt="a bold two", negative_prompt="a thin five", latents=lat, output_type='pt', **KW)
    ours = pipe(**args)
    assert ours.shape == (1, 3, 16, 16)
    assert_close(ours, dp(**args).images, **ATOL)
    pil = pipe(**{**args, 'output_type': 'pil'})
    assert pil[0].mode == 'RGB' and pil[0].size == (16, 16)

SAMPLERS = {'ddpm': ('DDPMScheduler', {}), 'ddim_eta': ('DDIMScheduler', dict(eta=0.7)),
            'euler': ('EulerDiscreteScheduler', {}), 'dpm++': ('DPMSolverMultistepScheduler', {})}

@pytest.mark.parametrize('sched', list(SAMPLERS))
def test_other_samplers_match_diffusers(from_diffusers, sched):
    "Stochastic (DDPM, DDIM eta>0) and sigma-based (Euler, DPM-Solver++) samplers: same generator, same images, txt2img and img2img."
    import minisd.schedulers as ms
    dp, d = from_diffusers
    pipe = StableDiffusion.from_pretrained(d); pipe.set_progress_bar_config(disable=True)
    name, extra = SAMPLERS[sched]
    if not hasattr(ms, name): pytest.skip(f'minisd has no {name}')
    pipe.scheduler = getattr(ms, name).from_config(SCHED)
    comps = {**dp.components, 'scheduler': getattr(diffusers, name).from_config(SCHED)}
    dt = diffusers.StableDiffusionPipeline(**comps); dt.set_progress_bar_config(disable=True)
    di = diffusers.StableDiffusionImg2ImgPipeline(**comps); di.set_progress_bar_config(disable=True)
    args = dict(prompt="a bold two", output_type='pt', **KW, **extra)
    assert_close(pipe(**args, generator=gen(11)), dt(**args, generator=gen(11)).images, **ATOL)
    x = torch.rand(1, 3, 16, 16, generator=gen(4))
    args = {**args, 'num_inference_steps': 5, 'image': x, 'strength': 0.6}
    assert_close(pipe(**args, generator=gen(12)), di(**args, generator=gen(12)).images, **ATOL)

def test_img2img_matches_diffusers_rgb(from_diffusers):
    dp, d = from_diffusers
    pipe = StableDiffusion.from_pretrained(d); pipe.set_progress_bar_config(disable=True)
    di = diffusers.StableDiffusionImg2ImgPipeline(**dp.components); di.set_progress_bar_config(disable=True)
    x = torch.rand(2, 3, 16, 16, generator=gen(4))
    args = dict(prompt=["a neat four", "six"], image=x, strength=0.7, output_type='pt', num_inference_steps=4, guidance_scale=4.0)
    assert_close(pipe(**args, generator=gen(9)), di(**args, generator=gen(9)).images, **ATOL)

# --------------------------------------------------------------------------------------------------------------
# behaviour

def test_generator_list_and_images_per_prompt(saved1):
    pipe, _ = saved1
    args = dict(output_type='pt', **KW)
    both = pipe(["a neat four", "six"], num_images_per_prompt=2, generator=[gen(i) for i in range(4)], **args)
    assert both.shape == (4, 1, 16, 16)
    for i, p in enumerate(["a neat four", "a neat four", "six", "six"]):
        assert_close(both[i:i+1], pipe(p, generator=gen(i), **args), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(both[0], both[1])

def test_guidance_scale_one_is_a_single_conditional_pass(saved1):
    pipe, _ = saved1
    sizes = []
    h = pipe.unet.register_forward_hook(lambda m, a, kw, out: sizes.append(a[0].shape[0]), with_kwargs=True)
    try:
        lat = torch.randn(1, 4, 4, 4, generator=gen(0))
        out = pipe("a neat four", guidance_scale=1.0, latents=lat, output_type='latent', num_inference_steps=3)
    finally: h.remove()
    assert sizes == [1, 1, 1]
    cond, uncond = pipe.encode_prompt("a neat four", do_classifier_free_guidance=False)
    assert uncond is None
    x = lat.clone()
    pipe.scheduler.set_timesteps(3)
    with torch.no_grad():
        for t in pipe.scheduler.timesteps: x = pipe.scheduler.step(pipe.unet(x, t, encoder_hidden_states=cond), t, x).prev_sample
    assert_close(out, x)

def test_output_types(saved1):
    pipe, _ = saved1
    args = dict(prompt="six", **KW)
    pil = pipe(**args, generator=gen(0))
    assert isinstance(pil, list) and len(pil) == 1 and pil[0].mode == 'L' and pil[0].size == (16, 16)
    pt = pipe(**args, generator=gen(0), output_type='pt')
    assert pt.dtype == torch.float32 and pt.shape == (1, 1, 16, 16) and 0 <= pt.min() and pt.max() <= 1
    assert_close(torch.tensor(list(pil[0].getdata()), dtype=torch.float32).reshape(16, 16) / 255, pt[0, 0], atol=1/255, rtol=0)
    assert pipe(**args, output_type='np').shape == (1, 16, 16, 1)
    assert pipe(**args, output_type='latent').shape == (1, 4, 4, 4)
    assert pipe(**args, height=24, width=32, output_type='pt').shape == (1, 1, 24, 32)

def test_img2img_strength_extremes(saved1):
    pipe, _ = saved1
    x = torch.rand(1, 16, 16, generator=gen(0))
    out0 = pipe("six", image=x, strength=0.0, generator=gen(1), output_type='pt', **KW)
    with torch.no_grad():
        z = pipe.vae.encode(x[None] * 2 - 1).sample(gen(1)) * pipe.vae.config.scaling_factor
        assert_close(out0, pipe.decode_latents(z))
    out1 = pipe("six", image=x, strength=1.0, generator=gen(1), output_type='pt', **KW)
    out1b = pipe("six", image=torch.rand(1, 16, 16, generator=gen(5)), strength=1.0, generator=gen(1), output_type='pt', **KW)
    # at strength 1 the start is sqrt(alpha_bar)*x0 + ..., with alpha_bar ~ 0.005: the image hardly matters
    assert (out1 - out1b).abs().max() < 0.1 * (out1 - out0).abs().max() + 1e-3

def test_training_mode_restored(saved1):
    pipe, _ = saved1
    pipe.unet.train(); pipe.vae.eval()
    seen = []
    h = pipe.unet.register_forward_pre_hook(lambda m, a: seen.append(m.training))
    try: pipe("six", output_type='latent', generator=gen(0), **KW)
    finally: h.remove()
    assert seen and not any(seen)                          # sampled in eval mode
    assert pipe.unet.training and not pipe.vae.training   # each model's mode given back
    pipe.unet.eval()

def test_truncation_warning(saved1):
    pipe, _ = saved1
    with pytest.warns(UserWarning, match="truncated.*nine"):
        pipe("seven " * 80 + "nine", output_type='latent', num_inference_steps=1)

# --------------------------------------------------------------------------------------------------------------
# save / load

def test_roundtrip_identical(saved1, tmp_path):
    pipe, d = saved1
    pipe2 = StableDiffusion.from_pretrained(d); pipe2.set_progress_bar_config(disable=True)
    for k, v in pipe.unet.state_dict().items(): assert torch.equal(v, pipe2.unet.state_dict()[k])
    args = dict(prompt="a bold two", negative_prompt="six", generator=gen(5), output_type='pt', **KW)
    assert torch.equal(pipe(**args), pipe2(**{**args, 'generator': gen(5)}))
    pipe2.save_pretrained(tmp_path)   # and again
    pipe3 = StableDiffusion.from_pretrained(tmp_path); pipe3.set_progress_bar_config(disable=True)
    assert torch.equal(pipe(**{**args, 'generator': gen(5)}), pipe3(**{**args, 'generator': gen(5)}))

def test_fp16_variant(saved1, tmp_path):
    pipe, d = saved1
    shutil.copytree(d, tmp_path, dirs_exist_ok=True)
    half = minisd_pipe(pipe.tokenizer, 1, seed=3).to(dtype=torch.float16)
    half.save_pretrained(tmp_path, variant='fp16')
    assert (tmp_path/'unet/diffusion_pytorch_model.fp16.safetensors').is_file()
    assert (tmp_path/'text_encoder/model.fp16.safetensors').is_file()
    default = StableDiffusion.from_pretrained(tmp_path)
    assert torch.equal(default.unet.conv_in.weight, pipe.unet.conv_in.weight)     # no variant: the fp32 files
    v = StableDiffusion.from_pretrained(tmp_path, variant='fp16')
    assert v.dtype == torch.float32
    assert torch.equal(v.unet.conv_in.weight, half.unet.conv_in.weight.float())
    v16 = StableDiffusion.from_pretrained(tmp_path, variant='fp16', torch_dtype=torch.float16)
    assert v16.dtype == torch.float16 and next(v16.text_encoder.parameters()).dtype == torch.float16
    with pytest.warns(UserWarning): StableDiffusion.from_pretrained(d, variant='fp16')   # no fp16 files: falls back

def test_bin_weights(saved1, tmp_path):
    pipe, _ = saved1
    pipe.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path/'unet/diffusion_pytorch_model.bin').is_file() and (tmp_path/'text_encoder/pytorch_model.bin').is_file()
    assert not list(tmp_path.rglob('*.safetensors'))
    pipe2 = StableDiffusion.from_pretrained(tmp_path); pipe2.set_progress_bar_config(disable=True)
    args = dict(prompt="six", generator=gen(2), output_type='pt', **KW)
    assert torch.equal(pipe(**args), pipe2(**{**args, 'generator': gen(2)}))
    dp = diffusers_load(tmp_path)   # diffusers reads the .bin layout too
    assert_close(pipe(**{**args, 'generator': gen(2)}), dp(**{**args, 'generator': gen(2)}).images, **ATOL)

def test_diffusers_fp16_variant_and_bin(from_diffusers, tmp_path):
    dp, _ = from_diffusers
    dp.save_pretrained(tmp_path/'bin', safe_serialization=False)
    pipe = StableDiffusion.from_pretrained(tmp_path/'bin')
    assert torch.equal(pipe.unet.conv_in.weight, dp.unet.conv_in.weight)
    dp.to(torch.float16).save_pretrained(tmp_path/'v', variant='fp16'); dp.to(torch.float32)
    pipe = StableDiffusion.from_pretrained(tmp_path/'v', variant='fp16', torch_dtype=torch.float16)
    assert pipe.dtype == torch.float16 and torch.equal(pipe.unet.conv_in.weight, dp.unet.conv_in.weight.half())

def test_broken_folders(saved1, tmp_path):
    _, d = saved1
    shutil.copytree(d, tmp_path/'p')
    (tmp_path/'p/unet/diffusion_pytorch_model.safetensors').write_bytes(b'\x00' * 100)
    with pytest.raises(ValueError, match='diffusion_pytorch_model.safetensors'): StableDiffusion.from_pretrained(tmp_path/'p')
    shutil.rmtree(tmp_path/'p/unet')
    with pytest.raises(FileNotFoundError, match="'unet' not found"): StableDiffusion.from_pretrained(tmp_path/'p')
    shutil.copytree(d, tmp_path/'q')
    (tmp_path/'q/vae/diffusion_pytorch_model.safetensors').unlink()
    with pytest.raises(FileNotFoundError, match='no weights file'): StableDiffusion.from_pretrained(tmp_path/'q')
    shutil.copytree(d, tmp_path/'r'); shutil.rmtree(tmp_path/'r/tokenizer')
    with pytest.raises(FileNotFoundError, match="'tokenizer' not found"): StableDiffusion.from_pretrained(tmp_path/'r')
    (tmp_path/'empty').mkdir()
    with pytest.raises(FileNotFoundError, match='model_index.json'): StableDiffusion.from_pretrained(tmp_path/'empty')
    with pytest.raises(FileNotFoundError, match='no pipeline folder'): StableDiffusion.from_pretrained(tmp_path/'nope')

def test_wrong_weights_shape(saved1, tmp_path):
    pipe, d = saved1
    shutil.copytree(d, tmp_path, dirs_exist_ok=True)
    cfg = json.loads((tmp_path/'unet/config.json').read_text())
    cfg['block_out_channels'] = [16, 16]
    (tmp_path/'unet/config.json').write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match='mis-shaped'): StableDiffusion.from_pretrained(tmp_path)

# --------------------------------------------------------------------------------------------------------------
# bad input

BAD = [
    (dict(prompt=[]), 'empty list'),
    (dict(prompt=7), 'str or a list'),
    (dict(prompt=["a", 3]), 'list of str'),
    (dict(prompt=["a", "b"], negative_prompt=["c"]), 'one negative prompt per prompt'),
    (dict(prompt="a", height=18), r'`height`.*multiple of the VAE scale factor 4'),
    (dict(prompt="a", width=30), r'`width`.*multiple of the VAE scale factor 4'),
    (dict(prompt="a", num_inference_steps=0), r'`num_inference_steps`.*>= 1'),
    (dict(prompt="a", strength=-0.1), r'`strength`.*\[0, 1\]'),
    (dict(prompt="a", strength=1.5, image=torch.rand(1, 16, 16)), r'`strength`.*\[0, 1\]'),
    (dict(prompt="a", num_images_per_prompt=2, generator=[gen(0)] * 3), 'one generator per image'),
    (dict(prompt="a", latents=torch.randn(1, 4, 8, 8)), r'expected \(1, 4, 4, 4\).*got \(1, 4, 8, 8\)'),
    (dict(prompt="a", image=torch.rand(1, 1, 18, 16)), 'multiples of the VAE scale factor 4'),
    (dict(prompt="a", image=torch.rand(1, 3, 16, 16)), '1-channel VAE'),
    (dict(prompt="a", image=torch.rand(1, 1, 16, 16) * 2 - 1), r'in \[0,1\]'),
    (dict(prompt="a", image=torch.rand(1, 16, 16), latents=torch.randn(1, 4, 4, 4)), 'not both'),
    (dict(prompt="a", output_type='jpg'), 'output_type'),
]

@pytest.mark.parametrize('kw,msg', BAD, ids=[m for _, m in BAD])
def test_bad_input(saved1, kw, msg):
    pipe, _ = saved1
    with pytest.raises(ValueError, match=msg): pipe(**{'num_inference_steps': 1, **kw})

def test_randn_tensor_matches_diffusers():
    from diffusers.utils.torch_utils import randn_tensor as d_randn
    for g in (lambda: gen(0), lambda: [gen(0), gen(1), gen(2)]):
        assert torch.equal(randn_tensor((3, 4, 5, 5), g()), d_randn((3, 4, 5, 5), generator=g()))

# --------------------------------------------------------------------------------------------------------------
# dispatch and schedulers

def test_from_pretrained_dispatch(saved1, tmp_path, monkeypatch):
    "A file goes to minisd.checkpoints.load_single_file, an 'org/name' that is not a path to checkpoints.download."
    import minisd.checkpoints as ck
    _, d = saved1
    calls = {}
    monkeypatch.setattr(ck, 'load_single_file', lambda p, **kw: calls.setdefault('single', (p, kw)) and ck.load_pipeline_folder(d))
    monkeypatch.setattr(ck, 'download', lambda repo, variant=None: calls.setdefault('hub', (repo, variant)) and d)
    f = tmp_path/'model.safetensors'; f.write_bytes(b'')
    StableDiffusion.from_pretrained(f, torch_dtype=torch.float16)
    assert calls['single'][0] == f and calls['single'][1]['torch_dtype'] == torch.float16
    pipe = StableDiffusion.from_pretrained('some-org/some-model', variant='fp16')
    assert calls['hub'] == ('some-org/some-model', 'fp16') and isinstance(pipe, StableDiffusion)

def test_scheduler_class_from_model_index(saved1, tmp_path):
    _, d = saved1
    shutil.copytree(d, tmp_path, dirs_exist_ok=True)
    index = json.loads((tmp_path/'model_index.json').read_text())
    for name, cls in (('DDPMScheduler', DDPMScheduler), ('PNDMScheduler', DDIMScheduler)):
        (tmp_path/'model_index.json').write_text(json.dumps({**index, 'scheduler': ['diffusers', name]}))
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter('always')
            pipe = StableDiffusion.from_pretrained(tmp_path)
        assert type(pipe.scheduler) is cls
        assert (name == 'PNDMScheduler') == any('PNDMScheduler' in str(x.message) for x in w)
        assert pipe.scheduler.config.beta_schedule == 'scaled_linear'

@pytest.mark.gpu
def test_cuda_fp16_matches_diffusers(saved1):
    "On a GPU in fp16, with a CPU generator: the same images as diffusers (fp16 tolerance)."
    _, d = saved1
    pipe = StableDiffusion.from_pretrained(d, torch_dtype=torch.float16, device='cuda'); pipe.set_progress_bar_config(disable=True)
    dp = diffusers.StableDiffusionPipeline.from_pretrained(d, safety_checker=None, torch_dtype=torch.float16).to('cuda')
    dp.set_progress_bar_config(disable=True)
    assert pipe.device.type == 'cuda' and pipe.dtype == torch.float16
    args = dict(prompt=["a neat four", "six"], negative_prompt="a bold two", output_type='pt', **KW)
    ours = pipe(**args, generator=gen(0))
    assert ours.device.type == 'cuda' and ours.dtype == torch.float32
    assert_close(ours, dp(**{**args, 'negative_prompt': ["a bold two"] * 2}, generator=gen(0)).images.float(), atol=2e-2, rtol=0)
    x = torch.rand(1, 16, 16, generator=gen(1))
    ours = pipe(**args, image=x, strength=0.5, generator=gen(2))
    theirs = diffusers.StableDiffusionImg2ImgPipeline(**dp.components)(**{**args, 'negative_prompt': ["a bold two"] * 2},
                                                                         image=x[None], strength=0.5, generator=gen(2)).images
    assert_close(ours, theirs.float(), atol=2e-2, rtol=0)

def test_callback_on_step_end_matches_diffusers(from_diffusers):
    "diffusers' `callback_on_step_end`: same arguments at every step, and the latents it returns replace the pipeline's."
    _, d = from_diffusers
    dp = diffusers_load(d)   # fresh: other tests swap the shared one's scheduler
    pipe = StableDiffusion.from_pretrained(d); pipe.set_progress_bar_config(disable=True)
    def make(log):
        def cb(p, i, t, kw):
            log.append((i, int(t), kw['latents'].clone()))
            return {'latents': kw['latents'] * 0.5} if i == 1 else kw
        return cb
    ours_log, ref_log = [], []
    lat = torch.randn(1, 4, 4, 4, generator=gen(3))
    args = dict(prompt="a bold two", latents=lat, output_type='pt', **KW)
    ours = pipe(**args, callback_on_step_end=make(ours_log), callback_on_step_end_tensor_inputs=['latents'])
    ref = dp(**args, callback_on_step_end=make(ref_log), callback_on_step_end_tensor_inputs=['latents']).images
    assert [(i, t) for i, t, _ in ours_log] == [(i, t) for i, t, _ in ref_log] and len(ours_log) == KW['num_inference_steps']
    for (_, _, a), (_, _, b) in zip(ours_log, ref_log): assert_close(a, b, **ATOL)
    assert_close(ours, ref, **ATOL)
    assert not torch.allclose(ours, pipe(**args))   # the halved latents changed the result

def test_cross_attention_kwargs_reach_the_unet(saved1, monkeypatch):
    "Passed to the U-Net only when given (the U-Net side of LoRA scaling lives in the U-Net)."
    pipe, _ = saved1
    seen = []
    forward = pipe.unet.forward
    monkeypatch.setattr(pipe.unet, 'forward', lambda *a, **kw: seen.append(kw.get('cross_attention_kwargs', 'absent')) or forward(*a, **{k: v for k, v in kw.items() if k != 'cross_attention_kwargs'}))
    pipe("a bold two", num_inference_steps=2, output_type='latent')
    pipe("a bold two", num_inference_steps=2, output_type='latent', cross_attention_kwargs={'scale': 0.5})
    assert seen == ['absent', 'absent', {'scale': 0.5}, {'scale': 0.5}]
