"Textual inversion loading: the same files, prompts and seeds give diffusers' images, in every file format; unloading; bad input."
import pytest, torch
from safetensors.torch import save_file
from torch.testing import assert_close
from minisd.textual_inversion import (load_textual_inversion, unload_textual_inversion, maybe_convert_prompt,
                                      save_textual_inversion, token_and_embedding)
from tiny_sd import ATOL, gen, save_diffusers_pipeline, load_both

diffusers = pytest.importorskip('diffusers')
transformers = pytest.importorskip('transformers')

CAPTIONS = ["a handwritten digit seven", "the number three", "a picture of a zero", "a drawing of the digit one",
            "an image of the number nine", "a bold two", "a thin five", "a sloppy eight", "a neat four", "six"]
D = 32   # the text encoder's width
KW = dict(num_inference_steps=3, guidance_scale=6.0, output_type='pt')

def vecs(n, seed): return torch.randn(n, D, generator=gen(seed))

@pytest.fixture(scope='module')
def saved(tmp_path_factory):
    "A tiny random pipeline written by diffusers/transformers."
    return save_diffusers_pipeline(tmp_path_factory.mktemp('pipe'), CAPTIONS)

@pytest.fixture(scope='module')
def files(tmp_path_factory):
    "One embedding in each format people have, written as their tools write them."
    t = tmp_path_factory.mktemp('emb')
    (t/'concept_bin').mkdir()   # 2022 sd-concepts file: one (d,) vector, pickled
    torch.save({'<cat-toy>': vecs(1, 10)[0]}, t/'concept_bin'/'learned_embeds.bin')
    (t/'concept_st').mkdir()    # current trainer: (n, d), safetensors first (the .bin beside it is ignored)
    save_file({'<multi>': vecs(3, 11)}, t/'concept_st'/'learned_embeds.safetensors')
    torch.save({'<decoy>': vecs(1, 12)}, t/'concept_st'/'learned_embeds.bin')
    (t/'named').mkdir()
    save_file({'<named>': vecs(2, 13)}, t/'named'/'my_style.safetensors')
    torch.save({'string_to_token': {'*': 265}, 'string_to_param': {'*': vecs(2, 14)}, 'name': '<a1111>', 'step': 3000,
                'sd_checkpoint': '7460a6fa', 'sd_checkpoint_name': 'v1-5-pruned'}, t/'a1111.pt')
    save_file({'emb_params': vecs(2, 15)}, t/'kohya.safetensors')
    return t

def cases(t):
    "(name, source, kwargs, the token to put in the prompts)"
    return [
        ('sd-concepts .bin folder, (d,)', t/'concept_bin', {}, '<cat-toy>'),
        ('diffusers .safetensors folder, (3, d)', t/'concept_st', {}, '<multi>'),
        ('folder + weight_name', t/'named', dict(weight_name='my_style.safetensors'), '<named>'),
        ('A1111 .pt, token from name', t/'a1111.pt', {}, '<a1111>'),
        ('A1111 .pt, token=', t/'a1111.pt', dict(token='<mine>'), '<mine>'),
        ('kohya .safetensors', t/'kohya.safetensors', dict(token='<kohya>'), '<kohya>'),
        ('bare tensor (2, d)', vecs(2, 16), dict(token='<bare>'), '<bare>'),
        ('dict in memory', {'<mem>': vecs(4, 17)}, {}, '<mem>'),
        ('list, tokens from the files', [t/'concept_bin', t/'a1111.pt'], {}, '<a1111>'),
        ('list with tokens', [t/'kohya.safetensors', vecs(1, 18)], dict(token=['<k>', '<t>']), '<k>'),
        ('one tensor, one row per token', vecs(2, 19), dict(token=['<r0>', '<r1>']), '<r1>'),
    ]

