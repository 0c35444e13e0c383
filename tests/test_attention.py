"Attention processors against diffusers: same keys, diffusers' own processor classes and a custom one run unchanged in minisd with the same outputs."

import pytest, torch
from torch.testing import assert_close
from minisd.unet import UNet, UNetConfig, Attention, AttnProcessor, AttnProcessor2_0, SlicedAttnProcessor

diffusers = pytest.importorskip('diffusers')
from tiny_sd import same_weights
from diffusers.models import attention_processor as dap

XA, DN, XU, UP = 'CrossAttnDownBlock2D', 'DownBlock2D', 'CrossAttnUpBlock2D', 'UpBlock2D'
TINY = dict(sample_size=16, in_channels=3, out_channels=2, block_out_channels=(8, 16), layers_per_block=1,
            down_block_types=(XA, XA), up_block_types=(XU, XU), attention_head_dim=(2, 4), cross_attention_dim=12,
            norm_num_groups=4, transformer_layers_per_block=(1, 2))


def build_pair(**over):
    "(minisd UNet, diffusers UNet) with the same random weights."
    return same_weights(UNet, diffusers.UNet2DConditionModel, UNetConfig(**{**TINY, **over}))


def inputs(bs=2, hw=8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(bs, 3, hw, hw, generator=g), torch.randn(bs, 7, 12, generator=g)


class RecordingProcessor:
    "A processor written for diffusers: uses the module's tools, records the probabilities, takes an extra keyword."
    def __init__(self, store, name): self.store, self.name = store, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, step=None):
        batch_size, sequence_length, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        query = attn.to_q(hidden_states)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        key, value = attn.to_k(context), attn.to_v(context)
        query, key, value = attn.head_to_batch_dim(query), attn.head_to_batch_dim(key), attn.head_to_batch_dim(value)
        probs = attn.get_attention_scores(query, key, attention_mask)
        self.store[(self.name, step)] = probs.detach().clone()
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        return attn.to_out[1](attn.to_out[0](out))


def test_keys_equal_diffusers():
    ours, ref = build_pair()
    assert list(ours.attn_processors) == list(ref.attn_processors)   # same keys, same order
    assert 'down_blocks.1.attentions.0.transformer_blocks.1.attn2.processor' in ours.attn_processors
    assert all(type(p) is AttnProcessor2_0 for p in ours.attn_processors.values())
    from minisd.vae import AutoencoderKL, VAEConfig
    cfg = VAEConfig(block_out_channels=(8, 16), norm_num_groups=4, sample_size=16)
    assert list(AutoencoderKL(cfg).attn_processors) == list(diffusers.AutoencoderKL.from_config(cfg.to_dict()).attn_processors)


@pytest.mark.parametrize('proc', ['AttnProcessor', 'AttnProcessor2_0', 'SlicedAttnProcessor'])
def test_diffusers_processor_runs_unchanged(proc):
    "diffusers' own processor classes, set on minisd's U-Net, give diffusers' output (and minisd's own equivalents too)."
    ours, ref = build_pair()
    make = {'AttnProcessor': dap.AttnProcessor, 'AttnProcessor2_0': dap.AttnProcessor2_0, 'SlicedAttnProcessor': lambda: dap.SlicedAttnProcessor(1)}[proc]
    mine = {'AttnProcessor': AttnProcessor, 'AttnProcessor2_0': AttnProcessor2_0, 'SlicedAttnProcessor': lambda: SlicedAttnProcessor(1)}[proc]
    x, ehs = inputs()
    ref.set_attn_processor(make())
    with torch.no_grad(): expected = ref(x, 10, ehs).sample
    ours.set_attn_processor(make())
    with torch.no_grad(): got = ours(x, 10, ehs)
    assert_close(got, expected, rtol=0, atol=0)   # the very same operations
    ours.set_attn_processor(mine())
    with torch.no_grad(): assert_close(ours(x, 10, ehs), expected, rtol=0, atol=0)


def test_processors_agree_with_default():
    ours, _ = build_pair()
    x, ehs = inputs()
    with torch.no_grad():
        base = ours(x, 10, ehs)
        for p in (AttnProcessor(), SlicedAttnProcessor(1), SlicedAttnProcessor(3)):
            ours.set_attn_processor(p)
            out = ours(x, 10, ehs)
            assert_close(out, base, rtol=1e-5, atol=1e-6)
        ours.set_default_attn_processor()
        assert_close(ours(x, 10, ehs), base, rtol=0, atol=0)


