"Single-file / folder checkpoint reading: parity with diffusers' own LDM converters, strict errors, files, hub offline."
import os, re, json, time, copy, importlib
import pytest, torch
from safetensors.torch import save_file
from minisd.checkpoints import *

dsf = pytest.importorskip('diffusers.loaders.single_file_utils')
from diffusers import UNet2DConditionModel, AutoencoderKL
from transformers import CLIPTextModel as HFCLIPTextModel, CLIPTextConfig as HFCLIPTextConfig

# ---------------------------------------------------------------------------------------------------------------
# The inverse mapping (diffusers -> LDM), written independently of minisd.checkpoints: diffusers' converter must
# map its output back to the original (that checks this inverse), and so must ours (that checks ours).

RESNET_INV = {'norm1': 'in_layers.0', 'conv1': 'in_layers.2', 'time_emb_proj': 'emb_layers.1',
              'norm2': 'out_layers.0', 'conv2': 'out_layers.3', 'conv_shortcut': 'skip_connection'}
UNET_FIXED_INV = {'time_embedding.linear_1.': 'time_embed.0.', 'time_embedding.linear_2.': 'time_embed.2.',
                  'conv_in.': 'input_blocks.0.0.', 'conv_norm_out.': 'out.0.', 'conv_out.': 'out.2.'}

def _res_inv(rest):
    name, _, p = rest.rpartition('.')
    return f'{RESNET_INV[name]}.{p}'

def unet_key_to_ldm(k, L, up_has_attn):
    for a, b in UNET_FIXED_INV.items():
        if k.startswith(a): return b + k[len(a):]
    if m := re.match(r'down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.*)', k):
        b, kind, n, rest = int(m[1]), m[2], int(m[3]), m[4]
        i = 1 + b*(L+1) + (L if kind == 'downsamplers' else n)
        if kind == 'resnets': return f'input_blocks.{i}.0.{_res_inv(rest)}'
        if kind == 'attentions': return f'input_blocks.{i}.1.{rest}'
        return f'input_blocks.{i}.0.op.{rest[len("conv."):]}'
    if m := re.match(r'mid_block\.(resnets|attentions)\.(\d+)\.(.*)', k):
        return f'middle_block.{2*int(m[2])}.{_res_inv(m[3])}' if m[1] == 'resnets' else f'middle_block.1.{m[3]}'
    if m := re.match(r'up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.*)', k):
        b, kind, n, rest = int(m[1]), m[2], int(m[3]), m[4]
        i = b*(L+1) + (L if kind == 'upsamplers' else n)
        if kind == 'resnets': return f'output_blocks.{i}.0.{_res_inv(rest)}'
        if kind == 'attentions': return f'output_blocks.{i}.1.{rest}'
        return f'output_blocks.{i}.{2 if up_has_attn[b] else 1}.{rest}'
    raise KeyError(k)

def unet_to_ldm(sd, L):
    nb = 1 + max(int(m[1]) for k in sd if (m := re.match(r'up_blocks\.(\d+)\.', k)))
    up_has_attn = [any(k.startswith(f'up_blocks.{b}.attentions.') for k in sd) for b in range(nb)]
    return {'model.diffusion_model.' + unet_key_to_ldm(k, L, up_has_attn): v for k, v in sd.items()}

VAE_ATTN_INV = {'group_norm': 'norm', 'to_q': 'q', 'to_k': 'k', 'to_v': 'v', 'to_out.0': 'proj_out'}

