"Tests of minisd.learner under torchrun: 2 CPU processes (gloo) at batch B/2 equal 1 at B, only process 0 writes, exact resume."
import os, sys
from pathlib import Path
import pytest, torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, WeightedRandomSampler
import minisd
import minisd.learner as L
from minisd.learner import Learner, Callback, CheckpointCB, DistributedCB, load_state, torchrun, _rank, _shard, _process_device
from minisd.data import get_dls
from minisd.core import seed_everything

N, B = 128, 16  # samples, whole batch (B/2 on each of 2 processes): 8 steps per epoch


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 8, generator=g)
    return x, (x[:, :4].sum(1) > x[:, 4:].sum(1)).long()


def net(width=16): return nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 2))


def learner(bs, seed, shuffle=False, step=L.default_step, width=16, progress=False):
    seed_everything(seed)
    x, y = data()
    return Learner(net(width), get_dls((x, y), (x[:32], y[:32]), bs=bs, shuffle=shuffle), F.cross_entropy, step=step,
                   lr=1e-2, device='cpu', progress=progress)


class NoisyStep:
    "Draws noise (as a diffusion step does): an exact resume needs each process's own random state back."
    def __call__(self, learn, batch):
        x, y = batch
        return F.cross_entropy(learn.model(x + 0.3 * torch.randn_like(x)), y)


class Interrupt(Callback):
    def __init__(self, at): self.at = at
    def after_step(self, learn):
        if learn.n_steps == self.at: raise KeyboardInterrupt


class FirstBatches(Callback):
    "The first column of every epoch's first training batch."
    def __init__(self): self.seen = []
    def before_batch(self, learn):
        if learn.training and learn.iter == 0: self.seen.append(learn.batch[0][:, 0].tolist())


