"""Peak memory of minisd's memory savers on the CPU, one fresh process per configuration (peak RSS, `resource.getrusage`).

Each configuration builds its model (random weights, full Stable Diffusion 1.5 size unless noted), records the RSS
after building, runs the workload once, and reports the peak RSS of the process, the peak above the after-build RSS
(what the workload itself needed), wall and CPU seconds.

  vae-decode-1024     SD VAE decode of 1x4x128x128 latents (a 1024x1024 image): plain vs `vae.enable_tiling()`
  vae-decode-batch4   SD VAE decode of 4x4x64x64 latents (four 512x512 images): plain vs `vae.enable_slicing()`
  unet-step           SD 1.5 U-Net step, 2x4x64x64 latents (CFG batch), 2x77x768 text: default SDPA processor,
                      the explicit `AttnProcessor`, `set_attention_slice('auto')` and `('max')`
  unet-train-mnist    MNIST text U-Net training step (forward+backward), batch 256: plain vs gradient checkpointing

python bench/memory.py                      # all, one subprocess each
python bench/memory.py --only vae-decode-1024
"""
from __future__ import annotations
import argparse, json, os, resource, subprocess, sys, time
import torch

CASES = {
    'vae-decode-1024': ['plain', 'tiling'],
    'vae-decode-batch4': ['plain', 'slicing'],
    'unet-step': ['sdpa', 'AttnProcessor', 'slice-auto', 'slice-max'],
    'unet-train-mnist': ['plain', 'checkpointing'],
}


def rss_mib() -> float:
    "Current RSS of this process in MiB (Linux /proc)."
    with open('/proc/self/statm') as f: return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20


def peak_rss_mib() -> float: return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux


def run_one(case:str, variant:str) -> dict:
    from minisd.unet import UNet, UNetConfig, AttnProcessor
    from minisd.vae import AutoencoderKL, VAEConfig
    torch.manual_seed(0)
    if case.startswith('vae'):
        vae = AutoencoderKL(VAEConfig.sd15()).eval().requires_grad_(False)
        z = torch.randn(1, 4, 128, 128) if case == 'vae-decode-1024' else torch.randn(4, 4, 64, 64)
        if variant == 'tiling': vae.enable_tiling()
        if variant == 'slicing': vae.enable_slicing()
        work = lambda: vae.decode(z)
    elif case == 'unet-step':
        unet = UNet(UNetConfig.sd15()).eval().requires_grad_(False)
        x, ehs = torch.randn(2, 4, 64, 64), torch.randn(2, 77, 768)
        if variant == 'AttnProcessor': unet.set_attn_processor(AttnProcessor())
        if variant.startswith('slice-'): unet.set_attention_slice(variant.split('-')[1])
        work = lambda: unet(x, 500, ehs)
    else:
        unet = UNet(UNetConfig.mnist(cross_attention_dim=64)).train()
        x, ehs = torch.randn(256, 1, 32, 32), torch.randn(256, 77, 64)
        if variant == 'checkpointing': unet.enable_gradient_checkpointing()
        def work():
            unet(x, 500, ehs).square().mean().backward()
    base, peak_before = rss_mib(), peak_rss_mib()
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.inference_mode(case != 'unet-train-mnist'): work()
    return dict(case=case, variant=variant, rss_after_build_mib=round(base), peak_before_mib=round(peak_before), peak_rss_mib=round(peak_rss_mib()),
                workload_peak_mib=round(peak_rss_mib() - base), seconds=round(time.perf_counter() - t0, 1),
                cpu_seconds=round(time.process_time() - c0, 1))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split('\n', 1)[1])
    p.add_argument('--only', default=None, help=f"one of {list(CASES)}")
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--one', nargs=2, metavar=('CASE', 'VARIANT'), help=argparse.SUPPRESS)   # internal: run one configuration
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(run_one(*args.one)))
        return
    cases = {args.only: CASES[args.only]} if args.only else CASES
    print(f"torch {torch.__version__}; threads {args.threads}; load average {os.getloadavg()[0]:.1f}")
    print("| case | variant | peak RSS MiB | after build MiB (peak before run) | workload peak MiB | wall s | CPU s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for case, variants in cases.items():
        for v in variants:
            out = subprocess.run([sys.executable, __file__, '--threads', str(args.threads), '--one', case, v],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {case} | {v} | {r['peak_rss_mib']} | {r['rss_after_build_mib']} ({r['peak_before_mib']}) | {r['workload_peak_mib']} | "
                  f"{r['seconds']} | {r['cpu_seconds']} |", flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == '__main__': main()