def images(p, tok, **extra):
    "Multi-vector (or single) token in both the prompt and the negative prompt; CFG on; fixed latents."
    lat = torch.randn(2, 4, 4, 4, generator=gen(0))
    out = p(prompt=[f"a neat {tok} four", f"{tok}"], negative_prompt=[f"six {tok}", "a bold two"], latents=lat, **KW, **extra)
    return out if isinstance(out, torch.Tensor) else out.images

@pytest.mark.parametrize('i', range(11))
def test_same_images_as_diffusers(saved, files, i):
    name, src, kw, tok = cases(files)[i]
    pipe, dp = load_both(saved)
    base = images(pipe, tok)
    assert_close(base, images(dp, tok), **ATOL)
    n0 = len(pipe.tokenizer)
    added = load_textual_inversion(pipe, src, **kw)
    dp.load_textual_inversion(src, **kw)
    # the same tokens and ids, the same rows, the same prompts after the multi-vector rewrite
    assert len(pipe.tokenizer) == len(dp.tokenizer) == n0 + len(added)
    assert {t: pipe.tokenizer.convert_tokens_to_ids(t) for t in added} == {t: dp.tokenizer.convert_tokens_to_ids(t) for t in added}
    assert_close(pipe.text_encoder.get_input_embeddings().weight, dp.text_encoder.get_input_embeddings().weight)
    prompt = f"a neat {tok} four, {tok.upper()}!"
    assert maybe_convert_prompt(prompt, pipe.tokenizer) == dp.maybe_convert_prompt(prompt, dp.tokenizer)
    conv = maybe_convert_prompt(prompt, pipe.tokenizer)
    assert pipe.tokenizer.encode(conv) == dp.tokenizer(conv).input_ids
    loaded = images(pipe, tok)
    assert_close(loaded, images(dp, tok), **ATOL)
    assert (loaded - base).abs().max() > 1e-3   # the token changed the images
    unload_textual_inversion(pipe); dp.unload_textual_inversion()
    assert len(pipe.tokenizer) == len(dp.tokenizer) == n0 and pipe.tokenizer.added_tokens_encoder == {}
    assert pipe.text_encoder.get_input_embeddings().weight.shape == (n0, D)
    assert_close(images(pipe, tok), images(dp, tok), **ATOL)
    assert_close(images(pipe, tok), base, **ATOL)

def test_multi_vector_expansion(saved, files):
    pipe, _ = load_both(saved)
    assert load_textual_inversion(pipe, files/'concept_st') == ['<multi>', '<multi>_1', '<multi>_2']
    assert maybe_convert_prompt(["a <multi> dog", "x"], pipe.tokenizer) == ["a <multi> <multi>_1 <multi>_2 dog", "x"]
    enc = lambda p: pipe.tokenizer.encode(p, add_special_tokens=False)
    n = len(pipe.tokenizer) - 3
    assert enc("a <multi> six") == enc("a") + [n] + enc("six")
    assert enc(maybe_convert_prompt("a<multi>six", pipe.tokenizer)) == enc("a") + [n, n + 1, n + 2] + enc("six")
    assert enc(maybe_convert_prompt("a<MULTI>six", pipe.tokenizer)) == enc("a") + [n] + enc("six")   # diffusers' rule: exact case only
    assert_close(pipe.text_encoder.get_input_embeddings().weight[n:], vecs(3, 11))
    if hasattr(pipe, 'maybe_convert_prompt'): assert pipe.maybe_convert_prompt("<multi>", pipe.tokenizer) == "<multi> <multi>_1 <multi>_2"