def _worker(out):
    "What each torchrun process runs (`python -m torch.distributed.run --nproc_per_node 2 tests/test_ddp.py OUT`)."
    out, r = Path(out), _rank()
    res = {}
    # 1. batch B/2 per process, no shuffling; process 1 starts from other weights (DDP copies process 0's)
    res['ddp'] = learner(B // 2, seed=r, progress=True).fit(2).model.state_dict()
    # 2. shuffled, noisy, checkpointed: uninterrupted; interrupted at step 10 (last saved at 9, mid-epoch); resumed
    writes, save_state = [], L.save_state
    L.save_state = lambda path, state: (writes.append(str(path)), save_state(path, state))[1]
    fb = FirstBatches()
    full = learner(B // 2, seed=10 + r, shuffle=True, step=NoisyStep()).fit(3, cbs=[CheckpointCB(out/'full.safetensors', every=3), fb])
    try: learner(B // 2, seed=10 + r, shuffle=True, step=NoisyStep()).fit(3, cbs=[CheckpointCB(out/'ck.safetensors', every=3), Interrupt(10)])
    except KeyboardInterrupt: pass
    resumed = learner(B // 2, seed=99 + r, shuffle=True, step=NoisyStep()).fit(3, cbs=[CheckpointCB(out/'ck.safetensors', every=3)])
    res.update(writes=writes, first_batches=fb.seen, full=full.model.state_dict(), resumed=resumed.model.state_dict(),
               full_losses=full.recorder.losses, resumed_losses=resumed.recorder.losses,
               full_rows=full.recorder.rows, resumed_rows=resumed.recorder.rows)
    # 3. process 1 builds a narrower model
    try: learner(B // 2, seed=0, width=16 if r == 0 else 8).fit(1); res['error'] = None
    except ValueError as e: res['error'] = str(e)
    torch.save(res, out/f'rank{r}.pt')


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    "One torchrun launch of 2 processes doing all the checks (a launch costs seconds); each process's results."
    out = tmp_path_factory.mktemp('ddp')
    env = {**os.environ, 'OMP_NUM_THREADS': '1',
           'PYTHONPATH': os.pathsep.join([str(Path(minisd.__file__).parents[1]), os.environ.get('PYTHONPATH', '')])}
    stdout = torchrun(__file__, out, nproc=2, env=env, timeout=300)
    return [torch.load(out/f'rank{r}.pt', weights_only=False) for r in range(2)], out, stdout


def test_two_processes_at_half_batch_equal_one_process_at_the_whole_batch(runs):
    (r0, r1), *_ = runs
    one = learner(B, seed=0).fit(2).model.state_dict()
    for k in one:
        assert torch.equal(r0['ddp'][k], r1['ddp'][k]), k  # the copies stay identical
        torch.testing.assert_close(r0['ddp'][k], one[k], rtol=0, atol=1e-6)
    assert not torch.equal(one['0.weight'], learner(B, seed=1).fit(2).model.state_dict()['0.weight'])  # the check can fail


def test_only_process_0_reports_progress(runs):
    *_, stdout = runs
    lines = [l for l in stdout.splitlines() if l.startswith('epoch ')]
    assert [l.split()[1] for l in lines] == ['1/2', '2/2'] and 'valid_loss' in lines[0]  # one line per epoch, once


def test_each_process_gets_its_own_share_and_a_new_shuffle_every_epoch(runs):
    (r0, r1), *_ = runs
    a, b = r0['first_batches'], r1['first_batches']
    assert len(a) == 3 and len(a[0]) == B // 2 and a[0] != a[1] != a[2]  # `set_epoch`: each epoch its own order
    for e in range(3): assert not set(a[e]) & set(b[e])  # the two shares of a batch are disjoint


def test_only_process_0_writes_checkpoints(runs):
    (r0, r1), out, _ = runs
    assert r1['writes'] == [] and r0['writes'] and set(r0['writes']) == {str(out/'full.safetensors'), str(out/'ck.safetensors')}
    sd = load_state(out/'full.safetensors')
    assert sd['pos'] == {'epoch': 3, 'iter': 0, 'n_steps': 24, 'n_epochs': 3}
    assert len(sd['cbs']['CheckpointCB']['rng']) == 2 and 'seed' in sd['cbs']['DistributedCB']  # each process's random state
    assert not any('module' in k for k in sd['model'])  # the plain model's weights, not the DDP wrapper's


def test_resume_under_torchrun_reproduces_the_run(runs):
    (r0, r1), *_ = runs
    for r in (r0, r1):
        assert r['resumed_losses'] == r['full_losses'] and len(r['full_losses']) == 24
        for k in r['full']: assert torch.equal(r['resumed'][k], r['full'][k]), k
        for a, b in zip(r['resumed_rows'], r['full_rows']):
            assert {k: v for k, v in a.items() if k != 'time'} == {k: v for k, v in b.items() if k != 'time'}
    assert r0['full_losses'] != r1['full_losses']  # each process has its own noise: restoring process 0's everywhere would fail


def test_processes_that_disagree_on_the_model_fail_clearly(runs):
    (r0, r1), *_ = runs
    assert r0['error'] == r1['error'] and 'built different models' in r0['error']
    assert "process 0 has 4 parameter tensors (178 values), process 1 has 4 parameter tensors (90 values)" in r0['error']
    assert "0.weight (16, 8) on process 0, 0.weight (8, 8) on process 1" in r0['error']


def test_model_check_messages(monkeypatch):
    "What `_check_same_model` says for each kind of disagreement (the processes' lists faked; no launch needed)."
    fp = [('0.weight', (16, 8)), ('0.bias', (16,))]
    def check(*others):
        monkeypatch.setattr(L, '_gather', lambda mine: [mine, *others])
        L._check_same_model(nn.Sequential(nn.Linear(8, 16)))
    check(fp)  # the same: no error
    with pytest.raises(ValueError, match=r"process 1 has 2 parameter tensors \(144 values\); first difference: 0.weight \(16, 8\) on process 0, 0.weight \(8, 16\) on process 1"):
        check([('0.weight', (8, 16)), ('0.bias', (16,))])
    with pytest.raises(ValueError, match=r"process 2 has 3 parameter tensors .*process 2 has extra parameters from '1.weight'"):
        check(fp, fp + [('1.weight', (2, 2))])
    with pytest.raises(ValueError, match=r"process 0 has extra parameters from '0.bias'"):
        check(fp[:1])


def test_shard_keeps_batch_size_shuffle_and_drop_last():
    x = torch.arange(10.)
    dl = get_dls((x,), bs=2, shuffle=True, drop_last=True).train
    shards = [_shard(dl, seed=3, rank=r, world=2) for r in (0, 1)]
    for s in shards: assert s.batch_size == 2 and s.drop_last and s.sampler.shuffle and len(s) == 2  # 5 samples each: 2 full batches
    got = [v for s in shards for b in s for v in b[0].tolist()]
    assert len(got) == 8 == len(set(got))
    with pytest.raises(ValueError, match='WeightedRandomSampler'):
        _shard(DataLoader(x, batch_size=2, sampler=WeightedRandomSampler(torch.ones(10), 10)), seed=0, rank=0, world=2)


def test_learner_notices_a_torchrun_launch(monkeypatch):
    x, y = data()
    dls = get_dls((x, y), bs=8)
    assert not any(isinstance(cb, DistributedCB) for cb in Learner(net(), dls, progress=False).cbs)
    monkeypatch.setenv('WORLD_SIZE', '2'); monkeypatch.setenv('LOCAL_RANK', '1')
    assert any(isinstance(cb, DistributedCB) for cb in Learner(net(), dls, device='cpu', progress=False).cbs)
    mine = DistributedCB(find_unused_parameters=True)  # DDP options: pass your own, it replaces the default one
    assert [cb for cb in Learner(net(), dls, device='cpu', progress=False, cbs=[mine]).cbs if isinstance(cb, DistributedCB)] == [mine]
    assert _process_device('cuda') == torch.device('cuda', 1) and _process_device('cuda:0') == torch.device('cuda', 0)


def test_torchrun_starts_n_processes_in_a_clean_environment(tmp_path, monkeypatch):
    for k, v in dict(WORLD_SIZE='7', RANK='5', MASTER_PORT='1').items(): monkeypatch.setenv(k, v)  # as if inside a launch
    (tmp_path/'show.py').write_text("import os, sys; print(os.environ['RANK'], os.environ['WORLD_SIZE'], os.environ['MASTER_ADDR'], *sys.argv[1:])")
    lines = sorted(torchrun(tmp_path/'show.py', 'a b', 3, nproc=3, cwd=tmp_path).splitlines())
    assert lines == [f'{r} 3 127.0.0.1 a b 3' for r in range(3)]  # arguments passed as given, the launch's own rank/size


def test_torchrun_failure_carries_the_processes_output(tmp_path):
    (tmp_path/'bad.py').write_text("import os\nif os.environ['RANK'] == '1': raise ValueError('process one has no data')")
    with pytest.raises(RuntimeError, match=r'(?s)bad\.py with 2 processes failed.*process one has no data'):
        torchrun(tmp_path/'bad.py', nproc=2)
    with pytest.raises(ValueError, match='nproc'): torchrun(tmp_path/'bad.py', nproc=0)


if __name__ == '__main__': _worker(sys.argv[1])