def test_custom_recording_processor_dict_and_kwargs():
    "A dict of per-module recording processors, with cross_attention_kwargs passed through: same outputs and maps as diffusers."
    ours, ref = build_pair()
    x, ehs = inputs()
    rec_o, rec_r = {}, {}
    ours.set_attn_processor({k: RecordingProcessor(rec_o, k) for k in ours.attn_processors})
    ref.set_attn_processor({k: RecordingProcessor(rec_r, k) for k in ref.attn_processors})
    with torch.no_grad():
        got = ours(x, 10, ehs, cross_attention_kwargs={'step': 3})
        expected = ref(x, 10, ehs, cross_attention_kwargs={'step': 3}).sample
    assert_close(got, expected, rtol=0, atol=0)
    assert rec_o.keys() == rec_r.keys() and len(rec_o) == len(ours.attn_processors)
    assert all(step == 3 for _, step in rec_o)
    for k in rec_o: assert_close(rec_o[k], rec_r[k], rtol=0, atol=0)
    k2 = ('down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor', 3)
    assert rec_o[k2].shape == (2 * 4, 4 * 4, 7)   # (B*heads, HW at 1/2 resolution, text tokens)
    assert_close(rec_o[k2].sum(-1), torch.ones(8, 16))


def test_unaccepted_kwargs_dropped_with_warning():
    ours, _ = build_pair()
    x, ehs = inputs()
    with torch.no_grad():
        base = ours(x, 10, ehs)
        with pytest.warns(UserWarning, match=r"\['foo'\] are not expected by AttnProcessor2_0"):
            out = ours(x, 10, ehs, cross_attention_kwargs={'foo': 1})
    assert_close(out, base, rtol=0, atol=0)


def test_processor_dict_errors():
    ours, _ = build_pair()
    procs = ours.attn_processors
    keys = list(procs)
    short = dict(list(procs.items())[:-1])
    with pytest.raises(ValueError, match=f"number of processors {len(keys) - 1} does not match the number of attention layers: {len(keys)}") as e:
        ours.set_attn_processor(short)
    assert keys[-1] in str(e.value)   # names the missing key
    renamed = {**short, 'down_blocks.9.attn1.processor': AttnProcessor()}
    with pytest.raises(KeyError, match=r"missing \['" + keys[-1].replace('.', r'\.') + r"'\]; unknown \['down_blocks\.9\.attn1\.processor'\]"):
        ours.set_attn_processor(renamed)
    assert all(type(p) is AttnProcessor2_0 for p in ours.attn_processors.values())   # nothing changed by the failed calls


def test_attention_mask_module_parity():
    "Module level: minisd's Attention with a mask equals diffusers' Attention, for both processor kinds."
    torch.manual_seed(0)
    ref = dap.Attention(16, cross_attention_dim=12, heads=2, dim_head=8).eval()
    ours = Attention(16, cross_attention_dim=12, heads=2, dim_head=8).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, ctx = torch.randn(3, 10, 16), torch.randn(3, 5, 12)
    mask = torch.zeros(3, 1, 5); mask[0, :, 3:] = -10000.; mask[2, :, 0] = -10000.
    for mine, theirs in ((AttnProcessor(), dap.AttnProcessor()), (AttnProcessor2_0(), dap.AttnProcessor2_0()),
                         (SlicedAttnProcessor(2), dap.SlicedAttnProcessor(2))):
        ours.set_processor(mine); ref.set_processor(theirs)
        with torch.no_grad(): assert_close(ours(x, ctx, attention_mask=mask), ref(x, ctx, attention_mask=mask), rtol=0, atol=0)
    test_h = ours.head_to_batch_dim(torch.randn(3, 10, 16))
    assert_close(ours.batch_to_head_dim(test_h), ref.batch_to_head_dim(test_h), rtol=0, atol=0)
    t = torch.randn(3, 10, 16)
    for d in (3, 4): assert_close(ours.head_to_batch_dim(t, out_dim=d), ref.head_to_batch_dim(t, out_dim=d), rtol=0, atol=0)
    assert ours.scale == ref.scale and ours.heads == ref.heads


@pytest.mark.parametrize('slice_size', ['auto', 'max', 1, 'list'])
def test_attention_slice_like_diffusers(slice_size):
    ours, ref = build_pair()
    if slice_size == 'list':   # a different size per module, each fitting its head count: the order must be diffusers'
        slice_size = [i % m.heads + 1 for i, m in enumerate(m for m in ref.modules() if isinstance(m, dap.Attention))]
        assert len(set(slice_size)) > 2
    ours.set_attention_slice(slice_size); ref.set_attention_slice(slice_size)
    assert [type(p).__name__ for p in ours.attn_processors.values()] == [type(p).__name__ for p in ref.attn_processors.values()]
    assert [p.slice_size for p in ours.attn_processors.values()] == [p.slice_size for p in ref.attn_processors.values()]
    x, ehs = inputs()
    with torch.no_grad(): assert_close(ours(x, 10, ehs), ref(x, 10, ehs).sample, rtol=0, atol=0)
    ours.set_attention_slice(None)
    assert all(type(p) is AttnProcessor2_0 for p in ours.attn_processors.values())