def test_unload_some_tokens(saved, files):
    "Unloading one token removes its vectors (all of a multi-vector token) and renumbers the later ones, rows with them."
    pipe, _ = load_both(saved)
    n0 = len(pipe.tokenizer)
    load_textual_inversion(pipe, [files/'concept_bin', files/'concept_st', files/'kohya.safetensors'], token=['<a>', '<b>', '<c>'])
    assert len(pipe.tokenizer) == n0 + 1 + 3 + 2
    unload_textual_inversion(pipe, '<b>')
    assert pipe.tokenizer.added_tokens_encoder == {'<a>': n0, '<c>': n0 + 1, '<c>_1': n0 + 2}
    w = pipe.text_encoder.get_input_embeddings().weight
    assert w.shape == (n0 + 3, D) and pipe.text_encoder.config.vocab_size == n0 + 3
    assert_close(w[n0], vecs(1, 10)[0]); assert_close(w[n0 + 1:], vecs(2, 15))
    assert load_textual_inversion(pipe, files/'concept_st') == ['<multi>', '<multi>_1', '<multi>_2']   # ids from len again
    assert pipe.tokenizer.convert_tokens_to_ids('<multi>_2') == n0 + 5
    unload_textual_inversion(pipe, ['<a>', '<multi>'])
    assert pipe.tokenizer.added_tokens_encoder == {'<c>': n0, '<c>_1': n0 + 1}
    with pytest.raises(ValueError, match="<zzz>"): unload_textual_inversion(pipe, '<zzz>')

def test_save_round_trip_and_diffusers_reads_it(saved, tmp_path):
    pipe, dp = load_both(saved)
    load_textual_inversion(pipe, vecs(2, 20), token='<style>')
    p = save_textual_inversion(pipe, '<style>', tmp_path/'out')
    assert p == tmp_path/'out'/'learned_embeds.safetensors' and not list(tmp_path.rglob('*.tmp'))
    save_textual_inversion(pipe, '<style>', tmp_path/'e.bin')
    for f in (tmp_path/'out', tmp_path/'e.bin'):
        sd = torch.load(f, weights_only=True) if f.suffix == '.bin' else None
        if sd is not None: assert list(sd) == ['<style>'] and sd['<style>'].shape == (2, D)
    dp.load_textual_inversion(tmp_path/'out')
    assert_close(images(pipe, '<style>'), images(dp, '<style>'), **ATOL)
    with pytest.raises(ValueError, match='not an added token'): save_textual_inversion(pipe, '<nope>', tmp_path/'x')

def test_bad_input(saved, files, tmp_path):
    pipe, _ = load_both(saved)
    with pytest.raises(ValueError, match=r'width 48.*width 32'): load_textual_inversion(pipe, torch.zeros(48), token='<w>')
    with pytest.raises(ValueError, match="'a' is already in the tokenizer's vocabulary"):
        load_textual_inversion(pipe, torch.zeros(D), token='a')
    load_textual_inversion(pipe, files/'concept_bin')
    with pytest.raises(ValueError, match="'<cat-toy>' is already"): load_textual_inversion(pipe, files/'concept_bin')
    load_textual_inversion(pipe, files/'concept_st')
    load_textual_inversion(pipe, torch.zeros(D), token='<solo>_1')
    with pytest.raises(ValueError, match='multi-vector'): load_textual_inversion(pipe, torch.zeros(D), token='<solo>')
    save_file({'a': torch.zeros(D), 'b': torch.zeros(D)}, tmp_path/'two.safetensors')
    with pytest.raises(ValueError, match="no textual inversion embedding.*'a'"): load_textual_inversion(pipe, tmp_path/'two.safetensors')
    save_file({'clip_l': torch.zeros(2, 768), 'clip_g': torch.zeros(2, 1280)}, tmp_path/'sdxl.safetensors')
    with pytest.raises(ValueError, match='clip_g'): load_textual_inversion(pipe, tmp_path/'sdxl.safetensors', token='<x>')
    with pytest.raises(ValueError, match='bare tensor'): load_textual_inversion(pipe, torch.zeros(D))
    with pytest.raises(ValueError, match='kohya'): load_textual_inversion(pipe, files/'kohya.safetensors')
    with pytest.raises(ValueError, match=r'\(d,\) or \(n, d\)'): load_textual_inversion(pipe, {'<t>': torch.zeros(2, 2, D)})
    with pytest.raises(FileNotFoundError, match='not found'): load_textual_inversion(pipe, tmp_path/'missing.bin')
    with pytest.raises(FileNotFoundError, match='learned_embeds.safetensors'): load_textual_inversion(pipe, tmp_path)
    (tmp_path/'junk.bin').write_bytes(b'not a pickle')
    with pytest.raises(ValueError, match='cannot read'): load_textual_inversion(pipe, tmp_path/'junk.bin', token='<j>')
    with pytest.raises(ValueError, match='2 embeddings but 3 tokens'):
        load_textual_inversion(pipe, [torch.zeros(D), torch.zeros(D)], token=['<1>', '<2>', '<3>'])
    with pytest.raises(ValueError, match='duplicates'): load_textual_inversion(pipe, [torch.zeros(D)] * 2, token=['<1>', '<1>'])
    with pytest.raises(ValueError, match='3 rows'): load_textual_inversion(pipe, torch.zeros(2, D), token=['<1>', '<2>', '<3>'])
    n = len(pipe.tokenizer)
    with pytest.raises(ValueError, match='width'): load_textual_inversion(pipe, [torch.zeros(D), torch.zeros(9)], token=['<ok>', '<bad>'])
    assert len(pipe.tokenizer) == n and pipe.text_encoder.get_input_embeddings().weight.shape[0] == n   # nothing half-loaded

