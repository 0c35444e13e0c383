"""minisd vs diffusers/transformers on the same weights and dtype: Stable Diffusion 1.5 components and end to end.

Components (each timed on both implementations, alternating, median of `--repeats` after `--warmup`):
  U-Net step   batch 2 (classifier-free guidance), 4x64x64 latents, 2x77x768 text
  VAE decode   1x4x64x64 latents -> 1x3x512x512
  text encoder 2x77 token ids
End to end (`--e2e`, default on CUDA): txt2img at `--size` pixels, `--steps` DDIM steps, CFG 7.5; seconds and peak memory.
Load (`--load DIR`): `StableDiffusion.from_pretrained(DIR)` vs `diffusers.StableDiffusionPipeline.from_pretrained(DIR)`.

Weights are random at full SD 1.5 size unless `--model` names a pipeline folder or hub id; minisd's modules share
the reference modules' tensors (`load_state_dict(assign=True)`), so the weights are the same and held once.

CPU fp32 (the default):   python bench/sd.py --warmup 1 --repeats 3 [--threads 1 on a shared, loaded machine]
GPU:                      python bench/sd.py --device cuda --dtype fp16 --warmup 3 --repeats 10 --e2e [--channels-last]
Real weights:             python bench/sd.py --device cuda --dtype fp16 --e2e --model stable-diffusion-v1-5/stable-diffusion-v1-5
Loading:                  python bench/sd.py --save-random /tmp/sd15-random && python bench/sd.py --load /tmp/sd15-random --components ''
"""
from __future__ import annotations
import argparse, gc, os, platform, statistics, tempfile, time
from contextlib import contextmanager
import torch

DTYPES = {'fp32': torch.float32, 'fp16': torch.float16, 'bf16': torch.bfloat16}
CORPUS = ["a photograph of an astronaut riding a horse", "a watercolor painting of a fox in the snow",
          "a handwritten digit seven", "a bowl of fruit on a wooden table, studio lighting"] * 4


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split('\n', 1)[1])
    p.add_argument('--device', default='cpu', help='cpu or cuda')
    p.add_argument('--dtype', default='fp32', choices=list(DTYPES))
    p.add_argument('--warmup', type=int, default=1, help='untimed runs per implementation and component')
    p.add_argument('--repeats', type=int, default=3, help='timed runs per implementation and component (median reported)')
    p.add_argument('--components', default='unet,vae,text', help="comma-separated subset of unet,vae,text ('' for none)")
    p.add_argument('--e2e', action=argparse.BooleanOptionalAction, default=None, help='end-to-end txt2img (default: on for cuda)')
    p.add_argument('--steps', type=int, default=50, help='end-to-end denoising steps')
    p.add_argument('--size', type=int, default=512, help='end-to-end image height and width')
    p.add_argument('--channels-last', action='store_true', help='convolution weights and inputs in channels_last')
    p.add_argument('--threads', type=int, default=None, help='torch.set_num_threads (CPU)')
    p.add_argument('--model', default=None, help='diffusers pipeline folder or hub id (default: random full-size SD 1.5 weights)')
    p.add_argument('--save-random', default=None, metavar='DIR', help='write a random full-size SD 1.5 pipeline (diffusers) to DIR and exit')
    p.add_argument('--load', default=None, metavar='DIR', help='time loading the pipeline folder DIR with both libraries')
    p.add_argument('--load-dtype', default=None, choices=list(DTYPES), help='torch_dtype for --load (default: as stored/float32)')
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------------
# Models: the reference (diffusers / transformers) with random or loaded weights, minisd sharing its tensors
def share(ours_cls, config, ref:torch.nn.Module) -> torch.nn.Module:
    "minisd module of class `ours_cls` built without memory or init, holding `ref`'s very tensors (same weights, held once)."
    from minisd.checkpoints import empty_weights
    with empty_weights(): ours = ours_cls(config)
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    return ours.to(next(ref.parameters()).device).eval()


def random_tokenizer_dir() -> str:
    "A small CLIP-format tokenizer (no download possible) saved where transformers can read it too."
    from minisd.tokenizer import CLIPTokenizer
    d = tempfile.mkdtemp(prefix='minisd-bench-tok-')
    CLIPTokenizer.train(CORPUS, vocab_size=600).save_pretrained(d)
    return d


