"Parity of minisd's CLIPTokenizer with transformers' CLIPTokenizer on the same vocab.json/merges.txt."
import json, random, unicodedata
import pytest, torch
from minisd.tokenizer import CLIPTokenizer, clean_text, pre_tokenize, BYTE_DECODER, WHITESPACE

transformers = pytest.importorskip('transformers')

TEXTS = [
    "a photo of an astronaut riding a horse on mars", "A Photo Of THE Digit 7", "", " ", "\t\n\r  \u3000",
    "it's they're we've I'm you'll he'd don't IT'S", "'s 's's '''s '", "café naïve Ångström e\u0301 Ω ß İstanbul ΟΔΟΣ",
    "日本語のテキスト 中文 한국어", "emoji 😀🎉👍🏽 👨‍👩‍👧 ❤️", "numbers 1234567890 3.14 1,000,000 ½ ٣ ⅷ",
    "punct!!! ??? ... --- (x) [y] {z} <a> @#$%^&*", "tabs\tand\nnewlines\r\nand  multiple   spaces",
    "a<|endoftext|>b <|startoftext|> <|ENDOFTEXT|> <|endoftext|><|endoftext|>", "hello! world!! ! !x",
    "mixed CASE wOrDs and UPPER", "x\x1cy\x1fz \x85 \xa0 \u2028 \u200b zero-width", "ﬁ ﬀ ligatures ＡＢＣ fullwidth",
    "handwritten seven, two, digit five" * 3, "a " * 100, "supercalifragilisticexpialidocious " * 10,
    "Ⅻ ① ⁵ 𝟘 𝔸𝕓𝕔", "مرحبا بالعالم", "Привет, мир! Ёж", "\u0000\u0001 control \u007f", "trailing space ",
]

def _corpus():
    rng = random.Random(0)
    words = ['a', 'photo', 'of', 'the', 'digit', 'seven', 'handwritten', "it's", 'café', '日本', '😀', 'hello!',
             'number', '2024', 'ΟΔΟΣ', 'naïve', 'emoji', '🎉🎉', 'mars', 'horse', 'astronaut', 'what?!']
    return [' '.join(rng.choice(words) for _ in range(rng.randint(1, 12))) for _ in range(400)] + TEXTS

@pytest.fixture(scope='module')
def trained():
    return CLIPTokenizer.train(_corpus(), vocab_size=800)

def _pair(tmp_path, tok, pad_token):
    tok = CLIPTokenizer(tok.encoder, tok.merges, pad_token=pad_token)
    tok.save_pretrained(tmp_path)
    return tok, transformers.CLIPTokenizer.from_pretrained(tmp_path)

@pytest.mark.parametrize('pad_token', ['<|endoftext|>', '!'])
def test_ids_match_transformers(tmp_path, trained, pad_token):
    ours, ref = _pair(tmp_path, trained, pad_token)
    assert ref.pad_token_id == ours.pad_token_id == (0 if pad_token == '!' else ours.eos_token_id)
    assert ref.model_max_length == ours.model_max_length == 77
    assert (ref.bos_token_id, ref.eos_token_id, len(ref)) == (ours.bos_token_id, ours.eos_token_id, len(ours))
    for t in TEXTS:
        assert ours.encode(t) == ref(t).input_ids, t
        assert ours.encode(t, add_special_tokens=False) == ref(t, add_special_tokens=False).input_ids, t
    want = ref(TEXTS, padding='max_length', truncation=True, max_length=77, return_tensors='pt').input_ids
    got = ours(TEXTS)
    assert got.dtype == torch.long and got.shape == (len(TEXTS), 77)
    assert torch.equal(got, want)
    assert (got[:, -1][[len(ours.encode(t)) >= 77 for t in TEXTS]] == ours.eos_token_id).all()  # eos kept when truncated
    assert torch.equal(ours(TEXTS, max_length=20), ref(TEXTS, padding='max_length', truncation=True, max_length=20, return_tensors='pt').input_ids)
    assert torch.equal(ours(TEXTS[:6], padding='longest'), ref(TEXTS[:6], padding='longest', truncation=True, max_length=77, return_tensors='pt').input_ids)