def vae_key_to_ldm(k, nb):
    k = k.replace('conv_norm_out', 'norm_out')
    k = re.sub(r'down_blocks\.(\d+)\.resnets\.', r'down.\1.block.', k)
    k = re.sub(r'down_blocks\.(\d+)\.downsamplers\.0\.', r'down.\1.downsample.', k)
    k = re.sub(r'up_blocks\.(\d+)\.resnets\.', lambda m: f'up.{nb-1-int(m[1])}.block.', k)
    k = re.sub(r'up_blocks\.(\d+)\.upsamplers\.0\.', lambda m: f'up.{nb-1-int(m[1])}.upsample.', k)
    k = re.sub(r'mid_block\.resnets\.(\d+)\.', lambda m: f'mid.block_{int(m[1])+1}.', k)
    k = re.sub(r'mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.', lambda m: f'mid.attn_1.{VAE_ATTN_INV[m[1]]}.', k)
    return k.replace('conv_shortcut', 'nin_shortcut')

def vae_to_ldm(sd, nb):
    out = {}
    for k, v in sd.items():
        lk = vae_key_to_ldm(k, nb)
        if '.attn_1.' in lk and lk.endswith('weight') and v.ndim == 2: v = v[:, :, None, None]  # linear -> 1x1 conv
        out['first_stage_model.' + lk] = v
    return out

def clip_to_ldm(sd, text_model_level=True):
    "transformers CLIPTextModel keys (flattened or `text_model.`) -> SD 1 keys."
    sd = {k.removeprefix('text_model.'): v for k, v in sd.items()}
    return {'cond_stage_model.transformer.' + ('text_model.' if text_model_level else '') + k: v for k, v in sd.items()}

def clip_to_open_clip(sd, extra_layer=True):
    "transformers CLIPTextModel keys -> SD 2's OpenCLIP keys, with the unused last resblock and text_projection added."
    sd = {k.removeprefix('text_model.'): v for k, v in sd.items()}
    out, P = {}, 'cond_stage_model.model.'
    n = 1 + max(int(m[1]) for k in sd if (m := re.match(r'encoder\.layers\.(\d+)\.', k)))
    D = sd['embeddings.token_embedding.weight'].shape[1]
    for k, v in sd.items():
        if k == 'embeddings.token_embedding.weight': out[P + 'token_embedding.weight'] = v
        elif k == 'embeddings.position_embedding.weight': out[P + 'positional_embedding'] = v
        elif k.startswith('final_layer_norm.'): out[P + 'ln_final.' + k.split('.')[-1]] = v
        elif m := re.match(r'encoder\.layers\.(\d+)\.(.*)', k):
            i, rest = m[1], m[2]
            if re.match(r'self_attn\.[qkv]_proj\.', rest):
                if rest.startswith('self_attn.q_proj.'):
                    p = rest.split('.')[-1]
                    out[f'{P}transformer.resblocks.{i}.attn.in_proj_{p}'] = torch.cat([sd[f'encoder.layers.{i}.self_attn.{c}_proj.{p}'] for c in 'qkv'])
                continue
            rest = (rest.replace('self_attn.', 'attn.').replace('layer_norm1', 'ln_1').replace('layer_norm2', 'ln_2')
                        .replace('mlp.fc1', 'mlp.c_fc').replace('mlp.fc2', 'mlp.c_proj'))
            out[f'{P}transformer.resblocks.{i}.{rest}'] = v
        else: raise KeyError(k)
    if extra_layer:  # the 24th layer SD 2 does not use
        for k in [k for k in out if k.startswith(f'{P}transformer.resblocks.0.')]:
            out[k.replace('resblocks.0.', f'resblocks.{n}.')] = torch.randn_like(out[k])
    out[P + 'text_projection'] = torch.randn(D, D)
    out[P + 'logit_scale'] = torch.tensor(4.6)
    return out

# ---------------------------------------------------------------------------------------------------------------
# Tiny reference models

def rand_(m, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters(): p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return m.eval()

def tiny_unet(sd2=False, in_channels=4, seed=0):
    return rand_(UNet2DConditionModel(sample_size=8, in_channels=in_channels, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64, 64), down_block_types=('CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'),
        up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'), cross_attention_dim=32,
        attention_head_dim=[2, 4, 4] if sd2 else 2, use_linear_projection=sd2, upcast_attention=sd2), seed)

