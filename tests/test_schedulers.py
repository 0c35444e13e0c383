"Step-by-step parity of minisd.schedulers with diffusers' schedulers of the same name, over many configurations."
import inspect, itertools, json, math
import numpy as np
import pytest
import torch
from torch.testing import assert_close

diffusers = pytest.importorskip('diffusers')
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside diffusers, numpy 2
from minisd import schedulers as ms

SHAPE = (2, 3, 4, 4)
SCHEDULES = [dict(beta_schedule='linear'),
             dict(beta_schedule='scaled_linear', beta_start=0.00085, beta_end=0.012),
             dict(beta_schedule='squaredcos_cap_v2')]
PREDICTIONS = ['epsilon', 'v_prediction', 'sample']
SPACINGS = [dict(timestep_spacing='leading'), dict(timestep_spacing='leading', steps_offset=1),
            dict(timestep_spacing='linspace'), dict(timestep_spacing='trailing')]
_id = lambda d: '-'.join(f'{k}={v}' for k, v in d.items() if k not in ('beta_start', 'beta_end'))

def pair(name, **kw):
    "The minisd and the diffusers scheduler of class `name`, built from the same kwargs."
    return getattr(ms, name)(**kw), getattr(diffusers, name)(**kw)

def close(a, b, rtol=2e-5, atol=2e-5):
    assert_close(a, b, rtol=rtol, atol=atol)

