"LoRA: the same U-Net, text-encoder and pipeline outputs as diffusers' `load_lora_weights` for the same file in every format; fuse/unfuse/unload; runtime scale; save; bad files."
import json
import pytest, torch
from torch.testing import assert_close
from minisd.pipeline import StableDiffusion
from minisd import lora as ml
from tiny_sd import ATOL, gen, save_diffusers_pipeline, load_both

diffusers = pytest.importorskip('diffusers')
transformers = pytest.importorskip('transformers')
peft = pytest.importorskip('peft')

CAPTIONS = ["a handwritten digit seven", "the number three", "a picture of a zero", "a bold two", "a thin five", "six"]
KW = dict(num_inference_steps=3, guidance_scale=6.0, output_type='pt')
UNET_T, TE_T = list(ml.UNET_TARGET_MODULES), list(ml.TEXT_ENCODER_TARGET_MODULES)


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    "A tiny random SD pipeline written by diffusers/transformers."
    return save_diffusers_pipeline(tmp_path_factory.mktemp('sd'), CAPTIONS)

pipes = load_both

def random_lora(pipe, r=4, ranks=None, seed=0, components=('unet', 'text_encoder')):
    "`{component: {layer: (down, up)}}`: random adapters (up != 0) on the default targets, rank `ranks[suffix]` or `r`."
    g, out = gen(seed), {}
    for comp, targets in (('unet', UNET_T), ('text_encoder', TE_T)):
        if comp not in components: continue
        for n, m in getattr(pipe, comp).named_modules():
            if not ml._targets(n, targets): continue
            k = next((v for s, v in (ranks or {}).items() if n.endswith(s)), r)
            want_down, want_up = ml._expected_shapes(m, k)
            out.setdefault(comp, {})[n] = (torch.randn(*want_down, generator=g) * 0.3, torch.randn(*want_up, generator=g) * 0.3)
    return out

def peft_keys(layers):
    "diffusers/PEFT keys `<comp>.<layer>.lora_A.weight`."
    return {f"{c}.{n}.lora_{'AB'[i]}.weight": t for c, ls in layers.items() for n, du in ls.items() for i, t in enumerate(du)}

def kohya_keys(layers, alpha=None):
    "kohya/AUTOMATIC1111 keys `lora_unet_<layer with _>.lora_down.weight`, `lora_te_...`, `.alpha`."
    sd = {}
    for c, ls in layers.items():
        for n, (down, up) in ls.items():
            stem = ('lora_unet_' if c == 'unet' else 'lora_te_') + n.replace('.', '_')
            sd[f"{stem}.lora_down.weight"], sd[f"{stem}.lora_up.weight"] = down, up
            if alpha is not None: sd[f"{stem}.alpha"] = torch.tensor(float(alpha))
    return sd

OLD_UNET = {'to_q': 'to_q', 'to_k': 'to_k', 'to_v': 'to_v', 'to_out.0': 'to_out'}
OLD_TE = {'q_proj': 'to_q', 'k_proj': 'to_k', 'v_proj': 'to_v', 'out_proj': 'to_out'}

def old_keys(layers):
    "diffusers' pre-PEFT keys: `unet.<block>.attn1.processor.to_q_lora.down.weight`, `text_encoder.<...>.self_attn.to_q_lora...`, `...mlp.fc1.lora_linear_layer...`."
    sd = {}
    for c, ls in layers.items():
        for n, (down, up) in ls.items():
            head, _, last = n.rpartition('.')
            if n.endswith('to_out.0'): head, last = n[:-len('.to_out.0')], 'to_out.0'
            if c == 'unet':
                if last not in OLD_UNET: continue   # the old attention processors had no proj_in/proj_out adapters
                stem = f"unet.{head}.processor.{OLD_UNET[last]}_lora"
            else: stem = f"text_encoder.{head}.{OLD_TE[last]}_lora" if last in OLD_TE else f"text_encoder.{n}.lora_linear_layer"
            sd[f"{stem}.down.weight"], sd[f"{stem}.up.weight"] = down, up
    return sd