def sd15_configs() -> dict:
    "SD 1.5's component configs (diffusers / transformers key names), as minisd writes them."
    from minisd.unet import UNetConfig
    from minisd.vae import VAEConfig
    from minisd.clip import CLIPTextConfig
    return dict(unet=UNetConfig.sd15().to_dict(), vae=VAEConfig.sd15().to_dict(), text=CLIPTextConfig.sd15().to_dict())


def random_reference(configs:dict|None=None, device='cpu', seed:int=0):
    "fp32 diffusers U-Net and VAE and transformers text encoder with random weights, built (and initialised) on `device`."
    import diffusers, transformers
    configs = configs or sd15_configs()
    torch.manual_seed(seed)
    with torch.device(device):
        return (diffusers.UNet2DConditionModel.from_config(configs['unet']).eval(),
                diffusers.AutoencoderKL.from_config(configs['vae']).eval(),
                transformers.CLIPTextModel(transformers.CLIPTextConfig(**configs['text'])).eval())


def reference_models(args, dtype, device):
    "diffusers/transformers SD 1.5 components (random, or from `--model`), a tokenizer folder, on `device` in `dtype`."
    import diffusers
    if args.model:
        dp = diffusers.StableDiffusionPipeline.from_pretrained(args.model, torch_dtype=dtype, safety_checker=None)
        tok_dir = dp.tokenizer.name_or_path if os.path.isdir(str(dp.tokenizer.name_or_path)) else None
        if tok_dir is None: tok_dir = tempfile.mkdtemp(prefix='minisd-bench-tok-'); dp.tokenizer.save_pretrained(tok_dir)
        unet, vae, text = dp.unet, dp.vae, dp.text_encoder
        sched_cfg = dict(dp.scheduler.config)
    else:
        t0 = time.perf_counter()
        unet, vae, text = random_reference(device=device)
        print(f"random full-size SD 1.5 weights built in {time.perf_counter() - t0:.1f} s")
        tok_dir, sched_cfg = random_tokenizer_dir(), None
    mf = torch.channels_last if args.channels_last else torch.preserve_format
    models = [m.to(device=device, memory_format=mf).eval() for m in (unet, vae, text)]
    if dtype != torch.float32: models = [m.to(dtype=dtype) for m in models]
    return (*models, tok_dir, sched_cfg)


def minisd_models(unet, vae, text):
    from minisd.unet import UNet, UNetConfig
    from minisd.vae import AutoencoderKL, VAEConfig
    from minisd.clip import CLIPTextModel, CLIPTextConfig
    return (share(UNet, UNetConfig.from_dict(dict(unet.config)), unet),
            share(AutoencoderKL, VAEConfig.from_dict(dict(vae.config)), vae),
            share(CLIPTextModel, CLIPTextConfig.from_dict(text.config.to_dict()), text))


# ---------------------------------------------------------------------------------------------------------------------
# Timing
def synchronize(device):
    if torch.device(device).type == 'cuda': torch.cuda.synchronize()


@contextmanager
def peak_memory(device, out:dict):
    "Peak CUDA memory allocated inside the block, in MiB (total, and above what was allocated before)."
    cuda = torch.device(device).type == 'cuda'
    if cuda: synchronize(device); torch.cuda.reset_peak_memory_stats(); before = torch.cuda.memory_allocated()
    yield
    if cuda:
        synchronize(device)
        out['peak_mib'] = torch.cuda.max_memory_allocated() / 2**20
        out['extra_mib'] = (torch.cuda.max_memory_allocated() - before) / 2**20


def race(fns:dict, warmup:int, repeats:int, device) -> dict:
    "Time each of `fns` (name -> callable), alternating between them so that load changes hit all alike."
    times, mem, outs = {k: [] for k in fns}, {k: {} for k in fns}, {}
    with torch.inference_mode():
        for k, f in fns.items():
            for _ in range(warmup): outs[k] = f()
        synchronize(device)
        for _ in range(repeats):
            for k, f in fns.items():
                with peak_memory(device, mem[k]):
                    t0 = time.perf_counter(); outs[k] = f(); synchronize(device)
                    times[k].append(time.perf_counter() - t0)
    return {k: dict(median=statistics.median(v), min=min(v), times=v, out=outs[k], **mem[k]) for k, v in times.items()}