@pytest.mark.parametrize('pad_token', ['<|endoftext|>', '!'])
def test_decode_matches_transformers(tmp_path, trained, pad_token):
    ours, ref = _pair(tmp_path, trained, pad_token)
    for t in TEXTS:
        ids = ours(t)[0].tolist()
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), (t, skip)
    ids = ours.encode('😀 🎉 café', add_special_tokens=False)
    for k in range(len(ids)):   # cut mid-character: invalid UTF-8 -> U+FFFD in both
        assert ours.decode(ids[:k]) == ref.decode(ids[:k])

def test_fast_alias_and_vocab_merges_only(tmp_path, trained):
    # only vocab.json + merges.txt, pad token given explicitly
    trained.save_pretrained(tmp_path)
    (tmp_path/'special_tokens_map.json').unlink(); (tmp_path/'tokenizer_config.json').unlink()
    ours = CLIPTokenizer.from_files(tmp_path/'vocab.json', tmp_path/'merges.txt', pad_token='!')
    for cls in (transformers.CLIPTokenizer, transformers.CLIPTokenizerFast):
        ref = cls(vocab=str(tmp_path/'vocab.json'), merges=str(tmp_path/'merges.txt'), pad_token='!')
        for t in TEXTS: assert ours.encode(t) == ref(t).input_ids, t

def test_hand_made_vocab(tmp_path):
    "A tiny hand-written vocab: the hand-computed merges give the same ids in both."
    from minisd.tokenizer import BYTE_ENCODER
    base = list(BYTE_ENCODER.values())
    merges = [('l', 'l'), ('h', 'e'), ('he', 'll'), ('hell', 'o</w>'), ('a', 'b'), ('ab', 'c</w>'), ('a', 'a')]
    vocab = base + [c + '</w>' for c in base] + [a + b for a, b in merges] + ['<|startoftext|>', '<|endoftext|>']
    (tmp_path/'vocab.json').write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (tmp_path/'merges.txt').write_text('#version: 0.2\n' + '\n'.join(f'{a} {b}' for a, b in merges) + '\n')
    ours, ref = CLIPTokenizer.from_pretrained(tmp_path), transformers.CLIPTokenizer.from_pretrained(tmp_path)
    assert ours.tokenize('hello abc yellow') == ['hello</w>', 'abc</w>', 'y', 'e', 'll', 'o', 'w</w>']
    for t in TEXTS + ['aaaa aaa hellohello abcabc']: assert ours.encode(t) == ref(t).input_ids, t

def test_unicode_classes_all_code_points(trained, tmp_path):
    "Cleaning and word splitting agree with the Rust tokenizer on every code point Python's unicodedata knows."
    cps = [chr(c) for c in range(0x110000) if unicodedata.category(chr(c)) not in ('Cn', 'Cs')]
    s = ''.join(f'{c}a{c}1{c}!{c}{c} ' for c in cps)
    backend = _pair(tmp_path, trained, '<|endoftext|>')[1].backend_tokenizer
    cleaned = clean_text(s)
    assert cleaned == backend.normalizer.normalize_str(s)
    theirs = [bytes(BYTE_DECODER[ch] for ch in w).decode('utf-8') for w, _ in backend.pre_tokenizer.pre_tokenize_str(cleaned)]
    assert pre_tokenize(cleaned) == theirs

def test_whitespace_is_unicode_white_space():
    assert clean_text('a\x1cb') == 'a\x1cb'           # str.isspace() says True, Unicode White_Space says no
    assert set(WHITESPACE) >= {' ', '\t', '\n', '\x85', '\u3000'}

def test_roundtrip_and_errors(tmp_path, trained):
    p = trained.save_pretrained(tmp_path/'tok')
    tok = CLIPTokenizer.from_pretrained(tmp_path/'tok')
    assert tok.encoder == trained.encoder and tok.merges == trained.merges and tok.pad_token == trained.pad_token
    (tmp_path/'pipe').mkdir(); trained.save_pretrained(tmp_path/'pipe'/'tokenizer')
    assert CLIPTokenizer.from_pretrained(tmp_path/'pipe').encoder == trained.encoder   # pipeline folder
    with pytest.raises(FileNotFoundError, match='not found'): CLIPTokenizer.from_pretrained(tmp_path/'missing')
    (p/'merges.txt').unlink()
    with pytest.raises(FileNotFoundError, match='merges.txt'): CLIPTokenizer.from_pretrained(p)
    with pytest.raises(FileNotFoundError): CLIPTokenizer.from_files(p/'vocab.json', p/'merges.txt')
    with pytest.raises(ValueError, match='pad_token'): CLIPTokenizer(trained.encoder, trained.merges, pad_token='<pad>')
    with pytest.raises(ValueError, match='vocab_size'): CLIPTokenizer.train(['a b'], vocab_size=100)
    with pytest.raises(ValueError, match='tensor'): trained(['a', 'a b c'], padding=False)
    with pytest.raises(ValueError, match='truncation'): trained(['a ' * 100], truncation=False)
    assert trained(['a ' * 100], truncation=False, padding='longest').shape == (1, 102)

