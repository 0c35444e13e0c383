"Fine-tuning and DreamBooth on a tiny random pipeline: what trains and what stays frozen, the losses, bad input."
import pytest, torch
from torch.testing import assert_close
from minisd.finetune import finetune, slant, thickness, shear, attribute_words, attribute_captions, image_latents, repeat_for_steps
from minisd.dreambooth import train_dreambooth, dreambooth_step, generate_class_images
from minisd.learner import Learner
from minisd.data import get_dls, load_mnist
from minisd.schedulers import DDPMScheduler
from test_ti_training import tiny_pipe

def state(m): return {k: v.detach().clone() for k, v in m.state_dict().items()}
def changed(a, b): return [k for k in a if not torch.equal(a[k], b[k])]

@pytest.mark.parametrize('train_te', [False, True])
def test_finetune_trains_unet_and_optionally_text_encoder(train_te):
    pipe = tiny_pipe()
    u0, t0, v0 = state(pipe.unet), state(pipe.text_encoder), state(pipe.vae)
    ims = torch.rand(6, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    caps = ['a thin five', ['a bold two', 'six'], 'the number three', ['seven'], 'a thin five', 'six']
    finetune(pipe, ims, caps, epochs=1, bs=3, train_text_encoder=train_te, progress=False)
    assert changed(u0, state(pipe.unet))
    assert bool(changed(t0, state(pipe.text_encoder))) == train_te
    assert not changed(v0, state(pipe.vae))
    assert not any(p.requires_grad for p in pipe.text_encoder.parameters())   # frozen again afterwards

def test_finetune_bad_input():
    pipe = tiny_pipe()
    with pytest.raises(ValueError, match='2 images but 3 captions'): finetune(pipe, torch.rand(2, 1, 16, 16), ['a', 'b', 'c'])
    with pytest.raises(ValueError, match='caption 1'): finetune(pipe, torch.rand(2, 1, 16, 16), ['a', []])
    with pytest.raises(ValueError, match='1 channel'): finetune(pipe, torch.rand(2, 3, 16, 16), ['a', 'b'])
    with pytest.raises(ValueError, match='1 channel'): image_latents(pipe, torch.rand(16, 16))

def test_measures():
    x, _ = load_mnist('valid', source='embedded')
    x = x[:64]
    assert_close(slant(shear(x, 0.25)) - slant(x), torch.full((64,), 0.25), atol=0.05, rtol=0)
    bar = torch.zeros(1, 1, 28, 28); bar[..., 4:24, 10:14] = 1
    assert_close(thickness(bar), torch.tensor([2 * 80 / 48]))               # 2 * area / outline
    assert (thickness(torch.nn.functional.max_pool2d(x, 3, 1, 1)) > thickness(x)).all()
    w = attribute_words(x)
    caps = attribute_captions(torch.arange(64) % 10, w, torch.Generator().manual_seed(0))
    for ws, c in zip(w, caps):
        n = sum(v is not None for v in ws)
        assert len(c) == (10 if n == 0 else 2 ** n)                           # every non-empty subset, plus one plain phrasing
        assert all(v in c[-2] for v in ws if v)                               # the last subset holds every word

def test_dreambooth_prior_loss():
    "The step's loss is mse(instance) + w * mse(class); with w=0 no class images are needed (or drawn)."
    pipe = tiny_pipe()
    inst = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    cls = generate_class_images(pipe, 'a bold two', 3, num_inference_steps=2, bs=2)
    assert cls.shape == (3, 1, 16, 16) and 0 <= cls.min() and cls.max() <= 1
    im, isd = image_latents(pipe, inst); cm, csd = image_latents(pipe, cls)
    e = lambda p: pipe.text_encoder(pipe.tokenize([p]))
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    batch = (im, isd, cm[:2], csd[:2])
    outs = {}
    for w in (0.0, 0.5):
        torch.manual_seed(0)
        outs[w] = dreambooth_step(sched, e('a sks two'), e('a bold two'), w)(Learner(pipe.unet, None, progress=False), batch)
    assert_close(outs[0.0]['loss'], outs[0.5]['instance'])                   # same draws for the instance half
    assert_close(outs[0.5]['loss'], outs[0.5]['instance'] + 0.5 * outs[0.5]['prior'])
    assert 'prior' not in outs[0.0]
    u0 = state(pipe.unet)
    train_dreambooth(pipe, inst, 'a sks two', prior_loss_weight=0, steps=2, bs=2, progress=False)
    assert changed(u0, state(pipe.unet))
    with pytest.raises(ValueError, match='class_prompt'): train_dreambooth(pipe, inst, 'a sks two', steps=1)
    with pytest.raises(ValueError, match='1 channel'): train_dreambooth(pipe, torch.rand(2, 3, 16, 16), 'a sks two', prior_loss_weight=0, steps=1)
