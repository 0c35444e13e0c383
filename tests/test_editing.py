"Inpainting and InstructPix2Pix pipelines: images equal diffusers' for the same tiny random weights and seeds; bad input."
import json
import pytest, torch
from PIL import Image
from torch.testing import assert_close
from minisd.inpainting import StableDiffusionInpaint
from minisd.instruct_pix2pix import StableDiffusionInstructPix2Pix, instruct_pix2pix_guidance
from minisd.pipeline import StableDiffusion
from minisd.tokenizer import CLIPTokenizer
from tiny_sd import unet_cfg, vae_cfg, SCHED, ATOL, gen

diffusers = pytest.importorskip('diffusers')
transformers = pytest.importorskip('transformers')

CAPTIONS = ["a handwritten digit seven", "turn it into a five", "make it bold", "a picture of a zero", "a thin five",
            "the number three", "a sloppy eight", "make it thin", "six"]


@pytest.fixture(scope='module')
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp('tok')
    CLIPTokenizer.train(CAPTIONS, vocab_size=600).save_pretrained(d)
    return d

def text_cfg(tok):
    return dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)

def build(cls, tok_dir, dir_, in_channels, channels=1, seed=0):
    "A tiny random diffusers pipeline of class `cls`, saved to `dir_`; returns (diffusers pipeline, folder)."
    tok = transformers.CLIPTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(seed)
    dp = cls(unet=diffusers.UNet2DConditionModel(**unet_cfg(in_channels)), vae=diffusers.AutoencoderKL(**vae_cfg(channels)),
             text_encoder=transformers.CLIPTextModel(transformers.CLIPTextConfig(**text_cfg(tok))), tokenizer=tok,
             scheduler=diffusers.DDIMScheduler(**SCHED), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    with torch.no_grad():   # the VAE's log-variance away from 0, so that posterior samples and the mode differ visibly
        dp.vae.quant_conv.bias[4:] -= 2.
    dp.set_progress_bar_config(disable=True)
    dp.save_pretrained(dir_)
    return dp, dir_

def load(cls, d):
    pipe = cls.from_pretrained(d)
    pipe.set_progress_bar_config(disable=True)
    return pipe

def rand_image(seed, channels=1, size=16):
    a = (torch.rand(size, size, channels, generator=gen(seed)) * 255).byte().numpy()
    return Image.fromarray(a[..., 0], mode='L') if channels == 1 else Image.fromarray(a, mode='RGB')

def half_mask(size=16, top=True):
    m = torch.zeros(size, size, dtype=torch.uint8)
    if top: m[:size // 2] = 255
    else: m[:, size // 2 + 1:] = 255
    return Image.fromarray(m.numpy(), mode='L')

@pytest.fixture(scope='module', params=[1, 3], ids=['1ch', '3ch'])
def inpaint9(request, tok_dir, tmp_path_factory):
    dp, d = build(diffusers.StableDiffusionInpaintPipeline, tok_dir, tmp_path_factory.mktemp('inp9'), 9, request.param)
    return dp, load(StableDiffusionInpaint, d), request.param

@pytest.fixture(scope='module')
def inpaint4(tok_dir, tmp_path_factory):
    dp, d = build(diffusers.StableDiffusionInpaintPipeline, tok_dir, tmp_path_factory.mktemp('inp4'), 4, 1, seed=1)
    return dp, load(StableDiffusionInpaint, d), d

@pytest.fixture(scope='module', params=[1, 3], ids=['1ch', '3ch'])
def ip2p(request, tok_dir, tmp_path_factory):
    dp, d = build(diffusers.StableDiffusionInstructPix2PixPipeline, tok_dir, tmp_path_factory.mktemp('ip2p'), 8, request.param, seed=2)
    return dp, load(StableDiffusionInstructPix2Pix, d), request.param

# --------------------------------------------------------------------------------------------------------------
# Inpainting

INPAINT_CASES = [  # strength, generators, images per prompt, prompts, negative prompt
    (1.0, lambda: gen(3), 1, "a handwritten digit seven", None),
    (1.0, lambda: [gen(3), gen(4)], 2, "a thin five", "six"),
    (0.6, lambda: gen(5), 2, ["a sloppy eight", "the number three"], ["six", "a picture of a zero"]),
    (0.5, lambda: [gen(6), gen(7)], 1, ["a sloppy eight", "the number three"], None),
]

@pytest.mark.parametrize('strength,g,n,prompt,neg', INPAINT_CASES)
def test_inpaint_9ch_matches_diffusers(inpaint9, strength, g, n, prompt, neg):
    dp, pipe, c = inpaint9
    args = dict(prompt=prompt, negative_prompt=neg, image=rand_image(1, c), mask_image=half_mask(), strength=strength,
                num_images_per_prompt=n, num_inference_steps=4, guidance_scale=5.0, output_type='pt')
    ours = pipe(**args, generator=g())
    assert_close(ours, dp(**args, generator=g()).images, **ATOL)
    assert ours.shape == (n * (1 if isinstance(prompt, str) else 2), c, 16, 16)

def test_inpaint_9ch_unet_input(inpaint9):
    "The U-Net sees [scaled latents, the mask at latent size (nearest), the masked image's scaled posterior sample]."
    dp, pipe, c = inpaint9
    seen = []
    h = pipe.unet.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try: pipe("a thin five", rand_image(2, c), half_mask(top=False), num_inference_steps=2, guidance_scale=1.0, generator=gen(0), output_type='latent')
    finally: h.remove()
    x = seen[0]
    assert x.shape == (1, 9, 4, 4)
    assert_close(x[0, 4], torch.tensor([[0., 0., 0., 1.]] * 4))   # columns 9.. repainted; nearest reads columns 0, 4, 8, 12
    g = gen(0); torch.randn(1, 4, 4, 4, generator=g)   # the initial noise is drawn first
    img = torch.from_numpy(__import__('numpy').array(rand_image(2, c))).float().reshape(16, 16, c).permute(2, 0, 1)[None] / 255 * 2 - 1
    masked = img * torch.cat([torch.ones(16, 9), torch.zeros(16, 7)], 1)
    with torch.no_grad(): ref = pipe.vae.encode(masked).sample(g) * pipe.vae.config.scaling_factor
    assert_close(x[:, 5:], ref, **ATOL)

@pytest.mark.parametrize('strength,g,n,prompt,neg', INPAINT_CASES)
def test_inpaint_4ch_blend_matches_diffusers(inpaint4, strength, g, n, prompt, neg):
    dp, pipe, _ = inpaint4
    args = dict(prompt=prompt, negative_prompt=neg, image=rand_image(1), mask_image=half_mask(), strength=strength,
                num_images_per_prompt=n, num_inference_steps=4, guidance_scale=5.0, output_type='pt')
    assert_close(pipe(**args, generator=g()), dp(**args, generator=g()).images, **ATOL)

def test_inpaint_given_latents_matches_diffusers(inpaint4, inpaint9):
    lat = torch.randn(2, 4, 4, 4, generator=gen(9))
    for dp, pipe, c in (inpaint4[:2] + (1,), inpaint9):
        args = dict(prompt="make it bold", image=rand_image(1, c), mask_image=half_mask(), num_images_per_prompt=2,
                    num_inference_steps=3, guidance_scale=4.0, output_type='pt', latents=lat)
        assert_close(pipe(**args, generator=gen(1)), dp(**args, generator=gen(1)).images, **ATOL)

def test_inpaint_4ch_keeps_the_known_region(inpaint4):
    "After the last step the unmasked latents are exactly the image's latents (the blend), the masked ones are not."
    dp, pipe, _ = inpaint4
    im = rand_image(4)
    lat = pipe("a thin five", im, half_mask(), num_inference_steps=3, generator=gen(2), output_type='latent')
    x = torch.from_numpy(__import__('numpy').array(im)).float()[None, None] / 255 * 2 - 1
    with torch.no_grad(): z = pipe.vae.encode(x).sample(gen(2)) * pipe.vae.config.scaling_factor   # the first draw
    assert_close(lat[..., 2:, :], z[..., 2:, :], rtol=0, atol=1e-6)
    assert (lat[..., :2, :] - z[..., :2, :]).abs().max() > 1e-2

def test_inpaint_mask_tensor_equals_pil(inpaint9):
    dp, pipe, c = inpaint9
    m = torch.zeros(1, 16, 16); m[:, :8] = 0.7   # >= 0.5 is repainted
    args = dict(prompt="make it bold", image=rand_image(1, c), num_inference_steps=2, output_type='pt')
    assert_close(pipe(**args, mask_image=m, generator=gen(0)), pipe(**args, mask_image=half_mask(), generator=gen(0)), rtol=0, atol=0)

def test_inpaint_callback_on_step_end(inpaint4):
    dp, pipe, _ = inpaint4
    calls = []
    def cb(p, i, t, kw):
        calls.append((i, int(t))); return {"latents": kw["latents"] * 0}
    lat = pipe("six", rand_image(1), half_mask(), num_inference_steps=3, generator=gen(0), output_type='latent', callback_on_step_end=cb)
    assert [i for i, _ in calls] == [0, 1, 2] and lat.abs().max() == 0

# --------------------------------------------------------------------------------------------------------------
# InstructPix2Pix

IP2P_CASES = [  # guidance_scale, image_guidance_scale, generators, images per prompt, prompt, negative prompt
    (6.0, 1.5, lambda: gen(3), 1, "turn it into a five", None),
    (6.0, 1.0, lambda: [gen(3), gen(4)], 2, "make it bold", "make it thin"),
    (4.0, 2.5, lambda: gen(5), 2, ["make it bold", "turn it into a five"], ["six", "a thin five"]),
    (1.0, 1.5, lambda: gen(6), 1, "make it thin", None),   # guidance off: one U-Net pass per step
]

@pytest.mark.parametrize('s,si,g,n,prompt,neg', IP2P_CASES)
def test_instruct_pix2pix_matches_diffusers(ip2p, s, si, g, n, prompt, neg):
    dp, pipe, c = ip2p
    args = dict(prompt=prompt, negative_prompt=neg, image=rand_image(1, c), guidance_scale=s, image_guidance_scale=si,
                num_images_per_prompt=n, num_inference_steps=4, output_type='pt')
    ours = pipe(**args, generator=g())
    assert_close(ours, dp(**args, generator=g()).images, **ATOL)
    assert ours.shape == (n * (1 if isinstance(prompt, str) else 2), c, 16, 16)

def test_instruct_pix2pix_given_latents_and_image_per_prompt(ip2p):
    dp, pipe, c = ip2p
    lat = torch.randn(2, 4, 4, 4, generator=gen(9))
    args = dict(prompt=["make it bold", "turn it into a five"], image=[rand_image(1, c), rand_image(2, c)], latents=lat,
                num_inference_steps=3, output_type='pt')
    assert_close(pipe(**args), dp(**args).images, **ATOL)

def test_instruct_pix2pix_unet_input_and_guidance(ip2p):
    "The U-Net sees [scaled latents, the image latents: the posterior's mode, NOT scaled], batch [text, image, none]."
    dp, pipe, c = ip2p
    seen = []
    h = pipe.unet.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    im = rand_image(3, c)
    try: pipe("make it bold", im, num_inference_steps=2, generator=gen(0), output_type='latent')
    finally: h.remove()
    x = torch.from_numpy(__import__('numpy').array(im)).float().reshape(16, 16, c).permute(2, 0, 1)[None] / 255 * 2 - 1
    with torch.no_grad(): mode = pipe.vae.encode(x).mode()
    assert seen[0].shape == (3, 8, 4, 4)
    assert_close(seen[0][:2, 4:], mode.expand(2, -1, -1, -1), **ATOL)
    assert seen[0][2, 4:].abs().max() == 0
    eps = torch.randn(6, 4, 2, 2)
    e_t, e_i, e_u = eps.chunk(3)
    assert_close(instruct_pix2pix_guidance(eps, 7.5, 1.0), e_i + 7.5 * (e_t - e_i))

# --------------------------------------------------------------------------------------------------------------
# Bad input

def test_inpaint_bad_input(inpaint9):
    dp, pipe, c = inpaint9
    im = rand_image(1, c)
    with pytest.raises(ValueError, match=r'`mask_image` is 8x8 but `image` is 16x16'):
        pipe("six", im, half_mask(8))
    with pytest.raises(ValueError, match=r"one-channel.*'RGB'"):
        pipe("six", im, half_mask().convert('RGB'))
    with pytest.raises(ValueError, match=r'one channel.*\(1, 3, 16, 16\)'):
        pipe("six", im, torch.zeros(1, 3, 16, 16))
    wrong = torch.rand(1, 4 - c if c == 3 else 3, 16, 16)   # a 1-channel image for an RGB VAE, or RGB for a grayscale one
    with pytest.raises(ValueError, match=rf'`image` has to be \(B,{c},H,W\)'):
        pipe("six", wrong, half_mask())
    with pytest.raises(ValueError, match='strength'):
        pipe("six", im, half_mask(), strength=0.1, num_inference_steps=4)
    with pytest.raises(ValueError, match='got 3 masks for 2 prompts'):
        pipe(["six", "make it bold"], im, [half_mask()] * 3)

def test_instruct_pix2pix_bad_input(ip2p):
    dp, pipe, c = ip2p
    with pytest.raises(ValueError, match=r'`image_guidance_scale` has to be >= 1.*0.5'):
        pipe("make it bold", rand_image(1, c), image_guidance_scale=0.5)
    with pytest.raises(ValueError, match=rf'`image` has to be \(B,{c},H,W\)'):
        pipe("make it bold", torch.rand(1, 2, 16, 16))

def test_pipeline_classes_refuse_wrong_unet_channels(inpaint4, ip2p, inpaint9):
    "Each class checks its U-Net's input channels, naming the counts it takes, the one it got and the class that fits."
    _, p4, d4 = inpaint4
    with pytest.raises(ValueError, match=r"StableDiffusionInstructPix2Pix needs a U-Net with 8 input channels.*has 4: "
                                         r"it is StableDiffusionPipeline's U-Net, load it with minisd.StableDiffusion$"):
        StableDiffusionInstructPix2Pix.from_pretrained(d4)
    with pytest.raises(ValueError, match=r'StableDiffusionInpaint needs a U-Net with 4 or 9 input channels.*has 8: '
                                         r'.*load it with minisd.StableDiffusionInstructPix2Pix$'):
        StableDiffusionInpaint(**ip2p[1].components)
    with pytest.raises(ValueError, match=r'StableDiffusion needs a U-Net with 4 input channels.*has 9: .*minisd.StableDiffusionInpaint$'):
        StableDiffusion(**inpaint9[1].components)
    with pytest.raises(ValueError, match=r'needs a U-Net with 8 input channels.*has 9'):
        StableDiffusionInstructPix2Pix(**inpaint9[1].components)

def test_saved_pipelines_name_their_class_and_load_in_diffusers(ip2p, inpaint9, tmp_path):
    "save_pretrained writes the editing pipeline's diffusers class; diffusers' generic loader picks it and makes the same images."
    for (dp, pipe, c), cls, kw in ((ip2p, diffusers.StableDiffusionInstructPix2PixPipeline, {}),
                                   (inpaint9, diffusers.StableDiffusionInpaintPipeline, {'mask_image': half_mask()})):
        d = pipe.save_pretrained(tmp_path/cls.__name__)
        assert json.loads((d/'model_index.json').read_text())['_class_name'] == cls.__name__
        theirs = diffusers.DiffusionPipeline.from_pretrained(d, safety_checker=None)
        assert type(theirs) is cls
        theirs.set_progress_bar_config(disable=True)
        args = dict(prompt="make it bold", image=rand_image(5, c), num_inference_steps=3, output_type='pt', **kw)
        assert_close(pipe(**args, generator=gen(0)), theirs(**args, generator=gen(0)).images, **ATOL)

# --------------------------------------------------------------------------------------------------------------
# Training pieces of the lessons

def test_widen_conv_in_starts_as_the_original(inpaint4):
    from minisd.guidance import widen_conv_in
    unet = inpaint4[1].unet
    for n in (8, 9):
        wide = widen_conv_in(unet, n)
        assert wide.config.in_channels == n and unet.config.in_channels == 4   # a copy; the original is untouched
        x, ehs = torch.randn(2, 4, 4, 4, generator=gen(0)), torch.randn(2, 77, 32, generator=gen(1))
        with torch.no_grad():
            assert_close(wide(torch.cat([x, torch.randn(2, n - 4, 4, 4)], 1), 10, ehs), unet(x, 10, ehs), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match='has to exceed'): widen_conv_in(unet, 4)

def test_training_steps_reach_the_new_channels(inpaint4):
    "One step of each lesson's loss: a finite scalar whose gradient reaches the zero-initialised input channels."
    from types import SimpleNamespace
    from minisd.guidance import widen_conv_in
    from minisd.inpainting import inpainting_step, half_masks
    from minisd.instruct_pix2pix import instruct_pix2pix_step
    from minisd.schedulers import DDPMScheduler
    pipe = inpaint4[1]
    torch.manual_seed(0)
    B, lat = 4, lambda: torch.randn(4, 4, 4, 4)
    masks = torch.nn.functional.interpolate(half_masks(16), size=(4, 4))
    cond, uncond = torch.randn(10, 3, 77, 32), torch.randn(77, 32)
    cases = [(9, inpainting_step(DDPMScheduler(), masks, cond, uncond, 0.5),
              (lat(), lat().abs(), torch.randn(B, 4, 4, 4, 4), torch.rand(B, 4, 4, 4, 4), torch.tensor([0, 3, 5, 9]))),
             (8, instruct_pix2pix_step(DDPMScheduler(), torch.randn(11, 77, 32), uncond, 0.5, p=0.05),
              (lat(), lat(), lat().abs(), torch.tensor([0, 10, 4, 2])))]
    for n, step, batch in cases:
        learn = SimpleNamespace(model=widen_conv_in(pipe.unet, n))
        loss = step(learn, batch)
        assert loss.ndim == 0 and torch.isfinite(loss)
        loss.backward()
        assert learn.model.conv_in.weight.grad[:, 4:].abs().sum() > 0

def test_instruct_pix2pix_conditioning_dropout(inpaint4):
    "p: instruction alone dropped for r in [0,p), both in [p,2p), image alone in [2p,3p) (diffusers' training script)."
    from types import SimpleNamespace
    from minisd.instruct_pix2pix import instruct_pix2pix_step
    from minisd.schedulers import DDPMScheduler
    seen = []
    def model(x, t, encoder_hidden_states): seen.append((x[:, 4:].abs().flatten(1).sum(1) > 0, encoder_hidden_states[:, 0, 0])); return x[:, :4]
    embeds, uncond = torch.ones(11, 77, 32), torch.zeros(77, 32)
    step = instruct_pix2pix_step(DDPMScheduler(), embeds, uncond, 1.0, p=0.2)
    torch.manual_seed(0)
    n = 4000
    step(SimpleNamespace(model=model), (torch.ones(n, 4, 2, 2), torch.zeros(n, 4, 2, 2), torch.ones(n, 4, 2, 2), torch.zeros(n, dtype=torch.long)))
    has_img, text = seen[0]
    has_text = text > 0
    frac = lambda m: m.float().mean().item()
    assert abs(frac(~has_text & has_img) - 0.2) < 0.03 and abs(frac(~has_text & ~has_img) - 0.2) < 0.03
    assert abs(frac(has_text & ~has_img) - 0.2) < 0.03 and abs(frac(has_text & has_img) - 0.4) < 0.03

def test_prompt_to_prompt_pairs(inpaint4):
    "Row 0 is the plain image of the source caption; with empty injection windows the edits are the plain images of theirs."
    from minisd.instruct_pix2pix import prompt_to_prompt_pairs
    pipe = load(StableDiffusion, inpaint4[2])
    z = torch.randn(2, 4, 4, 4, generator=gen(0))
    src, tgts = "a thin five", ["a sloppy eight", "the number three"]
    plain = lambda c: pipe([c], latents=z, num_images_per_prompt=2, num_inference_steps=4, guidance_scale=5.0, output_type='pt')
    pp = prompt_to_prompt_pairs(pipe, src, tgts, z, num_inference_steps=4)
    assert pp.shape == (3, 2, 1, 16, 16)
    assert_close(pp[0], plain(src), **ATOL)
    off = prompt_to_prompt_pairs(pipe, src, tgts, z, num_inference_steps=4, cross_replace_steps=0., self_replace_steps=0.)
    for i, c in enumerate(tgts): assert_close(off[i + 1], plain(c), **ATOL)
    assert (pp[1:] - off[1:]).abs().max() > 1e-4   # the source's maps, injected, change the edits
    with pytest.raises(ValueError, match='same number of words'): prompt_to_prompt_pairs(pipe, src, ["eight"], z)