def test_tokenizer_json_only(tmp_path, trained):
    "A folder written by transformers 5 (tokenizer.json, no vocab.json/merges.txt) loads too."
    trained.save_pretrained(tmp_path/'a')
    transformers.CLIPTokenizer.from_pretrained(tmp_path/'a').save_pretrained(tmp_path/'b')
    assert not (tmp_path/'b'/'vocab.json').exists()
    tok = CLIPTokenizer.from_pretrained(tmp_path/'b')
    assert tok.encoder == trained.encoder and tok.merges == trained.merges and tok.model_max_length == 77
    assert tok.encode(TEXTS[0]) == trained.encode(TEXTS[0])

def test_train_learns_frequent_words():
    tok = CLIPTokenizer.train(['the digit seven'] * 5 + ['a handwritten seven'] * 3, vocab_size=2000)
    assert tok.tokenize('the digit seven') == ['the</w>', 'digit</w>', 'seven</w>']
    assert list(tok.encoder)[:3] == ['!', '"', '#'] and list(tok.encoder)[-2:] == ['<|startoftext|>', '<|endoftext|>']
    assert tok.vocab_size < 2000    # stopped when no pair repeats
    small = CLIPTokenizer.train(['the digit seven'] * 5, vocab_size=516)
    assert small.vocab_size == 516 and len(small.merges) == 2

# --------------------------------------------------------------------------------------------------------------
# added tokens

ADDED = ['sks', '<My-Style>', '<cat-toy>', '<cat-toy>_1', 'café', 'a', '<a>', '<ab>', 'dog', '😀x', 'sks']
ADDED_TEXTS = TEXTS + [
    "asks sks", "A <my-style> dog", "<MY-STYLE>!", "a <cat-toy> <cat-toy>_1 backpack", "<CAT-TOY>_1<cat-toy>",
    "a café sks 😀x! z", "<ab> <a> <abc> <<a>>", "hotdog dogs dog, sks-sks", "sks<|endoftext|>SKS", "Ⅻ sks ΟΔΟΣ <a>",
    "it's a <cat-toy>'s dog", "  SKS\t\n<My-Style>  ", "the digit seven" * 3 + " <cat-toy>" * 30]

def _added_pair(tmp_path, trained):
    ours, ref = _pair(tmp_path, trained, '<|endoftext|>')
    ours.add_tokens(ADDED); ref.add_tokens(ADDED)
    return ours, ref

def _check_same(ours, ref):
    assert len(ours) == len(ref)
    for t in ADDED_TEXTS:
        assert ours.tokenize(t) == ref.tokenize(t), t
        assert ours.encode(t) == ref(t).input_ids, t
        assert ours.decode(ours.encode(t)) == ref.decode(ref(t).input_ids, skip_special_tokens=True), t
    assert torch.equal(ours(ADDED_TEXTS), ref(ADDED_TEXTS, padding='max_length', truncation=True, max_length=77, return_tensors='pt').input_ids)

def test_added_tokens_match_transformers(tmp_path, trained):
    "Ids equal transformers' after add_tokens: inside words, any case, punctuation, longest match first, old symbols."
    ours, ref = _added_pair(tmp_path, trained)
    n = len(trained)
    assert 'a' in trained.encoder and 'dog' not in trained.encoder
    assert len(ours) == n + 9   # 'a' exists (a byte symbol), 'sks' is listed twice
    assert ours.encode('asks sks', add_special_tokens=False) == [ours.encoder['a'], n, n]   # the added 'a', no </w>
    assert ours.encode('<MY-STYLE>!', add_special_tokens=False) == [n + 1, ours.encoder['!</w>']]
    assert ours.convert_tokens_to_ids(['<cat-toy>', '<cat-toy>_1', 'a']) == ref.convert_tokens_to_ids(['<cat-toy>', '<cat-toy>_1', 'a'])
    assert ours.get_vocab() == ref.get_vocab()
    _check_same(ours, ref)
    assert ours.add_tokens(['sks', 'new']) == 1 and ours.convert_tokens_to_ids('new') == n + 9