def tiny_vae(seed=1):
    return rand_(AutoencoderKL(in_channels=3, out_channels=3, down_block_types=('DownEncoderBlock2D',)*2,
        up_block_types=('UpDecoderBlock2D',)*2, block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
        sample_size=16), seed)

def tiny_clip(sd2=False, seed=2):
    c = HFCLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=77, hidden_act='gelu' if sd2 else 'quick_gelu', bos_token_id=0, eos_token_id=2, pad_token_id=1)
    return rand_(HFCLIPTextModel(c), seed)

def original_config(sd2=False, in_channels=4):
    "An LDM yaml config (parsed) for the tiny models: diffusers' config builder and ours both read it."
    unet = dict(image_size=8, in_channels=in_channels, out_channels=4, model_channels=32, attention_resolutions=[1, 2],
                num_res_blocks=2, channel_mult=[1, 2, 2], transformer_depth=1, context_dim=32, use_linear_in_transformer=sd2)
    unet.update(num_head_channels=16) if sd2 else unet.update(num_heads=2)
    ddconfig = dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, in_channels=3, out_ch=3, z_channels=4)
    return {'model': {'params': {'linear_start': 0.00085, 'linear_end': 0.012, 'timesteps': 1000, 'scale_factor': 0.18215,
            **({'parameterization': 'v'} if sd2 else {}),
            'unet_config': {'params': unet}, 'first_stage_config': {'params': {'ddconfig': ddconfig}}}}}

TEXT_OVERRIDES = {'text_encoder': {'num_attention_heads': 4}}

def norm(v): return list(v) if isinstance(v, (list, tuple)) else v

def flat(sd): return {k.removeprefix('text_model.'): v for k, v in sd.items()}

def assert_same_sd(a, b):
    assert sorted(a) == sorted(b), (sorted(set(a) - set(b))[:5], sorted(set(b) - set(a))[:5])
    for k in a: torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)

CASE_IN_CHANNELS = {'sd1': 4, 'sd2': 4, 'inpaint': 9, 'instruct_pix2pix': 8}

@pytest.fixture(scope='module', params=list(CASE_IN_CHANNELS))
def case(request):
    sd2, inch = request.param == 'sd2', CASE_IN_CHANNELS[request.param]
    unet, vae, clip = tiny_unet(sd2, inch), tiny_vae(), tiny_clip(sd2)
    ldm = {**unet_to_ldm(unet.state_dict(), 2), **vae_to_ldm(vae.state_dict(), 2),
           **(clip_to_open_clip(clip.state_dict()) if sd2 else clip_to_ldm(clip.state_dict()))}
    ldm.update({'betas': torch.rand(1000), 'alphas_cumprod': torch.rand(1000), 'model_ema.decay': torch.tensor(.9999),
                'model_ema.num_updates': torch.tensor(10), 'cond_stage_model.transformer.text_model.embeddings.position_ids': torch.arange(77)[None]})
    return dict(name=request.param, sd2=sd2, unet=unet, vae=vae, clip=clip, ldm=ldm, orig=original_config(sd2, inch))

# ---------------------------------------------------------------------------------------------------------------
# State-dict level: ours == diffusers' converters == the original diffusers weights

def test_unet_matches_diffusers_converter(case):
    orig, ldm = case['unet'].state_dict(), case['ldm']
    theirs = dsf.convert_ldm_unet_checkpoint(ldm, {'layers_per_block': 2})
    assert_same_sd(theirs, orig)  # the test's inverse mapping is right
    ours = convert_ldm_checkpoint(ldm, original_config=case['orig'], overrides=TEXT_OVERRIDES)
    assert_same_sd(ours['unet'], orig)

def test_vae_matches_diffusers_converter(case):
    orig, ldm = case['vae'].state_dict(), case['ldm']
    theirs = dsf.convert_ldm_vae_checkpoint(ldm, dict(case['vae'].config))
    assert_same_sd(theirs, orig)
    assert_same_sd(convert_ldm_checkpoint(ldm, original_config=case['orig'])['vae'], orig)

