"""minisd vs diffusers on one GPU in one run: fp16/bf16 parity, the time and peak memory of a whole image, minisd's fastest mode.

Random full-size SD 1.5 weights are built by diffusers/transformers on the device (nothing is downloaded) and minisd
holds the very same tensors (`bench/sd.py`'s `share`). Stages, in order; each is recorded in OUTDIR/gpu.json as soon as
it ends: ok, error (with its traceback; later stages still run) or skipped (too little of `--budget` left):
  setup      build the fp32 models and a CLIP-format tokenizer (a small one trained by minisd: no vocab can be downloaded)
  fp32       reference outputs, TF32 off: U-Net step, VAE decode, text encoder, the whole image; both libraries
  fp16/bf16  the same in that dtype, the two libraries alternating (median of repeats after warm-up): error of each
             against the other and against fp32; the image (512x512, 50 DDIM steps, CFG 7.5, the same latents):
             PSNR minisd vs diffusers and vs fp32, seconds, peak memory (`torch.cuda.max_memory_allocated`, only this
             dtype's models on the device)
  best_*     minisd alone, fp16, each mode a stage of its own, cumulative: `channels_last` (SDPA is always on: minisd's
             attention is `F.scaled_dot_product_attention`), `compile` (+ `torch.compile` of the U-Net), `cudagraphs`
             (+ compile mode 'reduce-overhead'); PSNR against the eager fp16 images, seconds, peak memory
Usage: bash bench/gpu.sh OUTDIR [--tiny]   (the GPU machine: see bench/gpu.sh's header)
       python bench/gpu.py OUTDIR --tiny   (the same stages, tiny models, on the CPU: a dry run)
"""
from __future__ import annotations
import argparse, copy, gc, json, math, platform, signal, sys, time, traceback, warnings
from pathlib import Path
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sd  # bench/sd.py: models, pipelines, inputs and the alternating timer are shared with it

PROMPT = "a photograph of an astronaut riding a horse"
BEST = ('channels_last', 'compile', 'cudagraphs')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split('\n', 1)[1])
    p.add_argument('outdir', help='folder for gpu.json')
    p.add_argument('--tiny', action='store_true', help='tiny models on the CPU (fp32 reference, fp16 and bf16 as on the GPU)')
    p.add_argument('--device', default=None, help='default: cuda if available, else cpu')
    p.add_argument('--size', type=int, default=None, help='image height and width (default 512; tiny: 16)')
    p.add_argument('--steps', type=int, default=None, help='DDIM steps of the image (default 50; tiny: 10, as fp16 is slow on a CPU)')
    p.add_argument('--guidance-scale', type=float, default=7.5)
    p.add_argument('--warmup', type=int, default=2, help='untimed images per implementation before timing; the first is the parity run (compiled modes: at least 3)')
    p.add_argument('--repeats', type=int, default=5, help='timed images per implementation (median; at least 5 for fp16)')
    p.add_argument('--comp-warmup', type=int, default=3, help='untimed component calls per implementation')
    p.add_argument('--comp-repeats', type=int, default=10, help='timed component calls per implementation')
    p.add_argument('--dtypes', default='fp16,bf16', help='comma-separated half dtypes to compare (fp16, bf16)')
    p.add_argument('--best', default=','.join(BEST), help=f"comma-separated subset of {','.join(BEST)} ('' for none)")
    p.add_argument('--compile-vae', action='store_true', help='the compile modes also compile the VAE decoder')
    p.add_argument('--budget', type=float, default=420, help='seconds for the whole run: later stages are skipped when short')
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------------
def tiny_configs() -> dict:
    "SD 1.5's configs shrunk: two levels everywhere, 32-wide text; the same block types, so the same code runs."
    c = sd.sd15_configs()
    c['unet'].update(sample_size=16, block_out_channels=[32, 64], layers_per_block=1, cross_attention_dim=32,
                     down_block_types=['CrossAttnDownBlock2D', 'DownBlock2D'], up_block_types=['UpBlock2D', 'CrossAttnUpBlock2D'],
                     attention_head_dim=4, norm_num_groups=8)
    c['vae'].update(block_out_channels=[16, 32], layers_per_block=1, down_block_types=['DownEncoderBlock2D'] * 2,
                    up_block_types=['UpDecoderBlock2D'] * 2, norm_num_groups=8, sample_size=32)
    c['text'].update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32)
    return c


def _num(x):
    "JSON-safe float: NaN and infinities as strings."
    x = float(x)
    return x if math.isfinite(x) else str(x)


def rel_err(a:torch.Tensor, b:torch.Tensor):
    "||a - b|| / ||b|| in float64."
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return _num((a - b).norm() / b.norm())