def test_added_tokens_saved_minisd_to_transformers(tmp_path, trained):
    ours, _ = _added_pair(tmp_path/'a', trained)
    ours.save_pretrained(tmp_path/'b')
    saved = json.loads((tmp_path/'b'/'added_tokens.json').read_text())
    assert saved['<My-Style>'] == len(trained) + 1 and 'a' in saved
    _check_same(ours, transformers.CLIPTokenizer.from_pretrained(tmp_path/'b'))
    back = CLIPTokenizer.from_pretrained(tmp_path/'b')
    assert back.added_tokens_encoder == ours.added_tokens_encoder and len(back) == len(ours)

@pytest.mark.parametrize('layout', ['transformers5', 'added_tokens.json', 'added_tokens_decoder'])
def test_added_tokens_saved_transformers_to_minisd(tmp_path, trained, layout):
    "What transformers 5 writes (tokenizer.json), and each of transformers 4's two files on its own."
    _, ref = _added_pair(tmp_path/'a', trained)
    d = tmp_path/'b'
    if layout == 'transformers5':
        ref.save_pretrained(d)
        assert not (d/'vocab.json').exists()
    else:
        trained.save_pretrained(d)
        added = {t: i for t, i in ref.get_vocab().items() if t not in trained.encoder or trained.encoder[t] != i}
        added.update({t: ref.convert_tokens_to_ids(t) for t in ('a',)})
        cfg = json.loads((d/'tokenizer_config.json').read_text())
        if layout == 'added_tokens.json':   # an older config (SD 1.5's) has no added_tokens_decoder
            (d/'added_tokens.json').write_text(json.dumps(added))
            del cfg['added_tokens_decoder']
        else:
            cfg['added_tokens_decoder'].update({str(i): dict(content=t, lstrip=False, normalized=True, rstrip=False,
                                                             single_word=False, special=False) for t, i in added.items()})
        (d/'tokenizer_config.json').write_text(json.dumps(cfg))
    ours = CLIPTokenizer.from_pretrained(d)
    _check_same(ours, ref)
    _check_same(ours, transformers.CLIPTokenizer.from_pretrained(d))

def test_added_tokens_bad_input(tmp_path, trained):
    tok = CLIPTokenizer(trained.encoder, trained.merges)
    with pytest.raises(TypeError, match='strings'): tok.add_tokens(['ok', 3])
    assert tok.add_tokens(['', '']) == 0 and len(tok) == len(trained)
    trained.save_pretrained(tmp_path)
    (tmp_path/'added_tokens.json').write_text(json.dumps({'sks': len(trained)}))
    cfg = json.loads((tmp_path/'tokenizer_config.json').read_text())
    cfg['added_tokens_decoder'][str(len(trained) + 1)] = dict(content='sks', special=False)
    (tmp_path/'tokenizer_config.json').write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="'sks' has two ids"): CLIPTokenizer.from_pretrained(tmp_path)

def test_remove_added_tokens_closes_gaps(tmp_path, trained):
    tok = CLIPTokenizer(trained.encoder, trained.merges)
    n = len(tok)
    tok.add_tokens(['<p>', 'a', '<q>', '<r>'])
    assert tok.remove_added_tokens(['<q>', 'a']) == [n + 1]   # 'a' is a vocabulary symbol: no row freed
    assert tok.added_tokens_encoder == {'<p>': n, '<r>': n + 1} and len(tok) == n + 2
    tok.save_pretrained(tmp_path)
    ref = transformers.CLIPTokenizer.from_pretrained(tmp_path)
    assert len(ref) == n + 2
    for t in ['<p> a <q> <r>', 'asks <R><P>']: assert tok.encode(t) == ref(t).input_ids, t
    with pytest.raises(KeyError, match='<q>'): tok.remove_added_tokens(['<q>'])