def test_text_encoder_matches_diffusers_converter(case):
    orig, ldm = flat(case['clip'].state_dict()), case['ldm']
    ours = flat(convert_ldm_checkpoint(ldm, original_config=case['orig'])['text_encoder'])
    assert_same_sd(ours, orig)
    if case['sd2']:
        theirs = dsf.convert_open_clip_checkpoint(case['clip'], ldm, prefix='cond_stage_model.model.')
        # diffusers drops the unused last layer by a fixed name (resblocks.23: real SD 2 has 24); ours by count
        theirs = {k: v for k, v in flat(theirs).items() if not k.startswith('encoder.layers.2.')}
    else:
        theirs = flat({k: v for k, v in dsf.convert_ldm_clip_checkpoint(ldm).items() if not k.endswith('position_ids')})
    assert_same_sd(theirs, orig)

def test_configs_match_diffusers(case):
    ours = convert_ldm_checkpoint(case['ldm'], original_config=case['orig'], overrides=TEXT_OVERRIDES)
    theirs = dsf.create_unet_diffusers_config_from_ldm(case['orig'], case['ldm'])
    for k in ('in_channels', 'out_channels', 'down_block_types', 'up_block_types', 'block_out_channels', 'layers_per_block',
              'cross_attention_dim', 'attention_head_dim', 'use_linear_projection', 'transformer_layers_per_block'):
        assert norm(ours['unet_config'][k]) == norm(theirs[k]), (k, ours['unet_config'][k], theirs[k])
    assert ours['unet_config']['upcast_attention'] == case['sd2']
    # the inferred configs build the reference models, which then load our weights strictly
    UNet2DConditionModel(**ours['unet_config']).load_state_dict(ours['unet'], strict=True)
    AutoencoderKL(**ours['vae_config']).load_state_dict(ours['vae'], strict=True)
    tc = ours['text_encoder_config']
    test_model = HFCLIPTextModel(HFCLIPTextConfig(**tc))
    test_model.load_state_dict(flat(ours['text_encoder']), strict=True)
    assert tc['num_hidden_layers'] == 2 and tc['hidden_act'] == ('gelu' if case['sd2'] else 'quick_gelu')
    vt = dsf.create_vae_diffusers_config_from_ldm(case['orig'], case['ldm'])
    for k in ('block_out_channels', 'layers_per_block', 'latent_channels', 'scaling_factor', 'in_channels', 'out_channels'):
        assert norm(ours['vae_config'][k]) == norm(vt[k]), k
    sc = ours['scheduler_config']
    assert (sc['beta_start'], sc['beta_end'], sc['beta_schedule'], sc['steps_offset'], sc['set_alpha_to_one'], sc['clip_sample']) == \
        (0.00085, 0.012, 'scaled_linear', 1, False, False)
    assert sc['prediction_type'] == ('v_prediction' if case['sd2'] else 'epsilon')

def test_unet_config_without_yaml():
    "No yaml: SD 1 -> 8 heads; SD 2 (OpenCLIP text) -> 64-channel heads, v-prediction unless global_step says SD 2-base."
    unet = tiny_unet(sd2=False)
    ldm = {**unet_to_ldm(unet.state_dict(), 2), **clip_to_ldm(tiny_clip().state_dict())}
    c = convert_ldm_checkpoint(ldm)
    assert c['unet_config']['attention_head_dim'] == 8 and c['scheduler_config']['prediction_type'] == 'epsilon'
    assert c['unet_config']['sample_size'] == 64 and c['vae'] is None
    ldm2 = {**unet_to_ldm(tiny_unet(sd2=True).state_dict(), 2), **clip_to_open_clip(tiny_clip(True).state_dict())}
    c2 = convert_ldm_checkpoint(ldm2)
    assert c2['unet_config']['upcast_attention'] and c2['unet_config']['use_linear_projection']
    assert c2['scheduler_config']['prediction_type'] == 'v_prediction' and c2['unet_config']['sample_size'] == 96
    c3 = convert_ldm_checkpoint(ldm2, global_step=875000)
    assert c3['scheduler_config']['prediction_type'] == 'epsilon' and c3['unet_config']['sample_size'] == 64
    assert convert_ldm_checkpoint(ldm2, prediction_type='epsilon')['scheduler_config']['prediction_type'] == 'epsilon'
    with pytest.raises(ValueError, match='prediction_type'): convert_ldm_checkpoint(ldm2, prediction_type='x0')

