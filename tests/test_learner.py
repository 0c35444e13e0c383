"Tests of minisd.learner: training goes down, exact resume from checkpoints, atomic saves, clipping, one-cycle, custom steps, progress."
import json, math
import numpy as np, pytest, torch
import torch.nn.functional as F
from torch import nn
import minisd.learner as L
from minisd.learner import (Learner, Callback, CheckpointCB, ClipGradCB, OneCycleCB, ProgressCB, CancelFitException, accuracy,
                            flatten_state, unflatten_state, save_state, load_state)
from minisd.data import get_dls
from minisd.core import seed_everything


def toy_data(n=256, seed=0):
    "Two-class blobs in 1x4x4 images, learnable in a few steps."
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 1, 4, 4, generator=g) * 0.5 + (y.float() * 2 - 1)[:, None, None, None]
    return x, y


def model():
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 16), nn.Dropout(0.2), nn.ReLU(), nn.Linear(16, 2))


def make(seed=0, **kw):
    seed_everything(seed)
    x, y = toy_data()
    dls = get_dls((x[:192], y[:192]), (x[192:], y[192:]), bs=16)
    return Learner(model(), dls, F.cross_entropy, lr=1e-2, device='cpu', progress=False, metrics=[accuracy], **kw)


def test_trains_down_and_records():
    learn = make().fit(3)
    r = learn.recorder
    assert len(r.losses) == 3 * 12 and len(r.lrs) == 36 and len(r.rows) == 3
    assert np.mean(r.losses[-6:]) < 0.5 * np.mean(r.losses[:6])
    assert r.rows[-1]['valid_accuracy'] > 0.9 and set(r.rows[0]) >= {'epoch', 'train_loss', 'valid_loss', 'time'}
    # epoch train_loss is the batch-size-weighted mean of that epoch's step losses (equal batches here)
    assert math.isclose(r.rows[0]['train_loss'], np.mean(r.losses[:12]), rel_tol=1e-6)
    assert [s for s, _ in r.valid_at] == [12, 24, 36]


class Interrupt(Callback):
    def __init__(self, at): self.at = at
    def after_step(self, learn):
        if learn.n_steps == self.at: raise KeyboardInterrupt


class InterruptValid(Callback):
    "Killed during the validation pass of epoch `epoch` (after the training pass's last checkpoint)."
    def __init__(self, epoch): self.epoch = epoch
    def after_valid(self, learn):
        if learn.epoch == self.epoch: raise KeyboardInterrupt


class NoisyStep:
    "A custom step that draws its own noise (like a diffusion step): resume must restore the RNG too."
    def __call__(self, learn, batch):
        x, y = batch
        learn.preds = learn.model(x + 0.3 * torch.randn_like(x))
        return {'loss': F.cross_entropy(learn.preds, y), 'extra': learn.preds.abs().mean()}


@pytest.mark.parametrize('stop_at,every', [(17, 5), (24, 100), (3, 2)])
def test_resume_reproduces_uninterrupted_run(tmp_path, stop_at, every):
    "Interrupted after `stop_at` steps, resumed from the last checkpoint (every `every` steps / epoch end): same run."
    full = make(step=NoisyStep()).fit(3)
    ck = tmp_path/'ck.safetensors'
    with pytest.raises(KeyboardInterrupt): make(step=NoisyStep()).fit(3, cbs=[CheckpointCB(ck, every=every), Interrupt(stop_at)])
    saved = load_state(ck)['pos']
    assert saved['n_steps'] < stop_at
    resumed = make(seed=999, step=NoisyStep()).fit(3, cbs=[CheckpointCB(ck, every=every)])
    assert resumed.recorder.losses == full.recorder.losses  # bit-identical on CPU
    assert resumed.recorder.logs['extra'] == full.recorder.logs['extra']
    for a, b in zip(resumed.recorder.rows, full.recorder.rows):
        for k in a:
            if k != 'time': assert a[k] == pytest.approx(b[k], rel=1e-6), k
    for p, q in zip(resumed.model.parameters(), full.model.parameters()): torch.testing.assert_close(p, q, rtol=0, atol=0)
    # resuming a finished run is a no-op
    again = make(step=NoisyStep()).fit(3, cbs=[CheckpointCB(ck)])
    assert again.recorder.losses == full.recorder.losses and again.start == (3, 0)