def psnr(a:torch.Tensor, b:torch.Tensor):
    "Peak signal-to-noise ratio in dB of images in [0, 1]."
    mse = ((a.detach().double().cpu() - b.detach().double().cpu()) ** 2).mean().item()
    return _num(10 * math.log10(1 / mse)) if mse > 0 else 'inf'


def image_stats(x:torch.Tensor) -> dict:
    "What a PSNR means depends on the image: random weights can saturate it."
    x = x.detach().float().cpu()
    return dict(finite=bool(torch.isfinite(x).all()), mean=_num(x.mean()), std=_num(x.std()),
                saturated=_num(((x <= 0) | (x >= 1)).float().mean()))


def timing(r:dict) -> dict:
    return {k: (_num(v) if isinstance(v, float) else [_num(t) for t in v]) for k, v in r.items()
            if k in ('median', 'min', 'times', 'peak_mib', 'extra_mib')}


class OverBudget(Exception): pass


class Run:
    "Results, written to OUTDIR/gpu.json after every stage and measurement; stages skipped when the budget runs low."
    def __init__(self, args):
        self.args, self.t0 = args, time.perf_counter()
        self.path = Path(args.outdir) / 'gpu.json'
        self.data = dict(meta={}, stages={}, results={})

    def left(self) -> float: return self.args.budget - (time.perf_counter() - self.t0)

    def save(self):
        from minisd.core import atomic_write
        self.data['meta']['elapsed_s'] = round(time.perf_counter() - self.t0, 1)
        atomic_write(self.path, lambda p: Path(p).write_text(json.dumps(self.data, indent=1)))

    def put(self, *keys, value):
        d = self.data['results']
        for k in keys[:-1]: d = d.setdefault(k, {})
        d[keys[-1]] = value
        self.save()

    def stage(self, name:str, need:float, fn):
        "Run `fn()` as stage `name` if `need` seconds are left, under an alarm at the budget's end; record the outcome."
        left = self.left()
        if left < need:
            self.data['stages'][name] = dict(status='skipped', reason=f'needs ~{need:.0f} s, {left:.0f} s left of {self.args.budget:.0f} s')
            log(f"[{name}] skipped: {self.data['stages'][name]['reason']}"); self.save(); return None
        log(f"[{name}] start ({left:.0f} s left)")
        t0, out = time.perf_counter(), None
        def over(signum, frame): raise OverBudget(f'the {self.args.budget:.0f} s budget ran out inside stage {name}')
        signal.signal(signal.SIGALRM, over); signal.alarm(max(1, int(left)))
        try:
            out = fn()
            self.data['stages'][name] = dict(status='ok')
        except Exception as e:  # recorded, and the next stages still run: one failure must not lose the others' figures
            self.data['stages'][name] = dict(status='error', error=f'{type(e).__name__}: {e}'[:2000],
                                             traceback=traceback.format_exc()[-4000:])
            log(traceback.format_exc())
        finally:
            signal.alarm(0)
        self.data['stages'][name]['seconds'] = round(time.perf_counter() - t0, 1)
        log(f"[{name}] {self.data['stages'][name]['status']} in {self.data['stages'][name]['seconds']} s")
        self.save()
        return out


def log(msg): print(msg, flush=True)