def report(name:str, res:dict, lines:list):
    m, d = res['minisd'], res['diffusers']
    diff = (m['out'].float() - d['out'].float()).abs().max().item() if isinstance(m['out'], torch.Tensor) else float('nan')
    mem = lambda r: f"{r['peak_mib']:8.0f}" if 'peak_mib' in r else '       -'
    line = (f"| {name:<28} | {m['median']:9.3f} | {d['median']:9.3f} | {m['median'] / d['median']:5.2f} | "
            f"{m['min']:7.3f} | {d['min']:7.3f} | {mem(m)} | {mem(d)} | {diff:8.1e} |")
    lines.append(line); print(line, flush=True)


# ---------------------------------------------------------------------------------------------------------------------
def component_fns(models, device, dtype, channels_last:bool=False, seed:int=0) -> dict:
    """name -> (label, {'minisd': f, 'diffusers': f}): one U-Net step (CFG batch 2), VAE decode, text encoder, on the same
    random inputs (drawn in fp32 on the CPU from `seed`, then cast, so that every dtype sees the same numbers)."""
    unet, vae, text, m_unet, m_vae, m_text = models
    g = torch.Generator().manual_seed(seed)
    mf = torch.channels_last if channels_last else torch.contiguous_format
    ucfg = m_unet.config
    s = ucfg.sample_size[0] if isinstance(ucfg.sample_size, (list, tuple)) else ucfg.sample_size
    x = torch.randn(2, ucfg.in_channels, s, s, generator=g).to(device, dtype).contiguous(memory_format=mf)
    ehs = torch.randn(2, 77, ucfg.cross_attention_dim, generator=g).to(device, dtype)
    t = torch.tensor(981, device=device)
    z = torch.randn(1, m_vae.config.latent_channels, s, s, generator=g).to(device, dtype).contiguous(memory_format=mf)
    ids = torch.randint(0, m_text.config.vocab_size, (2, 77), generator=g).to(device)
    return {'unet': (f'U-Net step (2x{ucfg.in_channels}x{s}x{s}, CFG)',
                     {'minisd': lambda: m_unet(x, t, encoder_hidden_states=ehs),
                      'diffusers': lambda: unet(x, t, encoder_hidden_states=ehs).sample}),
            'vae': (f'VAE decode (1x{m_vae.config.latent_channels}x{s}x{s})',
                    {'minisd': lambda: m_vae.decode(z), 'diffusers': lambda: vae.decode(z).sample}),
            'text': ('text encoder (2x77)', {'minisd': lambda: m_text(ids), 'diffusers': lambda: text(ids).last_hidden_state})}


def bench_components(args, comps, models, dtype, device, lines):
    for name, (label, fns) in component_fns(models, device, dtype, args.channels_last).items():
        if name in comps: report(label, race(fns, args.warmup, args.repeats, device), lines)


SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear',
                      clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def make_pipelines(models, tok_dir, sched_cfg=None):
    "minisd's `StableDiffusion` and diffusers' `StableDiffusionPipeline` on `models` (ref unet, vae, text, then minisd's), DDIM."
    import diffusers, transformers
    from minisd.pipeline import StableDiffusion
    from minisd.tokenizer import CLIPTokenizer
    from minisd.schedulers import DDIMScheduler
    unet, vae, text, m_unet, m_vae, m_text = models
    cfg = {k: v for k, v in (sched_cfg or SD15_SCHEDULER).items() if not k.startswith('_')}
    dp = None
    if unet is not None:
        dp = diffusers.StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text,
                                               tokenizer=transformers.CLIPTokenizer.from_pretrained(tok_dir),
                                               scheduler=diffusers.DDIMScheduler.from_config(cfg), safety_checker=None,
                                               feature_extractor=None, requires_safety_checker=False)
        dp.set_progress_bar_config(disable=True)
    mp = StableDiffusion(m_unet, m_vae, m_text, CLIPTokenizer.from_pretrained(tok_dir), DDIMScheduler.from_config(cfg))
    mp.set_progress_bar_config(disable=True)
    return mp, dp