def test_sd1_clip_without_text_model_level():
    clip = tiny_clip()
    ldm = {**unet_to_ldm(tiny_unet().state_dict(), 2), **clip_to_ldm(clip.state_dict(), text_model_level=False)}
    assert_same_sd(flat(convert_ldm_checkpoint(ldm)['text_encoder']), flat(clip.state_dict()))

# ---------------------------------------------------------------------------------------------------------------
# Strict errors

def test_unknown_top_level_key_named(case):
    with pytest.raises(CheckpointError, match=r'conditioner\.embedders\.0\.foo'):
        convert_ldm_checkpoint({**case['ldm'], 'conditioner.embedders.0.foo': torch.zeros(1)})

def test_load_into_names_keys():
    m = tiny_vae()
    sd = dict(m.state_dict())
    sd['encoder.conv_in.weight'] = torch.zeros(1, 2, 3, 3)
    del sd['decoder.conv_out.bias']
    sd['decoder.extra.weight'] = torch.zeros(1)
    with pytest.raises(CheckpointError) as e: load_into(m, sd)
    msg = str(e.value)
    assert 'encoder.conv_in.weight (1, 2, 3, 3)' in msg and 'decoder.conv_out.bias' in msg and 'decoder.extra.weight' in msg
    assert '1 unknown keys' in msg and '1 missing keys' in msg and '1 mis-shaped keys' in msg
    # irrelevant keys are ignored; a good dict loads
    load_into(m, {**m.state_dict(), 'model_ema.decay': torch.tensor(1.), 'alphas_cumprod': torch.rand(3)})

def test_load_into_lists_first_n_and_count():
    m = torch.nn.Linear(2, 2)
    extra = {f'x{i}': torch.zeros(1) for i in range(25)}
    with pytest.raises(CheckpointError, match=r'25 unknown keys: x0, x1.*\(15 more\)'): load_into(m, {**m.state_dict(), **extra})

# ---------------------------------------------------------------------------------------------------------------
# Files