# ---------------------------------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args):
        self.args, self.run = args, Run(args)
        self.device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
        self.cuda = torch.device(self.device).type == 'cuda'
        self.configs = tiny_configs() if args.tiny else sd.sd15_configs()
        self.size = args.size or (16 if args.tiny else 512)
        args.steps = args.steps or (10 if args.tiny else 50)
        self.refs, self.images, self.image_s = {}, {}, {}   # fp32 outputs; images per (dtype, lib); seconds per image

    # models ---------------------------------------------------------------------------------------------------------
    def setup(self):
        import diffusers, transformers
        for lib in (diffusers, transformers): lib.logging.set_verbosity_error(); lib.utils.logging.disable_progress_bar()
        if self.cuda:
            torch.backends.cudnn.benchmark = True
            name, cap = torch.cuda.get_device_name(), torch.cuda.get_device_capability()
        else: name, cap = platform.processor() or platform.machine(), None
        self.run.data['meta'].update(
            device=self.device, device_name=name, capability=cap, torch=torch.__version__, cuda=torch.version.cuda,
            diffusers=diffusers.__version__, transformers=transformers.__version__, python=platform.python_version(),
            tiny=self.args.tiny, size=self.size, steps=self.args.steps, guidance_scale=self.args.guidance_scale,
            date=time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()), argv=sys.argv, threads=torch.get_num_threads(),
            budget_s=self.args.budget)
        log(f"{name} ({self.device}), torch {torch.__version__}, diffusers {diffusers.__version__}, "
            f"transformers {transformers.__version__}; {'tiny' if self.args.tiny else 'full-size SD 1.5'}, {self.size}px, {self.args.steps} steps")
        t0 = time.perf_counter()
        self.master = sd.random_reference(self.configs, self.device)   # fp32, on the device; moved to the CPU after fp32
        self.tok_dir = sd.random_tokenizer_dir()
        self.sync()
        self.run.data['meta'].update(build_s=round(time.perf_counter() - t0, 1),
                                     params={k: sum(p.numel() for p in m.parameters()) for k, m in zip(('unet', 'vae', 'text'), self.master)})
        f = 2 ** (len(self.configs['vae']['block_out_channels']) - 1)
        self.latents = torch.randn(1, self.configs['unet']['in_channels'], self.size // f, self.size // f,
                                   generator=torch.Generator().manual_seed(0))
        self.run.save()

    def sync(self): sd.synchronize(self.device)

    def free(self):
        gc.collect()
        if self.cuda: torch.cuda.empty_cache()

    def models(self, dtype):
        "diffusers/transformers models in `dtype` on the device (copies of the fp32 master), and minisd's, sharing them."
        ref = self.master if dtype == torch.float32 else [copy.deepcopy(m).to(self.device, dtype) for m in self.master]
        return (*ref, *sd.minisd_models(*ref))

    # measurements ---------------------------------------------------------------------------------------------------
    def image_fns(self, mp, dp, dtype) -> dict:
        "The whole image from the same latents; minisd's fp32 VAE fallback, if it happens, is counted."
        kw = dict(prompt=PROMPT, num_inference_steps=self.args.steps, guidance_scale=self.args.guidance_scale,
                  height=self.size, width=self.size, output_type='pt')
        lat = self.latents.to(self.device, dtype)
        self.fallbacks = 0
        def ours():
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter('always')
                out = mp(**kw, latents=lat)
            self.fallbacks += sum('decoding again in float32' in str(x.message) for x in w)
            return out
        fns = {'minisd': ours}
        if dp is not None: fns['diffusers'] = lambda: dp(**kw, latents=lat).images
        return fns

    def flops(self, models, dtype) -> dict:
        "FLOPs of one image, counted by `torch.utils.flop_counter` on one call of each component."
        from torch.utils.flop_counter import FlopCounterMode
        fns = sd.component_fns(models, self.device, dtype)
        counts = {}
        with torch.inference_mode():
            for name, (_, f) in fns.items():
                with FlopCounterMode(display=False) as fc: f['minisd']()
                counts[name] = fc.get_total_flops()
        image = self.args.steps * counts['unet'] + counts['vae'] + counts['text']   # text: prompt and empty prompt
        return dict(per_call=counts, image_tflop=_num(image / 1e12))

    def components(self, key, models, dtype, warmup, repeats):
        for name, (label, fns) in sd.component_fns(models, self.device, dtype).items():
            r = sd.race(fns, warmup, repeats, self.device)
            m, d = r['minisd']['out'], r['diffusers']['out']
            rec = dict(label=label, minisd=timing(r['minisd']), diffusers=timing(r['diffusers']),
                       ratio=_num(r['minisd']['median'] / r['diffusers']['median']), finite=bool(torch.isfinite(m).all()),
                       rel_err_minisd_vs_diffusers=rel_err(m, d), max_abs_diff=_num((m.float() - d.float()).abs().max()))
            if dtype == torch.float32: self.refs[name] = d.float().cpu()
            elif name in self.refs:   # absent if the fp32 stage failed
                rec.update(rel_err_minisd_vs_fp32=rel_err(m, self.refs[name]), rel_err_diffusers_vs_fp32=rel_err(d, self.refs[name]))
            self.run.put(key, 'components', name, value=rec)
            log(f"  {label:<30} minisd {r['minisd']['median'] * 1e3:9.2f} ms  diffusers {r['diffusers']['median'] * 1e3:9.2f} ms  "
                f"rel err {rec['rel_err_minisd_vs_diffusers']}" + (f"  vs fp32 {rec['rel_err_minisd_vs_fp32']} / {rec['rel_err_diffusers_vs_fp32']}"
                                                               if 'rel_err_minisd_vs_fp32' in rec else ''))

    def image(self, key, mp, dp, dtype, warmup, repeats, fp32_ref=None, eager_ref=None):
        "The image: parity first (one run each), then timing (alternating), peak memory; PSNR against the references."
        fns = self.image_fns(mp, dp, dtype)
        rec = {}
        first = sd.race(fns, 0, 1, self.device)   # the first call: compilation and autotuning land here
        rec['first_call_s'] = {k: _num(v['median']) for k, v in first.items()}
        outs = {k: v['out'].float().cpu() for k, v in first.items()}
        self.image_s[key] = max(v['median'] for v in first.values())
        for k, v in outs.items(): self.images[(key, k)] = v
        rec['stats'] = {k: image_stats(v) for k, v in outs.items()}
        if 'diffusers' in outs: rec['psnr_minisd_vs_diffusers'] = psnr(outs['minisd'], outs['diffusers'])
        if fp32_ref is not None: rec['psnr_vs_fp32'] = {k: psnr(v, fp32_ref) for k, v in outs.items()}
        if eager_ref is not None: rec['psnr_vs_eager'] = {k: psnr(outs['minisd'], v) for k, v in eager_ref.items()}
        rec['minisd_vae_fp32_fallbacks'] = self.fallbacks
        self.run.put(key, 'image', value=rec)
        log(f"  image first call {rec['first_call_s']}  psnr minisd vs diffusers {rec.get('psnr_minisd_vs_diffusers')}  "
            f"vs fp32 {rec.get('psnr_vs_fp32')}  vs eager {rec.get('psnr_vs_eager')}")
        if repeats:
            # Warm up (the first call above was the first warm-up), then as many timed images as the budget allows,
            # up to `repeats`, at least one each; 30 s are kept for the stages after this one.
            w = sd.race(fns, 0, warmup - 1, self.device) if warmup > 1 else first
            rec['warmup_s'] = {k: [_num(t) for t in v['times']] for k, v in w.items()}
            per = sum(v['min'] for v in w.values())
            n = max(1, min(repeats, int((self.run.left() - 30) / max(per, 1e-3))))
            r = sd.race(fns, 0, n, self.device)
            rec['warmup'], rec['repeats'] = warmup, n
            for k, v in r.items(): rec[k] = timing(v)
            if 'diffusers' in r: rec['ratio'] = _num(r['minisd']['median'] / r['diffusers']['median'])
            rec['minisd_vae_fp32_fallbacks'] = self.fallbacks
            self.image_s[key] = max(v['median'] for v in r.values())
            self.run.put(key, 'image', value=rec)
            log(f"  image {self.size}px {self.args.steps} steps: " + ', '.join(
                f"{k} {v['median']:.3f} s (min {v['min']:.3f}" + (f", peak {v['peak_mib']:.0f} MiB)" if 'peak_mib' in v else ')') for k, v in r.items())
                + (f", ratio {rec['ratio']:.3f}" if 'ratio' in rec else '') + f", {n} timed after {warmup} warm-up")
        return outs

    # stages ---------------------------------------------------------------------------------------------------------
    def stage_fp32(self):
        tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            models = self.models(torch.float32)
            self.components('fp32', models, torch.float32, 1, 1)
            mp, dp = sd.make_pipelines(models, self.tok_dir)
            self.image('fp32', mp, dp, torch.float32, 0, 0)
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        del models, mp, dp
        self.master = [m.to('cpu') for m in self.master]   # only one dtype's models on the device from here on
        self.free()

    def stage_half(self, key, dtype, repeats):
        models = self.models(dtype)
        try:
            if self.cuda: self.run.put(key, 'weights_mib', value=_num(torch.cuda.memory_allocated() / 2**20))
            self.components(key, models, dtype, self.args.comp_warmup, self.args.comp_repeats)
            if key == 'fp16': self.run.put('flops', value=self.flops(models, dtype))
            mp, dp = sd.make_pipelines(models, self.tok_dir)
            self.image(key, mp, dp, dtype, self.args.warmup, repeats, fp32_ref=self.images.get(('fp32', 'diffusers')))
        finally:
            models = mp = dp = None
            self.free()

    def stage_best(self, mode):
        "minisd alone, fp16, with the modes up to `mode` on: its own modules (fresh copies), nothing else on the device."
        from minisd.unet import UNet, UNetConfig
        from minisd.vae import AutoencoderKL, VAEConfig
        from minisd.clip import CLIPTextModel, CLIPTextConfig
        dtype, upto = torch.float16, BEST[:BEST.index(mode) + 1]
        torch._dynamo.reset()
        unet, vae, text = [sd.share(cls, cc.from_dict(c), m).to(self.device, dtype) for cls, cc, c, m in
                           ((UNet, UNetConfig, self.configs['unet'], self.master[0]), (AutoencoderKL, VAEConfig, self.configs['vae'], self.master[1]),
                            (CLIPTextModel, CLIPTextConfig, self.configs['text'], self.master[2]))]
        try:
            if 'channels_last' in upto: unet, vae = unet.to(memory_format=torch.channels_last), vae.to(memory_format=torch.channels_last)
            if 'compile' in upto:
                kw = dict(mode='reduce-overhead') if 'cudagraphs' in upto else {}
                unet.compile(**kw)
                if self.args.compile_vae: vae.decoder.compile(**kw)
            self.free()
            mp, _ = sd.make_pipelines((None, None, None, unet, vae, text), self.tok_dir)
            eager = {k: self.images[('fp16', k)] for k in ('minisd', 'diffusers') if ('fp16', k) in self.images}
            self.run.put(f'best_{mode}', 'modes', value=list(upto) + (['compile_vae'] if self.args.compile_vae and 'compile' in upto else []))
            self.image(f'best_{mode}', mp, None, dtype, max(self.args.warmup, 3 if 'compile' in upto else 1), max(5, self.args.repeats),
                       fp32_ref=self.images.get(('fp32', 'diffusers')), eager_ref=eager)
        finally:
            unet = vae = text = mp = None
            torch._dynamo.reset()
            self.free()

    def summary(self):
        R, rows = self.run.data['results'], []
        def get(*ks):
            d = R
            for k in ks:
                if not isinstance(d, dict) or k not in d: return None
                d = d[k]
            return d
        for key in ['fp32', *self.dtypes, *[f'best_{m}' for m in self.best]]:
            im = get(key, 'image')
            if im is None: continue
            rows.append(dict(what=key, minisd_s=get(key, 'image', 'minisd', 'median'), diffusers_s=get(key, 'image', 'diffusers', 'median'),
                             ratio=im.get('ratio'), minisd_peak_mib=get(key, 'image', 'minisd', 'peak_mib'),
                             psnr_vs_diffusers=im.get('psnr_minisd_vs_diffusers'), psnr_vs_fp32=get(key, 'image', 'psnr_vs_fp32', 'minisd'),
                             psnr_vs_eager_diffusers=get(key, 'image', 'psnr_vs_eager', 'diffusers')))
        self.run.data['summary'] = rows
        self.run.save()
        fmt = lambda v: f'{v:.3f}' if isinstance(v, float) else ('-' if v is None else str(v))
        log(f"\n| what | minisd s | diffusers s | ratio | minisd peak MiB | PSNR vs diffusers | PSNR vs fp32 | PSNR vs eager diffusers fp16 |\n"
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in rows: log('| ' + ' | '.join(fmt(v) for v in r.values()) + ' |')
        log('stages: ' + ', '.join(f"{k} {v['status']} ({v.get('seconds', '-')} s)" for k, v in self.run.data['stages'].items()))

    def main(self):
        a = self.args
        self.dtypes = [d for d in a.dtypes.split(',') if d]
        self.best = [m for m in a.best.split(',') if m]
        bad = [d for d in self.dtypes if d not in ('fp16', 'bf16')] + [m for m in self.best if m not in BEST]
        if bad: raise ValueError(f"unknown --dtypes/--best entries {bad}: dtypes are fp16, bf16; modes are {', '.join(BEST)}")
        if self.run.stage('setup', 0, self.setup) is None and self.run.data['stages']['setup']['status'] != 'ok':
            return self.summary()
        self.run.stage('fp32', 10, self.stage_fp32)
        for d in self.dtypes:
            t = self.image_s.get('fp32', 1.0) / (3 if self.cuda else 1)   # a half image is ~3x faster than fp32 on a GPU
            reps = max(a.repeats, 5) if d == 'fp16' else max(1, min(a.repeats, 3))
            self.run.stage(d, 5 + 2 * (1 + a.warmup + 1) * t, lambda d=d, reps=reps: self.stage_half(d, sd.DTYPES[d], reps))
        t = self.image_s.get('fp16', self.image_s.get('fp32', 1.0))
        for m in self.best:
            compile_s = 0 if m == 'channels_last' else (150 if self.cuda else 60)
            first = self.run.data['results'].get('best_compile', {}).get('image', {}).get('first_call_s', {}).get('minisd')
            if m == 'cudagraphs' and isinstance(first, float): compile_s = 0.7 * first   # inductor's cache is warm by now
            self.run.stage(f'best_{m}', 5 + compile_s + 7 * t, lambda m=m: self.stage_best(m))
        self.summary()


def main(argv=None):
    args = parse_args(argv)
    Path(args.outdir).mkdir(parents=True, exist_ok=True)
    Bench(args).main()


if __name__ == '__main__': main()
