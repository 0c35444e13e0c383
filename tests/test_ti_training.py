"Textual inversion training: the saved file loads in diffusers with the same images; only the new row is trained; bad input."
import pytest, torch
from torch.testing import assert_close
from safetensors.torch import load_file
from minisd.pipeline import StableDiffusion
from minisd.unet import UNet, UNetConfig
from minisd.vae import AutoencoderKL, VAEConfig
from minisd.clip import CLIPTextModel, CLIPTextConfig
from minisd.tokenizer import CLIPTokenizer
from minisd.schedulers import DDIMScheduler
from minisd.ti_training import train_textual_inversion, add_token
from minisd.textual_inversion import save_textual_inversion
from tiny_sd import UNET, vae_cfg, SCHED
VAE = vae_cfg(1)   # MNIST: one channel

diffusers = pytest.importorskip('diffusers')

CAPTIONS = ["a handwritten digit seven", "the number three", "a picture of a zero", "a thin five", "a bold two"]

def tiny_pipe(seed=0):
    torch.manual_seed(seed)
    tok = CLIPTokenizer.train(CAPTIONS, vocab_size=600)
    te = CLIPTextModel(CLIPTextConfig.from_dict(dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)))
    pipe = StableDiffusion(UNet(UNetConfig.from_dict(UNET)), AutoencoderKL(VAEConfig.from_dict(VAE)), te, tok, DDIMScheduler(**SCHED))
    pipe.set_progress_bar_config(disable=True)
    return pipe

@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    "A tiny pipeline saved before training, then a 6-step textual inversion of '<my-style>' on 3 images, saved."
    d = tmp_path_factory.mktemp('ti')
    pipe = tiny_pipe()
    pipe.save_pretrained(d / 'pipe')
    before = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    ims = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    vec = train_textual_inversion(pipe, ims, '<my-style>', 'a', 'a handwritten {} digit', steps=6, lr=0.05, bs=3, progress=False)
    f = save_textual_inversion(pipe, '<my-style>', d / 'emb')
    return pipe, before, vec, f, d

def test_only_the_new_row_changes(trained):
    pipe, before, vec, f, _ = trained
    w = pipe.text_encoder.get_input_embeddings().weight.detach()
    tid = pipe.tokenizer.convert_tokens_to_ids('<my-style>')
    assert tid == len(before) and w.shape[0] == len(before) + 1
    assert_close(w[:len(before)], before, rtol=0, atol=0)                  # every other word untouched (AdamW decay included)
    assert_close(w[tid], vec)
    init = before[pipe.tokenizer.encode('a', add_special_tokens=False)[0]]
    assert (vec - init).abs().max() > 1e-3                                  # and the new one trained away from its initializer

def test_file_layout(trained):
    _, _, vec, f, _ = trained
    assert f.name == 'learned_embeds.safetensors'
    sd = load_file(f)
    assert list(sd) == ['<my-style>'] and sd['<my-style>'].shape == (1, 32)   # (n, d), as diffusers' trainer saves
    assert_close(sd['<my-style>'][0], vec)

def test_diffusers_loads_it_same_images(trained):
    "diffusers' `load_textual_inversion` reads the file into the saved (untrained) pipeline; images equal minisd's."
    pipe, _, vec, f, d = trained
    dp = diffusers.StableDiffusionPipeline.from_pretrained(d / 'pipe', safety_checker=None)
    dp.set_progress_bar_config(disable=True)
    dp.load_textual_inversion(f.parent)                                       # a folder: finds learned_embeds.safetensors
    tid = dp.tokenizer.convert_tokens_to_ids('<my-style>')
    assert_close(dp.text_encoder.get_input_embeddings().weight[tid], vec)
    lat = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    args = dict(prompt=['a handwritten <my-style> digit', 'a thin <MY-STYLE> five'], latents=lat, num_inference_steps=3,
                guidance_scale=6.0, output_type='pt')
    assert_close(pipe(**args), dp(**args).images, atol=2e-4, rtol=1e-4)

def test_bad_input():
    pipe = tiny_pipe()
    ims = torch.rand(2, 1, 16, 16)
    with pytest.raises(ValueError, match='1 channel'): train_textual_inversion(pipe, torch.rand(2, 3, 16, 16), '<a>', 'a', steps=1)
    with pytest.raises(ValueError, match='N >= 1'): train_textual_inversion(pipe, torch.rand(0, 1, 16, 16), '<a>', 'a', steps=1)
    with pytest.raises(ValueError, match="'\\{\\}'"): train_textual_inversion(pipe, ims, '<a>', 'a', 'no slot', steps=1)
    with pytest.raises(ValueError, match='2 images'): train_textual_inversion(pipe, ims, '<a>', 'a', ['{}'] * 3, steps=1)
    with pytest.raises(ValueError, match='single token'): add_token(pipe, '<a>', 'a bold two')
    add_token(pipe, '<b>', 'a')
    with pytest.raises(ValueError, match='already contains'): add_token(pipe, '<b>', 'a')