def test_resume_after_an_epochs_last_batch(tmp_path):
    "Saved after the last training batch (position (0, 12)), killed in the validation pass: the resumed run skips"
    "every batch of that epoch and must still restore the random state before validating (the step draws noise)."
    full = make(step=NoisyStep()).fit(2)
    ck = tmp_path/'ck.safetensors'
    with pytest.raises(KeyboardInterrupt): make(step=NoisyStep()).fit(2, cbs=[CheckpointCB(ck, every=12), InterruptValid(0)])
    assert load_state(ck)['pos']['iter'] == 12
    resumed = make(seed=3, step=NoisyStep()).fit(2, cbs=[CheckpointCB(ck, every=12)])
    assert resumed.recorder.losses == full.recorder.losses
    assert [r['valid_loss'] for r in resumed.recorder.rows] == [r['valid_loss'] for r in full.recorder.rows]


def test_the_loop_starts_where_the_callback_says(tmp_path):
    "The loop knows only `learn.start`; a `before_fit` callback moving it skips epochs and batches."
    class Start(Callback):
        def before_fit(self, learn): learn.start = (1, 5)
    learn = make().fit(2, cbs=[Start()], valid=False, one_cycle=False)
    assert len(learn.recorder.losses) == 12 - 5 and learn.pos == (2, 0)
    ck = tmp_path/'c.safetensors'
    make().fit(1, cbs=[CheckpointCB(ck, every=5)])
    assert make().load_checkpoint(ck, weights_only=True) == (1, 0)


def test_checkpoint_contents(tmp_path):
    ck = tmp_path/'c.safetensors'
    learn = make().fit(1, cbs=[CheckpointCB(ck)])
    from safetensors.torch import load_file
    t = load_file(str(ck))
    assert {'model.1.weight', 'model.4.bias', 'cbs.CheckpointCB.rng.0.torch', 'cbs.CheckpointCB.rng_epoch.0.torch'} <= set(t)
    assert any(k.startswith('opt.state.') and k.endswith('exp_avg') for k in t)
    sd = load_state(ck)
    assert sd['pos'] == {'epoch': 1, 'iter': 0, 'n_steps': 12, 'n_epochs': 1}
    assert sd['cbs']['OneCycleCB']['last_epoch'] == 12 and isinstance(sd['opt']['param_groups'][0]['betas'], tuple)
    # weights_only loading into a fresh model
    fresh = make(seed=5)
    fresh.load_checkpoint(ck, weights_only=True)
    for p, q in zip(fresh.model.parameters(), learn.model.parameters()): assert torch.equal(p, q)


def test_atomic_checkpoint_keeps_old_file_on_failure(tmp_path, monkeypatch):
    ck = tmp_path/'c.safetensors'
    learn = make().fit(1, cbs=[CheckpointCB(ck)])
    before = ck.read_bytes()
    def boom(tensors, path, metadata=None):
        open(path, 'wb').write(b'partial')
        raise OSError('disk full')
    monkeypatch.setattr(L, 'save_file', boom)
    with pytest.raises(OSError, match='disk full'): learn.save_checkpoint(ck)
    assert ck.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ['c.safetensors']


def test_flatten_roundtrip_and_errors():
    st = {'a': torch.arange(4).view(2, 2), 'b': {1: (torch.ones(1), 2.5, None)}, 'c': [True, 'x', np.arange(3, dtype=np.uint32)],
          'shared': None}
    w = torch.zeros(4); st['shared'] = [w, w[:2]]  # tensors sharing memory get copied, not refused
    t, sk = flatten_state(st)
    back = unflatten_state(json.loads(json.dumps(sk)), t)
    assert torch.equal(back['a'], st['a']) and back['b'][1][1:] == (2.5, None) and isinstance(back['b'][1], tuple)
    assert back['c'][:2] == [True, 'x'] and back['c'][2].dtype == np.uint32
    with pytest.raises(TypeError, match="can't checkpoint"): flatten_state({'f': object()})