def bench_e2e(args, models, tok_dir, sched_cfg, dtype, device, lines):
    "txt2img at `args.size` pixels, `args.steps` DDIM steps, both pipelines on the same modules, scheduler and noise."
    mp, dp = make_pipelines(models, tok_dir, sched_cfg)
    kw = dict(prompt="a photograph of an astronaut riding a horse", num_inference_steps=args.steps, guidance_scale=7.5,
              height=args.size, width=args.size, output_type='pt')
    gen = lambda: torch.Generator().manual_seed(0)
    res = race({'minisd': lambda: mp(**kw, generator=gen()), 'diffusers': lambda: dp(**kw, generator=gen()).images},
               min(args.warmup, 1), max(1, min(args.repeats, 3)), device)
    report(f'txt2img {args.size}px, {args.steps} steps', res, lines)


def bench_load(args, lines):
    "Seconds to load a saved pipeline folder, minisd vs diffusers (each loaded, timed, then dropped)."
    import diffusers
    from minisd.pipeline import StableDiffusion
    dtype = DTYPES[args.load_dtype] if args.load_dtype else None
    def load_minisd(): return StableDiffusion.from_pretrained(args.load, torch_dtype=dtype)
    def load_diffusers(): return diffusers.StableDiffusionPipeline.from_pretrained(args.load, torch_dtype=dtype, safety_checker=None)
    times = {'minisd': [], 'diffusers': []}
    for _ in range(args.repeats):
        for k, f in (('minisd', load_minisd), ('diffusers', load_diffusers)):
            gc.collect()
            t0 = time.perf_counter(); p = f(); times[k].append(time.perf_counter() - t0)
            del p; gc.collect()
    res = {k: dict(median=statistics.median(v), min=min(v), out=None) for k, v in times.items()}
    report(f'from_pretrained ({args.load_dtype or "stored dtype"})', res, lines)


def save_random(path):
    "A random full-size SD 1.5 pipeline written by diffusers (fp32 safetensors, ~4.3 GB) for `--load`."
    import diffusers, transformers
    unet, vae, text, tok_dir, _ = reference_models(argparse.Namespace(model=None, channels_last=False), torch.float32, 'cpu')
    sched = diffusers.DDIMScheduler(**SD15_SCHEDULER)
    dp = diffusers.StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=transformers.CLIPTokenizer.from_pretrained(tok_dir),
                                           scheduler=sched, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    t0 = time.perf_counter(); dp.save_pretrained(path)
    print(f"saved to {path} in {time.perf_counter() - t0:.1f} s")


def main(argv=None):
    args = parse_args(argv)
    if args.save_random: return save_random(args.save_random)
    if args.threads: torch.set_num_threads(args.threads)
    device, dtype = args.device, DTYPES[args.dtype]
    if torch.device(device).type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    e2e = torch.device(device).type == 'cuda' if args.e2e is None else args.e2e
    comps = [c for c in args.components.split(',') if c]
    import diffusers, transformers
    for lib in (diffusers, transformers): lib.logging.set_verbosity_error(); lib.utils.logging.disable_progress_bar()
    gpu = torch.cuda.get_device_name() if torch.device(device).type == 'cuda' else platform.processor() or platform.machine()
    print(f"minisd vs diffusers {diffusers.__version__} / transformers {transformers.__version__}; torch {torch.__version__}; "
          f"{device} ({gpu}), {args.dtype}, threads {torch.get_num_threads()}, channels_last {args.channels_last}, "
          f"warmup {args.warmup}, repeats {args.repeats}; load average {os.getloadavg()[0]:.1f}", flush=True)
    lines = ["| what | minisd s | diffusers s | ratio | minisd min | diffusers min | minisd peak MiB | diffusers peak MiB | max abs diff |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    print('\n'.join(lines), flush=True)
    if args.load: bench_load(args, lines)
    if comps or e2e:
        ref = reference_models(args, dtype, device)
        models = (*ref[:3], *minisd_models(*ref[:3]))
        bench_components(args, comps, models, dtype, device, lines)
        if e2e: bench_e2e(args, models, ref[3], ref[4], dtype, device, lines)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    return lines


if __name__ == '__main__': main()