def rand(seed, shape=SHAPE, dtype=torch.float32, scale=1.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * scale

def step_subset(n, k=6):
    "All step indices for small n, else the first and last k//2 plus a few in between."
    if n <= 2 * k: return list(range(n))
    return sorted(set(range(k // 2)) | set(range(n - k // 2, n)) | set(np.linspace(0, n - 1, k).round().astype(int).tolist()))

def check_schedule(ours, theirs):
    close(ours.betas, theirs.betas, rtol=0, atol=0)
    close(ours.alphas_cumprod, theirs.alphas_cumprod, rtol=0, atol=0)
    assert ours.timesteps.dtype == theirs.timesteps.dtype
    assert torch.equal(ours.timesteps, theirs.timesteps)
    assert float(ours.init_noise_sigma) == pytest.approx(float(theirs.init_noise_sigma), rel=1e-6)

# ---------------------------------------------------------------- DDPM: every step, independently
@pytest.mark.parametrize('clip_sample', [True, False])
@pytest.mark.parametrize('variance_type', ms.VARIANCE_TYPES)
@pytest.mark.parametrize('spacing', SPACINGS, ids=_id)
@pytest.mark.parametrize('prediction_type', PREDICTIONS)
@pytest.mark.parametrize('schedule', SCHEDULES, ids=_id)
def test_ddpm_steps(schedule, prediction_type, spacing, variance_type, clip_sample):
    kw = dict(**schedule, **spacing, prediction_type=prediction_type, variance_type=variance_type, clip_sample=clip_sample)
    # diffusers' fixed_large_log takes sqrt(log(beta)) = NaN (a bug); the intended std is sqrt(beta) = fixed_large
    ref_kw = {**kw, 'variance_type': 'fixed_large'} if variance_type == 'fixed_large_log' else kw
    ours, theirs = ms.DDPMScheduler(**kw), diffusers.DDPMScheduler(**ref_kw)
    learned = variance_type.startswith('learned')
    for n in (None, 10, 1000):  # None: before set_timesteps (all T steps, prev_t = t - 1)
        if n is not None and n * (1000 // n) + spacing.get('steps_offset', 0) > 1000: continue  # timesteps past T: invalid
        if n is not None: ours.set_timesteps(n); theirs.set_timesteps(n)
        check_schedule(ours, theirs)
        for i in step_subset(len(theirs.timesteps)):
            t = theirs.timesteps[i]
            x, mo = rand(i), rand(1000 + i)
            if learned:  # second half: the predicted variance (positive for 'learned', in [-1, 1] for 'learned_range')
                v = rand(2000 + i).abs() * 0.01 if variance_type == 'learned' else torch.rand(SHAPE, generator=torch.Generator().manual_seed(i)) * 2 - 1
                mo = torch.cat([mo, v], 1)
            a = ours.step(mo, t, x, generator=torch.Generator().manual_seed(i))
            b = theirs.step(mo, t, x, generator=torch.Generator().manual_seed(i))
            close(a.pred_original_sample, b.pred_original_sample)
            close(a.prev_sample, b.prev_sample)

def test_ddpm_custom_timesteps_and_variance_noise():
    ours, theirs = pair('DDPMScheduler', beta_schedule='squaredcos_cap_v2')
    ts = [999, 800, 500, 333, 100, 20, 1, 0]
    ours.set_timesteps(timesteps=ts); theirs.set_timesteps(timesteps=ts)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    for i, t in enumerate(ts):
        x, mo = rand(i), rand(100 + i)
        b = theirs.step(mo, t, x, generator=torch.Generator().manual_seed(i))
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(i))
        a = ours.step(mo, t, x, variance_noise=noise)  # the same noise, given explicitly
        close(a.prev_sample, b.prev_sample); close(a.pred_original_sample, b.pred_original_sample)
    with pytest.raises(ValueError, match='descending'): ours.set_timesteps(timesteps=[10, 20])
    with pytest.raises(ValueError, match='exactly one'): ours.set_timesteps(10, timesteps=[10, 0])
    with pytest.raises(ValueError, match='cannot exceed'): ours.set_timesteps(1001)

def test_ddpm_learned_variance_needs_channels():
    s = ms.DDPMScheduler(variance_type='learned_range'); s.set_timesteps(10)
    with pytest.raises(ValueError, match='twice'): s.step(rand(0), s.timesteps[0], rand(1))

# ---------------------------------------------------------------- DDIM: every step, independently
@pytest.mark.parametrize('eta', [0.0, 0.5, 1.0])
@pytest.mark.parametrize('clip_sample', [True, False])
@pytest.mark.parametrize('set_alpha_to_one', [True, False])
@pytest.mark.parametrize('spacing', SPACINGS, ids=_id)
@pytest.mark.parametrize('prediction_type', PREDICTIONS)
@pytest.mark.parametrize('schedule', SCHEDULES, ids=_id)
def test_ddim_steps(schedule, prediction_type, spacing, set_alpha_to_one, clip_sample, eta):
    kw = dict(**schedule, **spacing, prediction_type=prediction_type, set_alpha_to_one=set_alpha_to_one, clip_sample=clip_sample)
    ours, theirs = pair('DDIMScheduler', **kw)
    for n in (7, 50, 1000):
        if n * (1000 // n) + spacing.get('steps_offset', 0) > 1000: continue  # timesteps past T: invalid
        ours.set_timesteps(n); theirs.set_timesteps(n)
        check_schedule(ours, theirs)
        for i in step_subset(n):
            t = theirs.timesteps[i]
            x, mo = rand(i), rand(1000 + i)
            if i % 2:  # alternate: a seeded generator, or the noise given explicitly
                a = ours.step(mo, t, x, eta=eta, generator=torch.Generator().manual_seed(i))
                b = theirs.step(mo, t, x, eta=eta, generator=torch.Generator().manual_seed(i))
            else:
                noise = rand(3000 + i)
                a, b = ours.step(mo, t, x, eta=eta, variance_noise=noise), theirs.step(mo, t, x, eta=eta, variance_noise=noise)
            close(a.pred_original_sample, b.pred_original_sample)
            close(a.prev_sample, b.prev_sample)

@pytest.mark.parametrize('name', ['DDPMScheduler', 'DDIMScheduler'])
@pytest.mark.parametrize('opts', [dict(thresholding=True, sample_max_value=3.0), dict(clip_sample_range=0.5),
                                  dict(rescale_betas_zero_snr=True, prediction_type='v_prediction', timestep_spacing='trailing'),
                                  dict(trained_betas=np.linspace(0.001, 0.03, 1000).tolist(), clip_sample=False),
                                  dict(num_train_timesteps=100, beta_end=0.2, timestep_spacing='linspace')], ids=str)
def test_options(name, opts):
    ours, theirs = pair(name, **opts)
    check_schedule(ours, theirs)
    ours.set_timesteps(20); theirs.set_timesteps(20)
    extra = dict(eta=0.7, use_clipped_model_output=True) if name == 'DDIMScheduler' else {}
    for i, t in enumerate(theirs.timesteps):
        x, mo = rand(i, scale=2.0), rand(100 + i)
        a = ours.step(mo, t, x, generator=torch.Generator().manual_seed(i), **extra)
        b = theirs.step(mo, t, x, generator=torch.Generator().manual_seed(i), **extra)
        close(a.pred_original_sample, b.pred_original_sample); close(a.prev_sample, b.prev_sample)

@pytest.mark.parametrize('name', ['DDPMScheduler', 'DDIMScheduler'])
def test_full_loop_float64(name):
    "A whole sampling loop with a fixed 'model' (a function of x and t), in float64, stays on diffusers' trajectory."
    ours, theirs = pair(name, beta_schedule='scaled_linear', beta_start=0.00085, beta_end=0.012, clip_sample=False)
    ours.set_timesteps(50); theirs.set_timesteps(50)
    model = lambda x, t: torch.tanh(x) * (t / 1000) + 0.1 * x.flip(-1)
    xa = xb = rand(0, dtype=torch.float64)
    ga, gb = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    extra = dict(eta=1.0) if name == 'DDIMScheduler' else {}
    for t in theirs.timesteps:
        xa = ours.step(model(xa, t), t, xa, generator=ga, **extra).prev_sample
        xb = theirs.step(model(xb, t), t, xb, generator=gb, **extra).prev_sample
    assert xa.dtype == torch.float64
    close(xa, xb, rtol=1e-6, atol=1e-6)

# ---------------------------------------------------------------- forward process
@pytest.mark.parametrize('name', ['DDPMScheduler', 'DDIMScheduler'])
@pytest.mark.parametrize('schedule', SCHEDULES + [dict(beta_schedule='linear', rescale_betas_zero_snr=True)], ids=_id)
def test_add_noise_and_velocity(name, schedule):
    ours, theirs = pair(name, **schedule)
    x0, eps = rand(0, (6, 3, 4, 4)), rand(1, (6, 3, 4, 4))
    t = torch.tensor([0, 1, 10, 500, 998, 999])
    close(ours.add_noise(x0, eps, t), theirs.add_noise(x0, eps, t), rtol=0, atol=0)
    close(ours.get_velocity(x0, eps, t), theirs.get_velocity(x0, eps, t), rtol=0, atol=0)
    close(ours.add_noise(x0.double(), eps.double(), t), theirs.add_noise(x0.double(), eps.double(), t))

# ---------------------------------------------------------------- Euler: a whole (stateful) run
@pytest.mark.parametrize('sigmas', ['plain', 'karras', 'exponential'])
@pytest.mark.parametrize('spacing', SPACINGS, ids=_id)
@pytest.mark.parametrize('prediction_type', PREDICTIONS)
@pytest.mark.parametrize('schedule', SCHEDULES, ids=_id)
def test_euler_run(schedule, prediction_type, spacing, sigmas):
    for n, final_sigmas_type in ((8, 'zero'), (16, 'sigma_min')):
        kw = dict(**schedule, **spacing, prediction_type=prediction_type, final_sigmas_type=final_sigmas_type,
                  use_karras_sigmas=sigmas == 'karras', use_exponential_sigmas=sigmas == 'exponential')
        ours, theirs = pair('EulerDiscreteScheduler', **kw)
        check_schedule(ours, theirs)
        ours.set_timesteps(n); theirs.set_timesteps(n)
        check_schedule(ours, theirs)
        close(ours.sigmas, theirs.sigmas, rtol=1e-6, atol=0)
        xa = xb = rand(0) * theirs.init_noise_sigma
        for i, t in enumerate(theirs.timesteps):
            ia, ib = ours.scale_model_input(xa, t), theirs.scale_model_input(xb, t)
            close(ia, ib)
            mo = rand(100 + i)
            a, b = ours.step(mo, t, xa), theirs.step(mo, t, xb)
            close(a.pred_original_sample, b.pred_original_sample); close(a.prev_sample, b.prev_sample)
            xa, xb = a.prev_sample, b.prev_sample
        assert ours.step_index == theirs.step_index == n

@pytest.mark.parametrize('opts', [dict(sigma_min=0.1, sigma_max=10.0, use_karras_sigmas=True),
                                  dict(rescale_betas_zero_snr=True, prediction_type='v_prediction', timestep_spacing='trailing'),
                                  dict(trained_betas=np.linspace(0.001, 0.03, 1000).tolist())], ids=str)
def test_euler_options_and_churn(opts):
    ours, theirs = pair('EulerDiscreteScheduler', **opts)
    ours.set_timesteps(15); theirs.set_timesteps(15)
    check_schedule(ours, theirs)
    xa = xb = rand(0) * theirs.init_noise_sigma
    ga, gb = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    churn = dict(s_churn=5.0, s_tmin=0.5, s_tmax=50.0)
    for i, t in enumerate(theirs.timesteps):
        ours.scale_model_input(xa, t); theirs.scale_model_input(xb, t)
        mo = rand(100 + i)
        xa, xb = ours.step(mo, t, xa, generator=ga, **churn).prev_sample, theirs.step(mo, t, xb, generator=gb, **churn).prev_sample
        close(xa, xb)

def test_euler_add_noise_img2img():
    ours, theirs = pair('EulerDiscreteScheduler', beta_schedule='scaled_linear', beta_start=0.00085, beta_end=0.012, use_karras_sigmas=True)
    ours.set_timesteps(30); theirs.set_timesteps(30)
    x0, eps = rand(0), rand(1)
    t = theirs.timesteps[[5, 12]]
    close(ours.add_noise(x0, eps, t), theirs.add_noise(x0, eps, t))
    ours.set_begin_index(12); theirs.set_begin_index(12)  # img2img: start at the 12th noise level
    t = theirs.timesteps[12:13]
    close(ours.add_noise(x0, eps, t), theirs.add_noise(x0, eps, t))
    xa = xb = ours.add_noise(x0, eps, t)
    for tt in theirs.timesteps[12:]:
        mo = rand(int(tt))
        close(ours.scale_model_input(xa, tt), theirs.scale_model_input(xb, tt))
        xa, xb = ours.step(mo, tt, xa).prev_sample, theirs.step(mo, tt, xb).prev_sample
        close(xa, xb)
    assert ours.step_index == theirs.step_index == 30
    with pytest.raises(ValueError, match='integer'): ours.step(rand(0), 3, rand(1))

# ---------------------------------------------------------------- DPM-Solver++: a whole (stateful) run
SOLVERS = [dict(solver_order=1), dict(solver_order=2), dict(solver_order=2, solver_type='heun'), dict(solver_order=3)]
# Karras/exponential sigmas ignore the spacing; with the cosine schedule they make diffusers itself fail
# (sigma_max ~2e4 repeats timestep 998 and its step counter overruns), so those are left out
SIGMA_SPACINGS = ([('plain', sp) for sp in SPACINGS[1:]] + [('karras', SPACINGS[2]), ('exponential', SPACINGS[2])])
DPM_GRID = [(sch, sg, sp) for sch in SCHEDULES for sg, sp in SIGMA_SPACINGS if not (sch['beta_schedule'] == 'squaredcos_cap_v2' and sg != 'plain')]
@pytest.mark.parametrize('algorithm_type', ['dpmsolver++', 'sde-dpmsolver++'])
@pytest.mark.parametrize('solver', SOLVERS, ids=_id)
@pytest.mark.parametrize('prediction_type', PREDICTIONS)
@pytest.mark.parametrize('schedule,sigmas,spacing', DPM_GRID, ids=lambda v: _id(v) if isinstance(v, dict) else v)
def test_dpm_run(schedule, sigmas, spacing, prediction_type, solver, algorithm_type):
    kw = dict(**schedule, **spacing, **solver, prediction_type=prediction_type, algorithm_type=algorithm_type,
              use_karras_sigmas=sigmas == 'karras', use_exponential_sigmas=sigmas == 'exponential')
    ours, theirs = pair('DPMSolverMultistepScheduler', **kw)
    for n in (8, 16):  # below and above 15 steps, where lower_order_final switches off
        ours.set_timesteps(n); theirs.set_timesteps(n)
        check_schedule(ours, theirs)
        close(ours.sigmas, theirs.sigmas, rtol=1e-6, atol=0)
        xa = xb = rand(0)
        ga, gb = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
        for i, t in enumerate(theirs.timesteps):
            mo = rand(100 + i) * 0.5 + 0.1 * xa
            a, b = ours.step(mo, t, xa, generator=ga), theirs.step(mo, t, xb, generator=gb)
            close(a.prev_sample, b.prev_sample, rtol=5e-5, atol=5e-5)
            xa, xb = a.prev_sample, b.prev_sample

@pytest.mark.parametrize('opts', [dict(lower_order_final=False), dict(euler_at_final=True, final_sigmas_type='sigma_min'),
                                  dict(final_sigmas_type='sigma_min', lower_order_final=False, solver_order=3),
                                  dict(thresholding=True, sample_max_value=2.0, prediction_type='sample'),
                                  dict(rescale_betas_zero_snr=True, prediction_type='v_prediction', timestep_spacing='trailing'),
                                  dict(beta_schedule='squaredcos_cap_v2', lambda_min_clipped=-5.1),
                                  dict(variance_type='learned_range'),
                                  dict(algorithm_type='sde-dpmsolver++', solver_type='heun', use_karras_sigmas=True)], ids=str)
def test_dpm_options(opts):
    ours, theirs = pair('DPMSolverMultistepScheduler', **opts)
    for n in (6, 12):
        ours.set_timesteps(n); theirs.set_timesteps(n)
        check_schedule(ours, theirs)
        xa = xb = rand(0)
        for i, t in enumerate(theirs.timesteps):
            mo = rand(100 + i, (2, 6, 4, 4)) if opts.get('variance_type') else rand(100 + i)
            noise = rand(200 + i)
            a, b = ours.step(mo, t, xa, variance_noise=noise), theirs.step(mo, t, xb, variance_noise=noise)
            close(a.prev_sample, b.prev_sample, rtol=5e-5, atol=5e-5)
            xa, xb = a.prev_sample, b.prev_sample

@pytest.mark.parametrize('name', ['EulerDiscreteScheduler', 'DPMSolverMultistepScheduler'])
def test_sigma_add_noise(name):
    ours, theirs = pair(name, beta_schedule='scaled_linear', beta_start=0.00085, beta_end=0.012)
    ours.set_timesteps(25); theirs.set_timesteps(25)
    x0, eps = rand(0), rand(1)
    t = theirs.timesteps[[0, 20]]
    close(ours.add_noise(x0, eps, t), theirs.add_noise(x0, eps, t))

# ---------------------------------------------------------------- configs
ALL = ['DDPMScheduler', 'DDIMScheduler', 'EulerDiscreteScheduler', 'DPMSolverMultistepScheduler']

@pytest.mark.parametrize('name', ALL)
def test_same_constructor_arguments(name):
    "Same keyword arguments and defaults as diffusers, so any diffusers config maps one to one."
    ps = lambda c: {k: p.default for k, p in inspect.signature(c.__init__).parameters.items() if k != 'self'}
    ours, theirs = ps(getattr(ms, name)), ps(getattr(diffusers, name))
    assert ours.keys() == theirs.keys()
    for k in ours:
        if isinstance(theirs[k], float) and math.isinf(theirs[k]): assert ours[k] == theirs[k]
        else: assert ours[k] == theirs[k], k

@pytest.mark.parametrize('name', ALL)
def test_config_round_trips(name, tmp_path):
    kw = dict(beta_schedule='scaled_linear', beta_start=0.00085, beta_end=0.012, prediction_type='v_prediction', steps_offset=1)
    ours, theirs = pair(name, **kw)
    ref = {k: v for k, v in theirs.config.items() if not k.startswith('_')}
    assert dict(ours.config) == ref
    assert ours.config.beta_schedule == 'scaled_linear'
    # from a diffusers config object, and from a diffusers scheduler
    assert dict(getattr(ms, name).from_config(theirs.config).config) == ref
    assert dict(getattr(ms, name).from_config(theirs, steps_offset=0).config) == {**ref, 'steps_offset': 0}
    # minisd saves -> diffusers loads the same config (and warns about nothing)
    ours.save_pretrained(tmp_path / 'ours')
    saved = json.loads((tmp_path / 'ours' / 'scheduler_config.json').read_text())
    assert saved['_class_name'] == name
    loaded = getattr(diffusers, name).from_pretrained(tmp_path / 'ours')
    assert {k: v for k, v in loaded.config.items() if not k.startswith('_')} == ref
    # diffusers saves -> minisd loads
    theirs.save_config(tmp_path / 'theirs')
    assert dict(getattr(ms, name).from_pretrained(tmp_path / 'theirs').config) == ref
    assert dict(getattr(ms, name).from_pretrained(tmp_path, subfolder='theirs').config) == ref

def test_trained_betas_round_trip(tmp_path):
    betas = np.linspace(0.0001, 0.02, 1000)
    ours = ms.DDIMScheduler(trained_betas=betas)
    assert isinstance(ours.config.trained_betas, list)
    ours.save_config(tmp_path)
    theirs = diffusers.DDIMScheduler.from_pretrained(tmp_path)
    close(theirs.betas, ours.betas, rtol=0, atol=0)

def test_foreign_config_keys_ignored():
    sd15 = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
            "steps_offset": 1, "trained_betas": None, "clip_sample": False}
    for name in ALL:
        ours, theirs = getattr(ms, name).from_config(sd15), getattr(diffusers, name).from_config(sd15)
        assert dict(ours.config) == {k: theirs.config[k] for k in inspect.signature(getattr(diffusers, name).__init__).parameters if k != 'self'}
        assert 'skip_prk_steps' not in ours.config

def test_config_is_frozen():
    s = ms.DDIMScheduler()
    with pytest.raises(TypeError, match='frozen'): s.config['beta_schedule'] = 'linear'
    with pytest.raises(AttributeError): s.config.no_such_key

@pytest.mark.parametrize('name,kw,err,match', [
    ('DDPMScheduler', dict(beta_schedule='quadratic'), ValueError, 'beta_schedule'),
    ('DDIMScheduler', dict(beta_schedule='sigmoid'), ValueError, 'beta_schedule'),
    ('DDIMScheduler', dict(prediction_type='noise'), ValueError, 'prediction_type'),
    ('EulerDiscreteScheduler', dict(prediction_type='flow_prediction'), ValueError, 'prediction_type'),
    ('DDPMScheduler', dict(variance_type='huge'), ValueError, 'variance_type'),
    ('DDIMScheduler', dict(timestep_spacing='uniform'), ValueError, 'timestep_spacing'),
    ('DPMSolverMultistepScheduler', dict(algorithm_type='dpmsolver'), ValueError, 'algorithm_type'),
    ('DPMSolverMultistepScheduler', dict(solver_order=4), ValueError, 'solver_order'),
    ('DPMSolverMultistepScheduler', dict(use_lu_lambdas=True), NotImplementedError, 'use_lu_lambdas'),
    ('EulerDiscreteScheduler', dict(use_beta_sigmas=True), NotImplementedError, 'use_beta_sigmas'),
    ('EulerDiscreteScheduler', dict(use_karras_sigmas=True, use_exponential_sigmas=True), ValueError, 'only one'),
    ('EulerDiscreteScheduler', dict(final_sigmas_type='one'), ValueError, 'final_sigmas_type'),
])
def test_bad_values(name, kw, err, match):
    with pytest.raises(err, match=match): getattr(ms, name)(**kw)
    with pytest.raises(err, match=match): getattr(ms, name).from_config(kw)

def test_ddim_needs_set_timesteps():
    with pytest.raises(ValueError, match='set_timesteps'): ms.DDIMScheduler().step(rand(0), 999, rand(1))
    with pytest.raises(ValueError, match='set_timesteps'): ms.DPMSolverMultistepScheduler().step(rand(0), 999, rand(1))

def test_return_tuple_and_device_arg():
    s = ms.DDIMScheduler(); s.set_timesteps(10, device='cpu')
    prev, x0 = s.step(rand(0), s.timesteps[0], rand(1), return_dict=False)
    assert prev.shape == x0.shape == SHAPE
    assert len(s) == 1000 and s.order == 1

# ---------------------------------------------------------------- one step signature, presets
COMMON_STEP_KEYWORDS = ['model_output', 'timestep', 'sample', 'generator', 'eta', 'use_clipped_model_output', 'return_dict',
                        'variance_noise']

@pytest.mark.parametrize('name', ALL)
def test_step_takes_the_common_keywords(name):
    "Every step has the shared parameters (same kind, same default), and keywords that do not apply change nothing."
    shared, ps = inspect.signature(ms.NoiseScheduler.step).parameters, inspect.signature(getattr(ms, name).step).parameters
    assert list(shared) == ['self'] + COMMON_STEP_KEYWORDS
    assert [k for k in ps if k in shared] == list(shared)  # same order: positional calls mean the same everywhere
    for k in COMMON_STEP_KEYWORDS: assert (ps[k].kind, ps[k].default) == (shared[k].kind, shared[k].default), k
    a, b = getattr(ms, name).sd15(), getattr(ms, name).sd15()
    a.set_timesteps(6); b.set_timesteps(6)
    xa = xb = rand(0) * a.init_noise_sigma
    for i, t in enumerate(a.timesteps):
        mo = rand(100 + i)
        a.scale_model_input(xa, t); b.scale_model_input(xb, t)
        oa = a.step(mo, t, xa, generator=torch.Generator().manual_seed(i))
        ob = b.step(mo, t, xb, generator=torch.Generator().manual_seed(i), eta=0.0, use_clipped_model_output=False, return_dict=True)
        assert torch.equal(oa.prev_sample, ob.prev_sample) and torch.equal(oa.pred_original_sample, ob.pred_original_sample)
        xa, xb = oa.prev_sample, ob.prev_sample
    if name != 'DDIMScheduler':  # eta and use_clipped_model_output are DDIM's: the others ignore them
        c = getattr(ms, name).sd15(); c.set_timesteps(6); x = rand(0) * c.init_noise_sigma
        d = getattr(ms, name).sd15(); d.set_timesteps(6)
        for i, t in enumerate(c.timesteps):
            mo = rand(100 + i)
            c.scale_model_input(x, t); d.scale_model_input(x, t)
            p = c.step(mo, t, x, generator=torch.Generator().manual_seed(i)).prev_sample
            q = d.step(mo, t, x, generator=torch.Generator().manual_seed(i), eta=0.7, use_clipped_model_output=True).prev_sample
            assert torch.equal(p, q)
            x = p
    e = getattr(ms, name).sd15(); e.set_timesteps(6)
    x, t = rand(0) * e.init_noise_sigma, e.timesteps[0]
    e.scale_model_input(x, t)
    prev, x0 = e.step(rand(1), t, x, return_dict=False)
    assert prev.shape == x0.shape == SHAPE

def test_ddim_eta_applies():
    s = ms.DDIMScheduler.sd15(); s.set_timesteps(10)
    t, x, mo = s.timesteps[3], rand(0), rand(1)
    p0 = s.step(mo, t, x, generator=torch.Generator().manual_seed(0)).prev_sample
    p1 = s.step(mo, t, x, generator=torch.Generator().manual_seed(0), eta=1.0).prev_sample
    assert not torch.allclose(p0, p1)
    with pytest.raises(ValueError, match='not both'):
        s.step(mo, t, x, generator=torch.Generator(), eta=1.0, variance_noise=rand(2))

def test_euler_churn_noise_given_explicitly():
    "Euler's churn noise may be given as `variance_noise`, like the other schedulers' noise."
    a, b = ms.EulerDiscreteScheduler(), ms.EulerDiscreteScheduler()
    a.set_timesteps(10); b.set_timesteps(10)
    x, mo, churn = rand(0) * a.init_noise_sigma, rand(1), dict(s_churn=5.0)
    t = a.timesteps[0]
    pa = a.step(mo, t, x, generator=torch.Generator().manual_seed(3), **churn).prev_sample
    pb = b.step(mo, t, x, variance_noise=torch.randn(SHAPE, generator=torch.Generator().manual_seed(3)), **churn).prev_sample
    assert torch.equal(pa, pb)
    with pytest.raises(TypeError): a.step(mo, a.timesteps[1], x, no_such_keyword=1)

@pytest.mark.parametrize('preset', ['sd15', 'sd21'])
@pytest.mark.parametrize('name', ALL)
def test_presets_match_diffusers(name, preset):
    "`X.sd15()` / `X.sd21()` equal diffusers' `X.from_config(...)` of the same Stable Diffusion scheduler_config.json."
    ours = getattr(getattr(ms, name), preset)()
    theirs = getattr(diffusers, name).from_config(ms.SCHEDULER_PRESETS[preset])
    names = [k for k in inspect.signature(getattr(diffusers, name).__init__).parameters if k != 'self']
    assert dict(ours.config) == {k: theirs.config[k] for k in names}
    assert ours.config.beta_schedule == 'scaled_linear' and ours.config.prediction_type == ('v_prediction' if preset == 'sd21' else 'epsilon')
    close(ours.alphas_cumprod, theirs.alphas_cumprod, rtol=0, atol=0)
