"Parity of minisd's CLIPTextModel with transformers' CLIPTextModel on tiny random configs with identical weights."
import json
import pytest, torch
from torch.testing import assert_close
from minisd.clip import CLIPTextConfig, CLIPTextModel, CLIP, CLIPConfig, clip_loss

transformers = pytest.importorskip('transformers')

CONFIGS = [  # (kwargs, ids convention)
    dict(hidden_act='quick_gelu', num_hidden_layers=2, num_attention_heads=4, hidden_size=32, eos_token_id=2, bos_token_id=0, pad_token_id=1),
    dict(hidden_act='gelu', num_hidden_layers=3, num_attention_heads=2, hidden_size=48, eos_token_id=99, bos_token_id=98, pad_token_id=0),
    dict(hidden_act='gelu', num_hidden_layers=4, num_attention_heads=8, hidden_size=64, eos_token_id=99, bos_token_id=98, pad_token_id=99),
    dict(hidden_act='quick_gelu', num_hidden_layers=1, num_attention_heads=1, hidden_size=16, eos_token_id=2, bos_token_id=0, pad_token_id=1, layer_norm_eps=1e-6),
]

def _ids(cfg, B=3, T=12, pad_with_eos=True):
    "Tokenizer-like ids: start, words, end, padding (the pad id of the checkpoint's convention)."
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 97, (B, T), generator=g)
    pad = 99 if pad_with_eos else 0
    for b, n in enumerate([T - 2, 4, 1][:B]):
        ids[b, 0], ids[b, n + 1] = 98, 99
        ids[b, n + 2:] = pad
    return ids

def _models(kw):
    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=100, intermediate_size=kw['hidden_size'] * 3, max_position_embeddings=16, **kw)
    ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg.to_dict())).eval()
    with torch.no_grad():
        for p in ref.parameters(): p.add_(torch.randn_like(p) * 0.1)   # LayerNorms away from identity too
    ours = CLIPTextModel(cfg).eval()
    sd = {f'text_model.{k}': v for k, v in ref.state_dict().items()}   # the checkpoint (transformers 4) key layout
    ours.load_state_dict(sd, strict=True)
    return cfg, ours, ref

@pytest.mark.parametrize('kw', CONFIGS)
@pytest.mark.parametrize('pad_with_eos', [True, False])
def test_matches_transformers(kw, pad_with_eos):
    cfg, ours, ref = _models(kw)
    ids = _ids(cfg, pad_with_eos=pad_with_eos)
    with torch.no_grad():
        want = ref(ids, output_hidden_states=True)
        got = ours.text_model(ids)
        assert_close(ours(ids), want.last_hidden_state)
        assert_close(got.last_hidden_state, want.last_hidden_state)
        assert_close(got.pooler_output, want.pooler_output)
        assert len(got.hidden_states) == len(want.hidden_states) == cfg.num_hidden_layers + 1
        for a, b in zip(got.hidden_states, want.hidden_states): assert_close(a, b)
        for k in range(cfg.num_hidden_layers):   # diffusers' clip_skip rule
            assert_close(ours(ids, clip_skip=k), ref.final_layer_norm(want.hidden_states[-(k + 1)]))
        assert_close(ours(ids[:, :5]), ref(ids[:, :5]).last_hidden_state)   # shorter inputs

def test_pooling_rule_differs_with_legacy_eos():
    "eos_token_id=2 pools at the highest id, otherwise at the first eos: a wrong rule would break one of these."
    cfg, ours, ref = _models(CONFIGS[1])
    ids = torch.tensor([[98, 5, 99, 97, 0, 0]])   # 97 < 99: highest id is the eos here
    out = ours.text_model(ids)
    assert_close(out.pooler_output, out.last_hidden_state[:, 2])
    ids = torch.tensor([[98, 5, 99, 99, 99, 99]])   # padded with eos: first one
    out = ours.text_model(ids)
    assert_close(out.pooler_output, out.last_hidden_state[:, 2])

def test_position_ids_and_unprefixed_keys_load_strict():
    cfg, ours, ref = _models(CONFIGS[0])
    sd = ours.state_dict()
    assert 'text_model.embeddings.position_ids' not in sd
    fresh = CLIPTextModel(cfg)
    fresh.load_state_dict({**sd, 'text_model.embeddings.position_ids': torch.arange(16)[None]}, strict=True)
    fresh.load_state_dict(ref.state_dict(), strict=True)   # transformers 5 layout (no text_model. prefix)
    with pytest.raises(RuntimeError, match='Missing'):
        fresh.load_state_dict({k: v for k, v in sd.items() if 'fc2' not in k})