def test_files_roundtrip_and_corruption(tmp_path, case):
    ldm = case['ldm']
    save_file({k: v.contiguous() for k, v in ldm.items()}, tmp_path/'m.safetensors')
    torch.save({'state_dict': ldm, 'global_step': 875000}, tmp_path/'m.ckpt')
    for f in ('m.safetensors', 'm.ckpt'): assert_same_sd(load_state_dict_file(tmp_path/f), ldm)
    data = (tmp_path/'m.ckpt').read_bytes()
    (tmp_path/'broken.ckpt').write_bytes(data[:len(data)//2])
    with pytest.raises(ValueError, match='broken.ckpt'): load_state_dict_file(tmp_path/'broken.ckpt')
    (tmp_path/'junk.safetensors').write_bytes(b'not a safetensors file at all')
    with pytest.raises(ValueError, match='junk.safetensors'): load_state_dict_file(tmp_path/'junk.safetensors')

def test_component_weights_sharded_and_variants(tmp_path):
    m = tiny_vae()
    sd = m.state_dict()
    keys = list(sd)
    d = tmp_path/'vae'; d.mkdir()
    half = {k: v.half() for k, v in sd.items()}
    save_file({k: half[k] for k in keys[:10]}, d/'diffusion_pytorch_model-00001-of-00002.fp16.safetensors')
    save_file({k: half[k] for k in keys[10:]}, d/'diffusion_pytorch_model-00002-of-00002.fp16.safetensors')
    (d/'diffusion_pytorch_model.safetensors.index.fp16.json').write_text(json.dumps({'metadata': {}, 'weight_map': {
        k: f'diffusion_pytorch_model-0000{1 if i < 10 else 2}-of-00002.fp16.safetensors' for i, k in enumerate(keys)}}))
    torch.save(sd, d/'diffusion_pytorch_model.bin')
    assert_same_sd(load_component_weights(d, variant='fp16'), half)
    assert_same_sd(load_component_weights(d), sd)  # no plain safetensors: the .bin
    save_file(sd, d/'diffusion_pytorch_model.safetensors')
    assert component_weights_files(d)[0].name == 'diffusion_pytorch_model.safetensors'
    te = tmp_path/'text_encoder'; te.mkdir()
    save_file(tiny_clip().state_dict(), te/'model.fp16.safetensors')
    assert component_weights_files(te, 'fp16')[0].name == 'model.fp16.safetensors'
    with pytest.raises(FileNotFoundError, match='no weights file'): load_component_weights(te)

# ---------------------------------------------------------------------------------------------------------------
# Hub, offline

def test_download_offline_fails_fast_and_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path/'cache'))
    t = time.time()
    with pytest.raises(RuntimeError, match=r'(?s)cannot download some-user/some-model.*local folder or single file'):
        download('some-user/some-model', cache_dir=tmp_path/'cache')
    assert time.time() - t < 10


def test_download_unreachable_hub_fails_fast_and_clearly(tmp_path, monkeypatch):
    "No offline flag set, but no network (or a mistyped local path like 'runs/mnist'): a clear error within seconds."
    monkeypatch.setattr('minisd.checkpoints.hf_offline', lambda: False)  # CI sets HF_HUB_OFFLINE: act as a user without it
    monkeypatch.setattr('minisd.checkpoints.hub_reachable', lambda *a, **k: False)
    t = time.time()
    with pytest.raises(RuntimeError, match=r"'runs/missing' is not a local file or folder.*not reachable"):
        download('runs/missing', cache_dir=tmp_path/'cache')
    assert time.time() - t < 5

# ---------------------------------------------------------------------------------------------------------------
# Model level: minisd modules built from the inferred configs give the reference modules' outputs

def _unet_inputs(inch):
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, inch, 8, 8, generator=g), torch.tensor([10, 500]), torch.randn(2, 5, 32, generator=g)

@torch.no_grad()
def test_minisd_unet_and_text_encoder_from_converted(case):
    unet_mod = pytest.importorskip('minisd.unet'); clip_mod = pytest.importorskip('minisd.clip')
    c = convert_ldm_checkpoint(case['ldm'], original_config=case['orig'], overrides=TEXT_OVERRIDES)
    unet = load_into(unet_mod.UNet(unet_mod.UNetConfig.from_dict(c['unet_config'])), c['unet']).eval()
    x, t, ctx = _unet_inputs(case['unet'].config.in_channels)
    torch.testing.assert_close(unet(x, t, ctx), case['unet'](x, t, ctx).sample, atol=1e-5, rtol=1e-4)
    te = load_into(clip_mod.CLIPTextModel(clip_mod.CLIPTextConfig.from_dict(c['text_encoder_config'])), c['text_encoder']).eval()
    ids = torch.randint(3, 1000, (2, 77))
    torch.testing.assert_close(te(ids), case['clip'](ids).last_hidden_state, atol=1e-5, rtol=1e-4)

def _pipeline_modules():
    try: importlib.import_module('minisd.vae'); importlib.import_module('minisd.pipeline')
    except ImportError as e: pytest.skip(f'minisd.vae / minisd.pipeline not available: {e}')