def test_clipping_bounds_gradient_norm():
    seen = []
    class Norm(Callback):
        order = 5
        def after_backward(self, learn):
            seen.append(torch.cat([p.grad.flatten() for p in learn.model.parameters()]).norm().item())
    clip = ClipGradCB(0.01)
    make().fit(1, cbs=[clip, Norm()], valid=False)
    assert max(clip.norms) > 0.01 and max(seen) <= 0.01 * (1 + 1e-4)
    seen.clear()
    make().fit(1, clip=0.01, cbs=[Norm()], valid=False)  # the fit shortcut
    assert max(seen) <= 0.01 * (1 + 1e-4)


def test_one_cycle_shape():
    learn = make().fit(2, lr=0.05)
    lrs = np.array(learn.recorder.lrs)
    i = lrs.argmax()
    assert lrs.max() == pytest.approx(0.05, rel=1e-3) and 0.15 < i / len(lrs) < 0.35  # peak after ~25% of steps
    assert lrs[0] == pytest.approx(0.05 / 25, rel=1e-3) and lrs[-1] < 0.05 / 1000
    assert (np.diff(lrs[:i + 1]) > 0).all() and (np.diff(lrs[i:]) < 0).all()
    flat = make().fit(1, lr=0.03, one_cycle=False)
    assert set(flat.recorder.lrs) == {0.03}


def test_custom_step_and_cancel():
    "A step that ignores labels (denoising); CancelFitException ends fit cleanly with after_fit called."
    def denoise(learn, batch):
        x0 = batch[0]; eps = torch.randn_like(x0)
        return F.mse_loss(learn.model(x0 + eps), eps)
    seed_everything(0)
    x, y = toy_data()
    net = nn.Conv2d(1, 1, 3, padding=1)
    learn = Learner(net, get_dls((x,), bs=32), step=denoise, lr=1e-2, device='cpu', progress=False).fit(4)
    assert np.mean(learn.recorder.losses[-4:]) < np.mean(learn.recorder.losses[:4])
    events = []
    class Stop(Callback):
        def after_batch(self, learn):
            if learn.n_steps == 3: raise CancelFitException
        def after_fit(self, learn): events.append('after_fit')
    learn = make().fit(2, cbs=[Stop()])
    assert len(learn.recorder.losses) == 3 and events == ['after_fit']


def test_progress_to_a_log_is_one_line_per_epoch(capsys):
    "Output that is not a terminal (a log file, CI; here pytest's capture) gets one plain line per epoch, no frames."
    seed_everything(0)
    x, y = toy_data()
    Learner(model(), get_dls((x, y), (x, y), bs=64), F.cross_entropy, device='cpu', metrics=[accuracy]).fit(2)
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert '\r' not in out and len(lines) == 2, out
    assert lines[0].startswith('epoch 1/2 ') and lines[1].startswith('epoch 2/2 ')
    assert all(k in lines[1] for k in ('train_loss', 'valid_loss', 'valid_accuracy', 'time'))


def test_progress_bars_when_asked(capsys):
    "`ProgressCB(bar=True)` uses fastprogress (console bars and the epoch table); `progress=False` prints nothing."
    seed_everything(0)
    x, y = toy_data()
    Learner(model(), get_dls((x, y), (x, y), bs=64), F.cross_entropy, device='cpu', metrics=[accuracy], progress=False,
            cbs=[ProgressCB(bar=True)]).fit(2)
    out = capsys.readouterr().out
    assert 'train_loss' in out and 'valid_accuracy' in out and 'epoch 1/2' not in out
    Learner(model(), get_dls((x, y), bs=64), F.cross_entropy, device='cpu', progress=False).fit(1)
    assert capsys.readouterr().out == ''


@pytest.mark.gpu
def test_mixed_precision_cuda():
    seed_everything(0)
    x, y = toy_data()
    for amp in ('bf16', 'fp16'):
        learn = Learner(model(), get_dls((x, y), (x, y), bs=32), F.cross_entropy, lr=1e-2, device='cuda', progress=False,
                        metrics=[accuracy]).fit(3, amp=amp)
        assert learn.recorder.rows[-1]['valid_accuracy'] > 0.9
