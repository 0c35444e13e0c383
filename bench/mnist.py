"""MNIST benchmark: U-Net training throughput (minisd vs diffusers, identical weights), sampling time per sampler
(DDPM-1000, DDIM-50/25/10) and FID / KID / prompt accuracy per sampler beside the real-vs-real baseline.

    OMP_NUM_THREADS=1 python bench/mnist.py                       # reuse runs/mnist_cfg (trained by nbs/08_guidance)
    OMP_NUM_THREADS=1 python bench/mnist.py --train               # (re)train the class-conditional model first
    OMP_NUM_THREADS=1 python bench/mnist.py --seeds 3 --skip-throughput  # metrics only, 3 sample sets per DDIM row

Figures go to stdout (and to --json if given); bench/RESULTS.md holds measured ones with date, machine and command.
"""
import argparse, json, platform, statistics, sys, time
from pathlib import Path
import torch

ROOT = Path(__file__).resolve().parents[1]


def _configs():
    from minisd.unet import UNetConfig
    from minisd.guidance import class_unet_config
    return {'class-cond (16,32,64) 28px': (class_unet_config(), 28, False),
            'mnist preset + cross-attn (32,64,128) 32px': (UNetConfig.mnist(cross_attention_dim=64), 32, True)}


def throughput(bs=64, rounds=8):
    "Training images/s (forward + backward + AdamW step) of minisd's UNet and diffusers' UNet2DConditionModel, same weights."
    from diffusers import UNet2DConditionModel
    from minisd.unet import UNet
    rows = []
    for name, (cfg, size, cross) in _configs().items():
        torch.manual_seed(0)
        ours = UNet(cfg)
        d = {k: v for k, v in cfg.to_dict().items() if not k.startswith('_')}
        ref = UNet2DConditionModel(**d)
        ref.load_state_dict(ours.state_dict(), strict=True)
        x, t = torch.randn(bs, cfg.in_channels, size, size), torch.randint(0, 1000, (bs,))
        kw = {}
        if cfg.num_class_embeds: kw['class_labels'] = torch.randint(0, cfg.num_class_embeds, (bs,))
        ehs = torch.randn(bs, 1, cfg.cross_attention_dim) if cross else None
        with torch.no_grad():
            err = (ours(x, t, ehs, **kw) - ref(x, t, ehs, return_dict=False, **kw)[0]).abs().max().item()
        fns = {}
        for k, m in (('minisd', ours), ('diffusers', ref)):
            opt = torch.optim.AdamW(m.parameters(), 1e-4)
            call = (lambda m=m: m(x, t, ehs, **kw)) if k == 'minisd' else (lambda m=m: m(x, t, ehs, return_dict=False, **kw)[0])
            def step(call=call, opt=opt):
                call().square().mean().backward(); opt.step(); opt.zero_grad(set_to_none=True)
            step()  # warm-up
            fns[k] = step
        times = {k: [] for k in fns}
        for i in range(rounds):  # interleaved, alternating who goes first, so a busy neighbour slows both alike
            for k, f in (list(fns.items()) if i % 2 == 0 else list(fns.items())[::-1]):
                t0 = time.perf_counter(); f(); times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append(dict(config=name, params=sum(p.numel() for p in ours.parameters()), max_abs_diff=err,
                         minisd_img_s=bs / med['minisd'], diffusers_img_s=bs / med['diffusers'],
                         time_ratio=med['minisd'] / med['diffusers']))
    return rows