def test_token_and_embedding_formats():
    v = torch.ones(2, 4)
    assert token_and_embedding({'<t>': v[0]})[1].shape == (1, 4)
    assert token_and_embedding({'<t>': v}, token='<u>')[0] == '<u>'
    assert token_and_embedding({'string_to_param': {'*': v}, 'name': 'n', 'step': 1})[0] == 'n'
    assert token_and_embedding({'emb_params': v}, token='<k>')[1].shape == (2, 4)
    with pytest.raises(ValueError, match="without a 'name'"): token_and_embedding({'string_to_param': {'*': v}, 'step': 1})

def test_hub_id(saved, monkeypatch, tmp_path):
    "An `org/name` that is no local path is a hub repo: read from the hub cache offline; a clear error when not cached."
    import huggingface_hub.constants as hc
    pipe, _ = load_both(saved)
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(hc, 'HF_HUB_CACHE', str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match='not a local file or folder.*HF_HUB_OFFLINE'):
        load_textual_inversion(pipe, 'sd-concepts-library/cat-toy')
    snap = tmp_path/'models--sd-concepts-library--cat-toy'/'snapshots'/('0' * 40)   # the hub cache layout
    snap.mkdir(parents=True)
    (tmp_path/'models--sd-concepts-library--cat-toy'/'refs').mkdir()
    (tmp_path/'models--sd-concepts-library--cat-toy'/'refs'/'main').write_text('0' * 40)
    torch.save({'<cat-toy>': vecs(1, 30)[0]}, snap/'learned_embeds.bin')
    assert load_textual_inversion(pipe, 'sd-concepts-library/cat-toy') == ['<cat-toy>']
    assert_close(pipe.text_encoder.get_input_embeddings().weight[-1], vecs(1, 30)[0])

def test_saved_pipeline_keeps_the_tokens(saved, files, tmp_path):
    "A pipeline saved with loaded tokens: minisd and diffusers both read it back with the same ids and images."
    pipe, _ = load_both(saved)
    pipe.load_textual_inversion(files/'concept_st')
    want = images(pipe, '<multi>')
    pipe.save_pretrained(tmp_path/'p')
    back, dp = load_both(tmp_path/'p')
    assert back.tokenizer.added_tokens_encoder == pipe.tokenizer.added_tokens_encoder
    assert dp.tokenizer.convert_tokens_to_ids('<multi>_2') == pipe.tokenizer.convert_tokens_to_ids('<multi>_2')
    assert_close(images(back, '<multi>'), want, **ATOL)
    assert_close(images(dp, '<multi>'), want, **ATOL)
