"""Data-parallel scaling of minisd's Learner: DDPM training samples/s of the MNIST U-Net on 1 process vs N (torchrun).

    python bench/ddp.py                                                            # 1 process, 1 thread
    python -m torch.distributed.run --standalone --nproc_per_node 2 bench/ddp.py   # 2 processes, 1 thread each

The batch is per process (`--bs`, default 32), so N processes train N times as many samples per step. Process 0
prints samples/s over `--steps` steps after `--warmup`, the wall seconds per step and its own CPU seconds per step.
"""
import argparse, time
import torch
from minisd.core import seed_everything
from minisd.data import get_dls
from minisd.ddpm import ddpm_step
from minisd.learner import Learner, Callback, CancelFitException, is_main_process, _world_size
from minisd.schedulers import DDPMScheduler
from minisd.unet import UNet, UNetConfig


class Clock(Callback):
    "Wall and CPU time of steps `warmup+1 .. warmup+steps`, then stop."
    def __init__(self, warmup, steps): self.warmup, self.steps = warmup, steps
    def after_step(self, learn):
        if learn.n_steps == self.warmup: self.t0, self.c0 = time.perf_counter(), time.process_time()
        if learn.n_steps == self.warmup + self.steps:
            self.wall, self.cpu = time.perf_counter() - self.t0, time.process_time() - self.c0
            raise CancelFitException


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--bs', type=int, default=32, help='batch size per process')
    p.add_argument('--steps', type=int, default=20)
    p.add_argument('--warmup', type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(1)
    world = _world_size()
    seed_everything(0)
    x = torch.rand((a.warmup + a.steps) * a.bs * world, 1, 32, 32) * 2 - 1
    clock = Clock(a.warmup, a.steps)
    Learner(UNet(UNetConfig.mnist()), get_dls((x,), bs=a.bs), step=ddpm_step(DDPMScheduler()), device='cpu',
            progress=False).fit(1, cbs=[clock], valid=False, one_cycle=False)
    if is_main_process():
        print(f"{world} process(es) x {torch.get_num_threads()} thread, batch {a.bs} per process: "
              f"{a.steps * a.bs * world / clock.wall:.1f} samples/s ({clock.wall / a.steps:.3f} s/step wall, "
              f"{clock.cpu / a.steps:.3f} s/step CPU on process 0)")


if __name__ == '__main__': main()