def samplers(unet, scale, n, n_ddpm, metrics, seeds=1):
    """Seconds per image and FID/KID/prompt accuracy for DDPM-1000 and DDIM-50/25/10 with classifier-free guidance.
    With several seeds, each seed draws a fresh set of `n` samples; the row reports their mean (and the FID spread)."""
    from minisd.guidance import generate, mnist_scheduler
    rows = []
    for name, steps, kind, count in [('DDPM-1000', 1000, 'ddpm', n_ddpm), ('DDIM-50', 50, 'ddim', n),
                                     ('DDIM-25', 25, 'ddim', n), ('DDIM-10', 10, 'ddim', n)]:
        if count == 0: continue
        labels = torch.arange(10).repeat((count + 9) // 10)[:count]
        b = metrics.baseline(count)
        runs, dt = [], 0.
        for seed in range(7, 7 + (seeds if kind == 'ddim' else 1)):
            t0 = time.perf_counter()
            x = generate(unet, labels, scale, steps, scheduler=mnist_scheduler(kind), seed=seed)
            dt += time.perf_counter() - t0
            runs.append(metrics(x, labels))
        mean = lambda k: statistics.fmean(r[k] for r in runs)
        fids = [r['fid'] for r in runs]
        rows.append(dict(sampler=name, n=count, seeds=len(runs), s_per_image=dt / (count * len(runs)), fid=mean('fid'),
                         fid_min=min(fids), fid_max=max(fids), kid=mean('kid'), prompt_accuracy=mean('prompt_accuracy'),
                         base_fid=b['fid'], base_kid=b['kid'], base_prompt_accuracy=b['prompt_accuracy']))
        print(f"  {name}: {dt / (count * len(runs)):.3f} s/image, FID {fids}", file=sys.stderr)
    return rows


def pick_scale(unet, metrics, n, scales=(1.1, 1.25, 1.5, 2., 3.), min_accuracy=0.95):
    "As nbs/08_guidance does: the guided scale with the best FID among those reaching `min_accuracy` (DDIM-25, seed 2)."
    from minisd.guidance import generate, best_guidance_scale
    labels = torch.arange(10).repeat((n + 9) // 10)[:n]
    with torch.no_grad(): res = {s: metrics(generate(unet, labels, s, 25, seed=2), labels) for s in scales}
    best = best_guidance_scale(res, min_accuracy)
    fids = ', '.join(f"s={s}: {r['fid']:.2f} ({r['prompt_accuracy']:.1%})" for s, r in res.items())
    print(f"guidance scale {best} (FID and prompt accuracy by scale: {fids})")
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--model', default=str(ROOT / 'runs' / 'mnist_cfg'), help='folder from save_unet (nbs/08_guidance)')
    ap.add_argument('--train', action='store_true', help='train the class-conditional model first (and save it to --model)')
    ap.add_argument('--epochs', type=int, default=None, help='training epochs (default: train_class_unet\'s)')
    ap.add_argument('--scale', type=float, default=None, help='guidance scale (default: guidance_scale.json in --model, else picked as nbs/08_guidance does and saved there)')
    ap.add_argument('--n', type=int, default=500, help='samples per DDIM sampler for the metrics')
    ap.add_argument('--seeds', type=int, default=1, help='independent sample sets per DDIM sampler (FID: mean, min, max)')
    ap.add_argument('--n-ddpm', type=int, default=50, help='samples for DDPM-1000 (slow: 1000 steps)')
    ap.add_argument('--rounds', type=int, default=8, help='interleaved timing rounds per implementation (throughput)')
    ap.add_argument('--threads', type=int, default=None, help='torch threads (default: torch\'s choice / OMP_NUM_THREADS)')
    ap.add_argument('--skip-throughput', action='store_true')
    ap.add_argument('--skip-samplers', action='store_true')
    ap.add_argument('--json', default=None, help='also write the figures to this file')
    a = ap.parse_args()
    if a.threads: torch.set_num_threads(a.threads)
    out = dict(torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.processor() or platform.machine())
    print(f"torch {out['torch']}, {out['threads']} thread(s), {platform.platform()}")

    if not a.skip_throughput:
        import diffusers
        out['diffusers'] = diffusers.__version__
        out['throughput'] = throughput(rounds=a.rounds)
        print(f"\nTraining throughput (bs 64, fwd+bwd+AdamW, median of {a.rounds} rounds), diffusers {diffusers.__version__}:")
        print(f"{'config':46s}{'params':>10s}{'minisd img/s':>14s}{'diffusers img/s':>17s}{'time ratio':>12s}{'max|diff|':>11s}")
        for r in out['throughput']:
            print(f"{r['config']:46s}{r['params']:10,d}{r['minisd_img_s']:14.1f}{r['diffusers_img_s']:17.1f}"
                  f"{r['time_ratio']:12.3f}{r['max_abs_diff']:11.1e}")

    if not a.skip_samplers:
        from minisd.guidance import train_class_unet, save_unet, load_unet
        from minisd.metrics import MnistMetrics
        model = Path(a.model)
        if a.train or not (model / 'config.json').exists():
            t0 = time.time()
            learn = train_class_unet(**({} if a.epochs is None else {'epochs': a.epochs}), progress=False)
            secs = time.time() - t0
            save_unet(learn.model, model)
            (model / 'guidance_scale.json').unlink(missing_ok=True)   # chosen for the old weights
            (model / 'train_time.json').write_text(json.dumps({'train_seconds': secs, 'epochs': learn.n_epochs, 'steps': learn.n_steps}))
            print(f"\ntrained the class-conditional U-Net in {secs / 60:.1f} min -> {model}")
        unet, metrics = load_unet(model), MnistMetrics()
        tt = model / 'train_time.json'
        if tt.exists(): out['train'] = json.loads(tt.read_text())
        gs = model / 'guidance_scale.json'
        if a.scale is not None: scale = a.scale
        elif gs.exists(): scale = json.loads(gs.read_text())['guidance_scale']
        else:
            scale = pick_scale(unet, metrics, a.n)
            gs.write_text(json.dumps({'guidance_scale': scale}))
        out['guidance_scale'] = scale
        with torch.no_grad(): out['samplers'] = samplers(unet, scale, a.n, a.n_ddpm, metrics, a.seeds)
        if 'train' in out: print(f"\nmodel: {model} (trained in {out['train']['train_seconds'] / 60:.1f} min, {out['train']['epochs']} epochs)")
        print(f"Samplers, classifier-free guidance s={scale}; real-vs-real baseline = held-out valid digits at the same n:")
        print(f"{'sampler':11s}{'n':>5s}{'seeds':>6s}{'s/image':>9s}{'FID':>8s}{'FID range':>14s}{'base FID':>10s}{'FID/base':>10s}"
              f"{'KID':>9s}{'base KID':>10s}{'prompt acc':>12s}{'base acc':>10s}")
        for r in out['samplers']:
            rng = f"{r['fid_min']:.2f}-{r['fid_max']:.2f}"
            print(f"{r['sampler']:11s}{r['n']:5d}{r['seeds']:6d}{r['s_per_image']:9.3f}{r['fid']:8.2f}{rng:>14s}{r['base_fid']:10.2f}"
                  f"{r['fid'] / r['base_fid']:10.2f}{r['kid']:9.4f}{r['base_kid']:10.4f}{r['prompt_accuracy']:12.3f}{r['base_prompt_accuracy']:10.3f}")
    if a.json: Path(a.json).write_text(json.dumps(out, indent=2))


if __name__ == '__main__':
    main()