@pytest.fixture(scope='module')
def tok_dir(tmp_path_factory):
    from minisd.tokenizer import CLIPTokenizer
    d = tmp_path_factory.mktemp('tok')
    CLIPTokenizer.train(['a photo of a digit seven', 'a drawing of a number one'] * 3, vocab_size=540).save_pretrained(d/'tokenizer')
    return d/'tokenizer'

@torch.no_grad()
@pytest.mark.parametrize('fmt', ['safetensors', 'ckpt'])
def test_load_single_file_matches_diffusers_modules(case, fmt, tmp_path, tok_dir):
    _pipeline_modules()
    f = tmp_path/f'model.{fmt}'
    if fmt == 'safetensors': save_file({k: v.contiguous() for k, v in case['ldm'].items()}, f)
    else: torch.save({'state_dict': case['ldm'], 'global_step': 1234}, f)
    (tmp_path/'model.yaml').write_text(__import__('yaml').safe_dump(case['orig']))  # found next to the checkpoint
    import minisd
    inch = case['unet'].config.in_channels
    cls = getattr(minisd, MINISD_PIPELINE_CLASSES[pipeline_class_name(inch)])   # recognised by the U-Net's input channels
    assert cls.__name__ == {4: 'StableDiffusion', 8: 'StableDiffusionInstructPix2Pix', 9: 'StableDiffusionInpaint'}[inch]
    pipe = cls.from_single_file(f, config=TEXT_OVERRIDES, tokenizer=tok_dir)
    if inch != 4:   # the text-to-image class refuses an editing checkpoint, naming the class to use
        with pytest.raises(ValueError, match=f'has {inch}: .*load it with minisd.{cls.__name__}$'):
            minisd.StableDiffusion.from_single_file(f, config=TEXT_OVERRIDES, tokenizer=tok_dir)
    x, t, ctx = _unet_inputs(inch)
    torch.testing.assert_close(pipe.unet(x, t, ctx), case['unet'](x, t, ctx).sample, atol=1e-5, rtol=1e-4)
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(pipe.vae.decode(z), case['vae'].decode(z).sample, atol=1e-5, rtol=1e-4)
    img = torch.rand(1, 3, 8, 8) * 2 - 1
    torch.testing.assert_close(pipe.vae.encode(img).mean, case['vae'].encode(img).latent_dist.mean, atol=1e-5, rtol=1e-4)
    ids = torch.randint(3, 1000, (1, 77))
    torch.testing.assert_close(pipe.text_encoder(ids), case['clip'](ids).last_hidden_state, atol=1e-5, rtol=1e-4)
    c = pipe.scheduler.config
    assert (c['beta_schedule'], c['beta_start'], c['beta_end'], c['steps_offset'], c['set_alpha_to_one'], c['clip_sample']) == \
        ('scaled_linear', 0.00085, 0.012, 1, False, False)
    assert c['prediction_type'] == ('v_prediction' if case['sd2'] else 'epsilon')
    assert pipe.vae.config.scaling_factor == 0.18215 and pipe.tokenizer.encode('a digit')[0] == pipe.tokenizer.bos_token_id