def test_saved_files_load_in_transformers(tmp_path):
    from safetensors.torch import save_file
    cfg, ours, ref = _models(CONFIGS[1])
    save_file(ours.state_dict(), tmp_path/'model.safetensors')
    (tmp_path/'config.json').write_text(json.dumps(cfg.to_dict()))
    back = transformers.CLIPTextModel.from_pretrained(tmp_path).eval()
    ids = _ids(cfg)
    with torch.no_grad(): assert_close(back(ids).last_hidden_state, ours(ids))
    assert CLIPTextConfig.from_dict(json.loads((tmp_path/'config.json').read_text())) == cfg

@pytest.mark.parametrize('preset', ['mnist', 'sd15', 'sd21'])
def test_config_roundtrip(preset):
    cfg = getattr(CLIPTextConfig, preset)()
    tcfg = transformers.CLIPTextConfig(**cfg.to_dict())
    for k, v in cfg.to_dict().items():
        if k not in ('architectures', 'model_type'): assert getattr(tcfg, k) == v, k
    assert CLIPTextConfig.from_dict(tcfg.to_dict()) == cfg
    full = transformers.CLIPConfig(text_config=tcfg.to_dict()).to_dict()   # a full CLIP config: its text_config
    assert CLIPTextConfig.from_dict(full) == cfg
    with torch.device('meta'):   # parameter names and shapes equal transformers' for the real sizes
        ours = CLIPTextModel(cfg).state_dict(); ref = transformers.CLIPTextModel(tcfg).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {f'text_model.{k}': v.shape for k, v in ref.items()}

def test_bad_config_and_input():
    with pytest.raises(ValueError, match='hidden_act'): CLIPTextConfig.from_dict({'hidden_act': 'relu'})
    m = CLIPTextModel(CLIPTextConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, max_position_embeddings=8))
    with pytest.raises(ValueError, match='max_position_embeddings'): m(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match='clip_skip'): m(torch.zeros(1, 4, dtype=torch.long), clip_skip=2)

def test_clip_loss_and_model():
    logits = torch.randn(5, 5)
    ce = torch.nn.functional.cross_entropy
    assert_close(clip_loss(logits), (ce(logits, torch.arange(5)) + ce(logits.T, torch.arange(5))) / 2)
    assert clip_loss(torch.eye(5) * 50) < clip_loss(torch.zeros(5, 5))
    m = CLIP(CLIPConfig.mnist())
    ids = torch.tensor([[1021, 5, 1023, 1023], [1021, 6, 7, 1023], [1021, 8, 1023, 1023]])
    logits = m(torch.rand(2, 1, 28, 28), ids)
    assert logits.shape == (2, 3) and logits.abs().max() <= 100 + 1e-4
    assert_close(m.get_text_features(ids).norm(dim=-1), torch.ones(3))

def test_forward_always_returns_the_tensor():
    "One return type: the last hidden state; clip skip by argument, every layer through `text_model`."
    cfg, ours, ref = _models(CONFIGS[2])
    ids = _ids(cfg)
    with torch.no_grad():
        out, all_layers = ours(ids), ours.text_model(ids)
        assert isinstance(out, torch.Tensor) and isinstance(ours(ids, clip_skip=2), torch.Tensor)
    assert_close(out, all_layers.last_hidden_state)
    with pytest.raises(TypeError): ours(ids, output_hidden_states=True)

@pytest.mark.parametrize('new', [103, 100, 97])
def test_resize_token_embeddings_matches_transformers(tmp_path, new):
    "Old rows kept, new rows at the old rows' mean (transformers samples them with ~1e-9 covariance), config updated."
    cfg, ours, ref = _models(CONFIGS[1])
    old = ours.get_input_embeddings().weight.detach().clone()
    ours.get_input_embeddings().weight.requires_grad_(False)
    emb, want = ours.resize_token_embeddings(new), ref.resize_token_embeddings(new).weight.detach()
    assert emb is ours.get_input_embeddings() and emb.weight.shape == want.shape == (new, 48)
    assert not emb.weight.requires_grad   # the old embedding's setting carries over
    k = min(new, 100)
    assert torch.equal(emb.weight[:k], old[:k])
    assert_close(emb.weight[k:], want[k:], atol=1e-3, rtol=0)
    assert_close(emb.weight[k:], old.mean(0).expand(new - k, -1), atol=1e-6, rtol=0)
    assert ours.config.vocab_size == ref.config.vocab_size == new
    ids = torch.tensor([[98, new - 1, 5, 99]]) % new
    with torch.no_grad(): assert_close(ours(ids), ref(ids).last_hidden_state, atol=1e-3, rtol=0)   # new rows: the noise
    with pytest.raises(ValueError, match='at least 1'): ours.resize_token_embeddings(0)