def save_with_diffusers(d, layers, unet_cfg=None, te_cfg=None):
    "Write the file with diffusers' own `save_lora_weights` (PEFT keys; header metadata from PEFT `LoraConfig`s)."
    sd = peft_keys(layers)
    strip = lambda c: {k[len(c) + 1:]: v for k, v in sd.items() if k.startswith(c + '.')}
    diffusers.StableDiffusionPipeline.save_lora_weights(
        d, unet_lora_layers=strip('unet'), text_encoder_lora_layers=strip('text_encoder'),
        unet_lora_adapter_metadata=unet_cfg and unet_cfg.to_dict(), text_encoder_lora_adapter_metadata=te_cfg and te_cfg.to_dict())
    return d/ml.LORA_WEIGHT_NAME_SAFE

def ids_for(dp, prompt="a bold two"):
    return dp.tokenizer([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids

def model_outputs(pipe, dp, cak=None):
    "(minisd, diffusers) U-Net and text-encoder outputs on the same inputs."
    x, t, ehs = torch.randn(2, 4, 4, 4, generator=gen(3)), 500, torch.randn(2, 7, 32, generator=gen(4))
    ids = ids_for(dp)
    extra = {} if cak is None else dict(cross_attention_kwargs=cak)
    with torch.no_grad():
        return ((pipe.unet(x, t, ehs, **extra), pipe.text_encoder(ids)),
                (dp.unet(x, t, ehs, **extra).sample, dp.text_encoder(ids)[0]))

def images(p, seed=5, **kw):
    return p("a bold two", negative_prompt="six", latents=torch.randn(1, 4, 4, 4, generator=gen(seed)), **KW, **kw)

def dimages(dp, seed=5, **kw): return images(dp, seed, **kw).images

def check_same(pipe, dp, changed_from=None):
    "U-Net, text encoder and images equal diffusers'; and differ from `changed_from` images when given."
    (u, te), (du, dte) = model_outputs(pipe, dp)
    assert_close(u, du, **ATOL); assert_close(te, dte, **ATOL)
    ours = images(pipe)
    assert_close(ours, dimages(dp), **ATOL)
    if changed_from is not None: assert (ours - changed_from).abs().max() > 1e-3, "the LoRA changed nothing"
    return ours

# --------------------------------------------------------------------------------------------------------------
# every file format: the same outputs as diffusers

@pytest.fixture(scope='module')
def base_images(folder):
    pipe, dp = pipes(folder)
    img = images(pipe); assert_close(img, dimages(dp), **ATOL)
    return img

def test_peft_file_with_metadata(folder, base_images, tmp_path):
    "diffusers' save_lora_weights with the adapter configs in the header: alpha != r, rank and alpha patterns, 4-d conv weights."
    pipe, dp = pipes(folder)
    layers = random_lora(pipe, r=4, ranks={'proj_in': 2, 'fc2': 3})
    ucfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=UNET_T, rank_pattern={'proj_in': 2}, alpha_pattern={'proj_out': 1.5})
    tcfg = peft.LoraConfig(r=4, lora_alpha=2, target_modules=TE_T, rank_pattern={'fc2': 3})
    f = save_with_diffusers(tmp_path, layers, ucfg, tcfg)
    header = ml.read_lora_file(f)[1]
    assert header['unet.lora_alpha'] == 8 and header['text_encoder.lora_alpha'] == 2   # the header is really there
    pipe.load_lora_weights(tmp_path)
    dp.load_lora_weights(tmp_path)
    assert pipe.unet.get_submodule('down_blocks.0.attentions.0.proj_in').lora_A.weight.ndim == 4
    check_same(pipe, dp, base_images)

def test_peft_file_without_metadata(folder, base_images, tmp_path):
    "No header: alpha = r (scale 1), as diffusers assumes."
    pipe, dp = pipes(folder)
    f = save_with_diffusers(tmp_path, random_lora(pipe, r=3, seed=1))
    assert ml.read_lora_file(f)[1] is None
    ml.load_lora_weights(pipe, f); dp.load_lora_weights(f)
    check_same(pipe, dp, base_images)

@pytest.mark.parametrize('alpha', [None, 2.0])
def test_kohya_file(folder, base_images, tmp_path, alpha):
    "kohya / AUTOMATIC1111 keys, with and without `.alpha` (r = 4: scale 0.5 or 1)."
    from safetensors.torch import save_file
    pipe, dp = pipes(folder)
    sd = kohya_keys(random_lora(pipe, r=4, seed=2), alpha)
    assert 'lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight' in sd
    assert 'lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight' in sd
    save_file(sd, tmp_path/'my_lora.safetensors')
    ml.load_lora_weights(pipe, tmp_path/'my_lora.safetensors'); dp.load_lora_weights(tmp_path, weight_name='my_lora.safetensors')
    check_same(pipe, dp, base_images)

def test_old_diffusers_keys(folder, base_images, tmp_path):
    "diffusers' pre-PEFT files (`...processor.to_q_lora.down.weight`, `lora_linear_layer`), from a state dict and from a .bin file."
    pipe, dp = pipes(folder)
    sd = old_keys(random_lora(pipe, r=2, seed=3))
    assert any('.processor.to_out_lora.up.weight' in k for k in sd) and any('self_attn.to_q_lora' in k for k in sd)
    torch.save(sd, tmp_path/ml.LORA_WEIGHT_NAME)
    ml.load_lora_weights(pipe, tmp_path); dp.load_lora_weights(dict(sd))
    check_same(pipe, dp, base_images)

def test_text_encoder_keys_without_text_model(folder, tmp_path):
    "Files written from transformers 5's CLIPTextModel (`text_encoder.encoder.layers...`) load as the `text_model.` ones."
    pipe, _ = pipes(folder)
    layers = random_lora(pipe, seed=4, components=('text_encoder',))
    sd = peft_keys(layers)
    flat = {k.replace('text_encoder.text_model.', 'text_encoder.'): v for k, v in sd.items()}
    ml.load_lora_weights(pipe, flat)
    a = pipe.text_encoder(ids_for_tok(pipe))
    ml.unload_lora(pipe.text_encoder)
    ml.load_lora_weights(pipe, sd)
    assert_close(pipe.text_encoder(ids_for_tok(pipe)), a)

def ids_for_tok(pipe): return pipe.tokenizer(["a bold two"])

# --------------------------------------------------------------------------------------------------------------
# scale, fuse, unfuse, unload

def test_runtime_scale_unet(folder, tmp_path):
    "`unet(..., cross_attention_kwargs={'scale': s})` scales the U-Net's LoRA for that call, as in diffusers."
    pipe, dp = pipes(folder)
    f = save_with_diffusers(tmp_path, random_lora(pipe, seed=5), peft.LoraConfig(r=4, lora_alpha=6, target_modules=UNET_T),
                            peft.LoraConfig(r=4, lora_alpha=3, target_modules=TE_T))   # diffusers needs both headers or none
    ml.load_lora_weights(pipe, f); dp.load_lora_weights(f)
    (u1, _), _ = model_outputs(pipe, dp)
    for s in (0.0, 0.5, 1.7):
        (u, _), (du, _) = model_outputs(pipe, dp, {'scale': s})
        assert_close(u, du, **ATOL)
    (u, _), _ = model_outputs(pipe, dp)
    assert_close(u, u1)   # the scale was for that call only

def test_runtime_scale_pipeline(folder, base_images, tmp_path):
    "`pipe(..., cross_attention_kwargs={'scale': s})` scales the U-Net's and the text encoder's LoRA, as diffusers does."
    pipe, dp = pipes(folder)
    f = save_with_diffusers(tmp_path, random_lora(pipe, seed=10))
    pipe.load_lora_weights(f); dp.load_lora_weights(f)
    full = images(pipe)
    for s in (0.4, 1.5):
        ours = images(pipe, cross_attention_kwargs={'scale': s})
        assert_close(ours, dimages(dp, cross_attention_kwargs={'scale': s}), **ATOL)
        assert (ours - full).abs().max() > 1e-3
    assert_close(images(pipe, cross_attention_kwargs={'scale': 0.}), base_images, **ATOL)
    te_only = StableDiffusion.from_pretrained(folder); te_only.set_progress_bar_config(disable=True)
    te_only.load_lora_weights({k: v for k, v in ml.read_lora_file(f)[0].items() if k.startswith('text_encoder.')})
    c1, _ = te_only.encode_prompt("a bold two", do_classifier_free_guidance=False)
    c0, _ = te_only.encode_prompt("a bold two", do_classifier_free_guidance=False, lora_scale=0.)
    assert_close(c0, pipes(folder)[0].encode_prompt("a bold two", do_classifier_free_guidance=False)[0])
    assert not torch.allclose(c0, c1, atol=1e-4)
    assert_close(images(pipe), full)   # the scale was for those calls only
    with pytest.raises(ValueError, match="components \\['vae'\\]"): pipe.fuse_lora(components=['vae'])

def test_fuse_unfuse_unload(folder, base_images, tmp_path):
    "fuse_lora(lora_scale=s) and unload equal diffusers'; unfuse returns to the unfused adapter; the state dict keys survive."
    pipe, dp = pipes(folder)
    keys = {c: list(getattr(pipe, c).state_dict()) for c in ('unet', 'text_encoder')}
    weight0 = pipe.unet.get_submodule('down_blocks.0.attentions.0.proj_in').weight.clone()
    f = save_with_diffusers(tmp_path, random_lora(pipe, seed=6), peft.LoraConfig(r=4, lora_alpha=8, target_modules=UNET_T),
                            peft.LoraConfig(r=4, lora_alpha=8, target_modules=TE_T))
    ml.load_lora_weights(pipe, f); dp.load_lora_weights(f)
    loaded = check_same(pipe, dp, base_images)
    pipe.fuse_lora(lora_scale=0.6)
    dp.fuse_lora(lora_scale=0.6)
    fused = check_same(pipe, dp, loaded)
    pipe.unfuse_lora()
    assert_close(images(pipe), loaded, **ATOL)   # diffusers keeps the layers scaled by 0.6 after unfusing (PEFT's scale_layer)
    pipe.fuse_lora(lora_scale=0.6)
    assert_close(images(pipe), fused, **ATOL)
    pipe.unload_lora_weights()
    dp.unload_lora_weights()
    check_same(pipe, dp)                          # the fused LoRA stays in the weights, in both
    assert_close(images(pipe), fused, **ATOL)
    assert {c: list(getattr(pipe, c).state_dict()) for c in ('unet', 'text_encoder')} == keys
    for c in ('unet', 'text_encoder'): ml.unfuse_lora(getattr(pipe, c))   # nothing left to unfuse
    assert not torch.equal(pipe.unet.get_submodule('down_blocks.0.attentions.0.proj_in').weight, weight0)

def test_unfuse_at_scale_one_matches_diffusers(folder, base_images, tmp_path):
    pipe, dp = pipes(folder)
    f = save_with_diffusers(tmp_path, random_lora(pipe, seed=7))
    ml.load_lora_weights(pipe, f); dp.load_lora_weights(f)
    pipe.fuse_lora()
    dp.fuse_lora()
    check_same(pipe, dp, base_images)
    pipe.unfuse_lora()
    dp.unfuse_lora()
    check_same(pipe, dp, base_images)
    pipe.unload_lora_weights()
    dp.unload_lora_weights()
    assert_close(check_same(pipe, dp), base_images, **ATOL)   # unfused then unloaded: the original model

# --------------------------------------------------------------------------------------------------------------
# saving

def test_save_lora_weights_roundtrip_and_diffusers_reads_it(folder, base_images, tmp_path):
    "minisd's file: diffusers' keys and header; diffusers loads it to the same outputs; alpha != r survives."
    from safetensors import safe_open
    pipe, dp = pipes(folder)
    names = ml.add_lora(pipe.unet, ml.UNET_TARGET_MODULES, r=4, lora_alpha=2)
    ml.add_lora(pipe.text_encoder, ml.TEXT_ENCODER_TARGET_MODULES, r=2, lora_alpha=3)
    pipe.unet.get_submodule(names[0]).lora_alpha = 5.0   # one layer differs: an alpha_pattern entry
    g = gen(8)
    for model in (pipe.unet, pipe.text_encoder):
        for m in ml.lora_layers(model).values(): torch.nn.init.normal_(m.lora_B.weight, std=0.3, generator=g)
    ours = images(pipe)
    f = StableDiffusion.save_lora_weights(tmp_path, unet_lora_layers=pipe.unet, text_encoder_lora_layers=pipe.text_encoder)
    assert f == tmp_path/'pytorch_lora_weights.safetensors' and not list(tmp_path.glob('*.tmp'))
    with safe_open(str(f), 'pt') as fh:
        keys, header = set(fh.keys()), fh.metadata()
    assert f'unet.{names[0]}.lora_A.weight' in keys and 'text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_B.weight' in keys
    meta = json.loads(header['lora_adapter_metadata'])
    assert meta['unet.r'] == 4 and meta['unet.lora_alpha'] == 2 and meta['unet.alpha_pattern'] == {names[0]: 5.0}
    assert meta['text_encoder.lora_alpha'] == 3
    peft.LoraConfig(**{k[5:]: v for k, v in meta.items() if k.startswith('unet.')})   # a valid PEFT config
    dp.load_lora_weights(tmp_path)
    assert_close(dimages(dp), ours, **ATOL)
    fresh, _ = pipes(folder)
    ml.load_lora_weights(fresh, f)
    assert_close(images(fresh), ours, **ATOL)
    b = ml.save_lora_weights(tmp_path/'bin', unet_lora_layers=pipe.unet, text_encoder_lora_layers=pipe.text_encoder, safe_serialization=False)
    assert b.name == 'pytorch_lora_weights.bin'
    fresh, dp2 = pipes(folder)
    ml.load_lora_weights(fresh, b); dp2.load_lora_weights(tmp_path/'bin')   # no header: alpha/r folded into `up`
    assert_close(images(fresh), ours, **ATOL); assert_close(dimages(dp2), ours, **ATOL)

def test_save_errors(tmp_path):
    with pytest.raises(ValueError, match='at least one'): ml.save_lora_weights(tmp_path)
    with pytest.raises(ValueError, match='not `<layer>.lora_A.weight`'): ml.save_lora_weights(tmp_path, unet_lora_layers={'conv_in.weight': torch.zeros(1)})
    (tmp_path/'f').write_text('x')
    with pytest.raises(ValueError, match='is a file'): ml.save_lora_weights(tmp_path/'f', unet_lora_layers={'a.lora_A.weight': torch.zeros(1, 1)})

# --------------------------------------------------------------------------------------------------------------
# bad files: clear errors naming the key, and the pipeline untouched

def good(pipe): return peft_keys(random_lora(pipe, r=2, seed=9))

def corrupt_wrong_layer(sd):
    sd['unet.down_blocks.7.attentions.0.proj_in.lora_A.weight'] = sd['unet.down_blocks.0.attentions.0.proj_in.lora_A.weight']
    return sd, KeyError, "'unet.down_blocks.7.attentions.0.proj_in.lora_A.weight' targets layer"

def corrupt_kohya_wrong_layer(sd):
    sd['lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn3_to_q.lora_down.weight'] = torch.zeros(2, 16)
    return sd, KeyError, "attn3_to_q.lora_down.weight' targets layer"

def corrupt_shape(sd):
    k = 'text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight'
    sd[k] = torch.zeros(2, 48)
    return sd, ValueError, f"{k!r} has shape (2, 48) but text_encoder.text_model.encoder.layers.0.self_attn.q_proj"

def corrupt_rank(sd):
    k = 'unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight'
    sd[k] = torch.zeros(sd[k].shape[0], 3)
    return sd, ValueError, 'rank mismatch'

def corrupt_missing_up(sd):
    del sd['unet.down_blocks.0.attentions.0.proj_out.lora_B.weight']
    return sd, KeyError, "'unet.down_blocks.0.attentions.0.proj_out.lora_A.weight' has no matching up weight"

def corrupt_not_lora(sd):
    sd['unet.conv_in.weight'] = torch.zeros(16, 4, 3, 3)
    return sd, KeyError, "'unet.conv_in.weight' is not a LoRA key"

def corrupt_conv_kernel(sd):
    k = 'unet.down_blocks.0.attentions.0.proj_in.lora_A.weight'
    sd[k] = torch.zeros(2, 16, 3, 3)
    return sd, ValueError, f"{k!r} has shape (2, 16, 3, 3)"

def corrupt_non_linear(sd):
    sd['unet.down_blocks.0.attentions.0.norm.lora_A.weight'] = torch.zeros(2, 16)
    sd['unet.down_blocks.0.attentions.0.norm.lora_B.weight'] = torch.zeros(16, 2)
    return sd, KeyError, 'a GroupNorm'

def corrupt_dora(sd):
    sd['unet.down_blocks.0.attentions.0.proj_in.lora_magnitude_vector'] = torch.zeros(16)
    return sd, ValueError, 'DoRA'

@pytest.mark.parametrize('corrupt', [corrupt_wrong_layer, corrupt_kohya_wrong_layer, corrupt_shape, corrupt_rank, corrupt_missing_up,
                                     corrupt_not_lora, corrupt_conv_kernel, corrupt_non_linear, corrupt_dora])
def test_bad_lora_files(folder, corrupt):
    pipe, _ = pipes(folder)
    sd, err, msg = corrupt(good(pipe))
    before = images(pipe)
    with pytest.raises(err) as e: ml.load_lora_weights(pipe, sd)
    assert msg in str(e.value), str(e.value)
    assert not ml.lora_layers(pipe.unet) and not ml.lora_layers(pipe.text_encoder)   # nothing half-loaded
    assert_close(images(pipe), before)

def test_wrong_model_and_double_load(folder, tmp_path):
    "A LoRA for a wider model fails on the first layer it does not fit; loading a second LoRA on top is refused."
    pipe, _ = pipes(folder)
    big = {k: torch.zeros(v.shape[0] * 2 if k.endswith('lora_B.weight') else v.shape[0], *v.shape[1:]) for k, v in good(pipe).items()}
    with pytest.raises(ValueError, match='a LoRA for another model'): ml.load_lora_weights(pipe, big)
    ml.load_lora_weights(pipe, good(pipe))
    with pytest.raises(ValueError, match='already hold a LoRA adapter'): ml.load_lora_weights(pipe, good(pipe))
    with pytest.raises(FileNotFoundError, match='no LoRA file or folder'): ml.load_lora_weights(pipe, tmp_path/'nope.safetensors')
    (tmp_path/'a.safetensors').write_bytes(b''); (tmp_path/'b.safetensors').write_bytes(b'')
    with pytest.raises(FileNotFoundError, match='pass weight_name='): ml.load_lora_weights(pipe, tmp_path)
    with pytest.raises(ValueError, match='cannot read weights'): ml.load_lora_weights(pipe, tmp_path, weight_name='a.safetensors')

# --------------------------------------------------------------------------------------------------------------
# training

def test_train_lora_changes_only_the_adapters_and_resumes(folder, tmp_path):
    pipe, _ = pipes(folder)
    base = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    te = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    ims, prompts = torch.rand(6, 3, 16, 16, generator=gen(0)), ["a bold two"] * 6
    torch.manual_seed(0)
    learn = ml.train_lora(pipe, ims, prompts, r=2, epochs=2, lr=1e-2, bs=4, ckpt=tmp_path/'lora.safetensors', progress=False)
    assert learn.n_steps == 4 and (tmp_path/'lora.safetensors').is_file()
    sd = pipe.unet.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in base.items())                 # frozen U-Net weights
    assert all(torch.equal(pipe.text_encoder.state_dict()[k], v) for k, v in te.items())
    ups = [m.lora_B.weight for m in ml.lora_layers(pipe.unet).values()]
    assert ups and all(u.abs().sum() > 0 for u in ups)                          # every adapter learned
    trained = ml.get_peft_model_state_dict(pipe.unet)
    again, _ = pipes(folder)
    ml.train_lora(again, ims, prompts, r=2, epochs=2, lr=1e-2, bs=4, ckpt=tmp_path/'lora.safetensors', progress=False)
    for k, v in ml.get_peft_model_state_dict(again.unet).items(): assert_close(v, trained[k])  # finished checkpoint: loaded, not retrained
    with pytest.raises(ValueError, match=r'images have to be \(N, 3, H, W\)'): ml.train_lora(again, ims[:, :1], prompts)
    with pytest.raises(ValueError, match='2 prompts for 6 images'): ml.train_lora(again, ims, prompts[:2])


def test_unet_takes_scale_without_lora(folder):
    "diffusers' `cross_attention_kwargs={'scale': s}` on a U-Net without adapters: no processor warning, same output."
    import warnings
    pipe, _ = pipes(folder)
    x, ehs = torch.randn(1, 4, 4, 4, generator=gen(1)), torch.randn(1, 7, 32, generator=gen(2))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter('error')
        assert_close(pipe.unet(x, 10, ehs, cross_attention_kwargs={'scale': 0.3}), pipe.unet(x, 10, ehs))