def test_load_single_file_dtype_and_tokenizer_errors(tmp_path, tok_dir, monkeypatch):
    _pipeline_modules()
    ldm = {**unet_to_ldm(tiny_unet().state_dict(), 2), **vae_to_ldm(tiny_vae().state_dict(), 2), **clip_to_ldm(tiny_clip().state_dict())}
    save_file({k: v.half().contiguous() for k, v in ldm.items()}, tmp_path/'m.safetensors')
    orig = original_config()
    from minisd.pipeline import StableDiffusion
    pipe = StableDiffusion.from_single_file(tmp_path/'m.safetensors', original_config=orig, config=TEXT_OVERRIDES, tokenizer=tok_dir, torch_dtype=torch.float16)
    assert pipe.unet.conv_in.weight.dtype == torch.float16 and pipe.text_encoder.dtype == torch.float16
    # no tokenizer anywhere, offline: a clear error, quickly
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    import minisd.checkpoints as ck
    monkeypatch.setattr(ck, '_SD_TOKENIZER_REPOS', {False: ('no-such-user/no-such-repo', None), True: ('no-such-user/no-such-repo', 'tokenizer')})
    with pytest.raises(RuntimeError, match='tokenizer=FOLDER'): load_single_file(tmp_path/'m.safetensors', original_config=orig, config=TEXT_OVERRIDES)
    # a tokenizer/ folder next to the checkpoint is used
    import shutil; shutil.copytree(tok_dir, tmp_path/'tokenizer')
    assert load_single_file(tmp_path/'m.safetensors', original_config=orig, config=TEXT_OVERRIDES)['tokenizer'].vocab_size == pipe.tokenizer.vocab_size
    # strictness end to end: an unknown U-Net key is named
    save_file({**{k: v.contiguous() for k, v in ldm.items()}, 'model.diffusion_model.input_blocks.1.0.foo.weight': torch.zeros(1)}, tmp_path/'x.safetensors')
    with pytest.raises(CheckpointError, match=r'down_blocks\.0\.resnets\.0\.foo\.weight'):
        load_single_file(tmp_path/'x.safetensors', original_config=orig, config=TEXT_OVERRIDES, tokenizer=tok_dir)

def test_extract_ema():
    unet = tiny_unet()
    ldm = {**unet_to_ldm(unet.state_dict(), 2), **clip_to_ldm(tiny_clip().state_dict())}
    ema = {'model_ema.' + ''.join(k.split('.')[1:]): v * 2 for k, v in ldm.items() if k.startswith('model.diffusion_model.')}
    c = convert_ldm_checkpoint({**ldm, **ema, 'model_ema.decay': torch.tensor(.9999)}, extract_ema=True)
    assert_same_sd(c['unet'], {k: v * 2 for k, v in unet.state_dict().items()})
    assert_same_sd(convert_ldm_checkpoint({**ldm, **ema})['unet'], unet.state_dict())  # default: the raw weights
    with pytest.raises(CheckpointError, match='lacks EMA'): convert_ldm_checkpoint(ldm, extract_ema=True)

# ---------------------------------------------------------------------------------------------------------------
# Full size, on the meta device (shapes only, no memory): the configs inferred without a yaml are SD's

@pytest.mark.parametrize('version', ['sd15', 'sd21'])
def test_full_size_configs_inferred(version):
    unet_mod = pytest.importorskip('minisd.unet'); clip_mod = pytest.importorskip('minisd.clip'); vae_mod = pytest.importorskip('minisd.vae')
    sd2 = version == 'sd21'
    with torch.device('meta'):
        unet = unet_mod.UNet(getattr(unet_mod.UNetConfig, version)())
        vae = vae_mod.AutoencoderKL(vae_mod.VAEConfig.sd15())
        te = clip_mod.CLIPTextModel(getattr(clip_mod.CLIPTextConfig, version)())
    ldm = {**unet_to_ldm(unet.state_dict(), 2), **vae_to_ldm(vae.state_dict(), 4),
           **(clip_to_open_clip(te.state_dict()) if sd2 else clip_to_ldm(te.state_dict()))}
    if sd2: assert 'cond_stage_model.model.transformer.resblocks.23.ln_1.weight' in ldm  # 24 layers in the file, as in SD 2
    c = convert_ldm_checkpoint(ldm)
    assert unet_mod.UNetConfig.from_dict(c['unet_config']) == unet.config
    assert clip_mod.CLIPTextConfig.from_dict(c['text_encoder_config']) == te.config
    vc = vae_mod.VAEConfig.from_dict(c['vae_config'])
    assert vc == vae_mod.VAEConfig(sample_size=768 if sd2 else 512)
    for m, k in ((unet, 'unet'), (vae, 'vae'), (te, 'text_encoder')): check_state_dict(m.state_dict(), c[k])
    assert c['scheduler_config']['prediction_type'] == ('v_prediction' if sd2 else 'epsilon')
