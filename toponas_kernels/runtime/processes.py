"""Processes: data parallelism under ``torchrun`` (``Processes``) and measurements in a fresh
process (``run_fresh``), whose peak memory no earlier work in this process has touched."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import torch

from .errors import ConfigError


class Processes:
    """Data parallelism under ``torchrun``: each rank reads its share of both data halves, the
    gradients of the weights and of the architecture parameters are averaged over the ranks
    before every optimizer step, and every random draw that shapes the architecture (Gumbel
    noise, ROME's edges, masks) comes from the same seeded generators on every rank, so all ranks
    hold the same parameters and derive the same genotype. Rank 0 alone writes files and shows
    progress. Without torchrun: one process, nothing to do."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def check_batch(self, batch_size: int) -> None:
        """The global batch must split evenly over the processes."""
        if self.world > 1 and batch_size % self.world:
            raise ConfigError(f"--batch-size {batch_size}: must divide by the {self.world} processes (it is the global batch)")

    def share(self, batch_size: int, n: int, steps_per_epoch: int | None = None,
              drop_single: bool = False) -> tuple[int, int, bool]:
        """(this process's batch, steps per epoch, drop the last batch) for ``n`` examples: every
        rank runs as many steps as the smallest share needs, at most ``steps_per_epoch``;
        ``drop_single``: a last batch of one example is dropped (BatchNorm cannot train on it)."""
        batch = batch_size // self.world
        share = n // self.world
        drop_last = drop_single and share % batch == 1
        steps = share // batch if drop_last else math.ceil(share / batch)
        return batch, (min(steps, steps_per_epoch) if steps_per_epoch else steps), drop_last

    def start(self, device: torch.device) -> torch.device:
        if self.world == 1:
            return device
        import torch.distributed as dist

        if device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return device

    def mean_grads(self, params) -> None:
        """Average ``.grad`` over the ranks (one flat all-reduce)."""
        import torch.distributed as dist

        grads = [p.grad for p in params if p.grad is not None]
        # the ranks must have run the same sub-network (same samples, same masks): same set of
        # parameters with a gradient, or the all-reduce would mix different tensors
        present = torch.tensor([i for i, p in enumerate(params) if p.grad is not None] or [-1], dtype=torch.float64)
        key = torch.stack([present.sum(), (present * present).sum(), torch.tensor(float(len(grads)), dtype=torch.float64)])
        hi, lo = key.clone(), key.clone()
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        if not torch.equal(hi, lo):
            raise RuntimeError("data parallel: the ranks ran different sub-networks (their random draws differ); "
                               "start every rank with the same --seed")
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def sum(self, sums: dict) -> dict:
        """Epoch sums added over the ranks (for the log)."""
        if self.world == 1 or not sums:
            return sums
        import torch.distributed as dist

        keys = sorted(sums)
        flat = torch.stack([sums[k].double() for k in keys])
        dist.all_reduce(flat)
        return dict(zip(keys, flat))

    def broadcast_buffers(self, module) -> None:
        """Rank 0's buffers (BN running statistics) to every rank."""
        if self.world == 1:
            return
        import torch.distributed as dist

        for b in module.buffers():
            dist.broadcast(b, src=0)

    def broadcast(self, obj):
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def agree(self, params) -> bool:
        """Whether every rank holds the same values of ``params`` as the others."""
        if self.world == 1:
            return True
        import torch.distributed as dist

        flat = torch.cat([p.detach().reshape(-1).double() for p in params])
        hi, lo = flat.clone(), flat.clone()
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        return bool(torch.equal(hi, lo))


class FreshProcessError(RuntimeError):
    """A measurement in a fresh process failed: ``last_line`` is the last line of its stderr,
    ``stderr`` the tail of it."""

    def __init__(self, what: str, stderr: str):
        self.stderr = stderr[-4000:]
        self.last_line = (stderr.strip().splitlines() or ["no output"])[-1]
        super().__init__(f"{what} failed: {self.last_line}")


def run_fresh(args: list[str], *, what: str = "a measurement in a fresh process") -> dict:
    """Run ``python *args`` in a fresh process (same environment, unbuffered) and return the JSON
    object its stdout ends with. A failure raises ``FreshProcessError``."""
    proc = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        raise FreshProcessError(what, proc.stderr)
    lines = proc.stdout.strip().splitlines()
    if not lines:
        raise FreshProcessError(what, proc.stderr or "it printed nothing")
    return json.loads(lines[-1])


def call_fresh(target: str, payload, *, what: str = "a measurement in a fresh process") -> dict:
    """``module:function`` called with ``payload`` (JSON-able) in a fresh process; returns what it
    returned (a JSON-able dict). A failure raises ``FreshProcessError``."""
    module, function = target.split(":")
    code = (f"import json, sys; from {module} import {function} as f; "
            "print(json.dumps(f(json.loads(sys.argv[1]))))")
    return run_fresh(["-c", code, json.dumps(payload)], what=what)