def test_attention_slice_bad_sizes():
    ours, _ = build_pair()
    with pytest.raises(ValueError, match='between 1 and the number of heads'): ours.set_attention_slice(3)   # level 0 has 2 heads
    with pytest.raises(ValueError, match='provided 2 slice sizes'): ours.set_attention_slice([1, 1])


# ---------------------------------------------------------------------------------------------------------------------
# Controllers (minisd.attention): recording and Prompt-to-Prompt on a tiny U-Net
def test_controllers_on_unet():
    from minisd.attention import attention_controller, AttentionStore, AttentionReplace, AttentionController
    from minisd.tokenizer import CLIPTokenizer
    tok = CLIPTokenizer.train(["a handwritten three", "a handwritten eight", "the number seven"], vocab_size=600)
    ours, _ = build_pair()
    g = torch.Generator().manual_seed(3)
    x, ctx = torch.randn(1, 3, 8, 8, generator=g).repeat(4, 1, 1, 1), torch.randn(4, 77, 12, generator=g)   # [u_src, u_tgt, c_src, c_tgt]
    with torch.no_grad():
        plain = ours(x, 10, ctx)
        with attention_controller(ours, AttentionController()) as c: same = ours(x, 10, ctx)
        assert c.step == 0
        assert_close(same, plain, rtol=1e-5, atol=1e-6)
        with attention_controller(ours, AttentionStore()) as store: ours(x, 10, ctx); ours(x, 10, ctx)
        assert store.step == 1 and all(len(v) == 2 for v in store.maps.values())
        assert set(store.maps) == {k for k in ours.attn_processors if 'attn2' in k}
        assert store.average(8).shape == (4, 77, 8, 8) and store.average(4, steps=1).shape == (4, 77, 4, 4)
        with pytest.raises(ValueError, match='no recorded maps of 3x3'): store.average(3)
        ctl = AttentionReplace(["a handwritten three", "a handwritten eight"], tok, num_steps=1, cross_replace_steps=1., self_replace_steps=1.,
                               self_max_tokens=64)
        with attention_controller(ours, ctl): edited = ours(x, 10, ctx)
        assert_close(edited[:3], plain[:3], rtol=1e-5, atol=1e-6)   # unconditional half and the source: untouched
        assert not torch.allclose(edited[3], plain[3], atol=1e-4)     # the edited prompt: changed
        ctx2 = ctx.clone(); ctx2[3] = ctx[2]                          # edited prompt == source: the edit changes nothing
        same_prompts = AttentionReplace(["a handwritten three"] * 2, tok, num_steps=1, cross_replace_steps=1., self_replace_steps=1.)
        with attention_controller(ours, same_prompts): e2 = ours(x, 10, ctx2)
        assert_close(e2[3], e2[2], rtol=1e-5, atol=1e-6)
    assert all(type(p) is AttnProcessor2_0 for p in ours.attn_processors.values())   # processors restored


def test_token_mappers_multi_token_words():
    from minisd.attention import replacement_mapper, refinement_mapper, token_indices, equalizer
    from minisd.tokenizer import CLIPTokenizer
    tok = CLIPTokenizer.train(["a cat", "a dog"], vocab_size=520)   # few merges: long words split into several tokens
    n = lambda w: len(tok.encode(w, add_special_tokens=False))
    src, tgt = "a cat sits", "a elephant sits"
    ne, nc, i = n('elephant'), n('cat'), 1 + n('a')
    assert ne > 1 and ne != nc
    M = replacement_mapper(src, tgt, tok)
    assert_close(M[i:i + nc, i:i + ne], torch.full((nc, ne), 1 / ne))   # each source token spread over the new word's tokens
    assert M[:i, :i].equal(torch.eye(i))                                  # start token and "a": one to one
    assert M[i + nc, i + ne] == 1                                          # "sits" follows, shifted
    assert token_indices(tgt, 'elephant', tok) == list(range(i, i + ne))
    m, a = refinement_mapper("a cat", "a big cat", tok)
    assert a[0] == 1 and a[1:1 + n('a')].eq(1).all() and a[1 + n('a'):1 + n('a') + n('big')].eq(0).all()
    assert equalizer(src, {'sits': 3.}, tok)[token_indices(src, 'sits', tok)].eq(3).all()
