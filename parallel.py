"""Data parallelism for train.py under PyTorch's own launcher, torchrun: one loop, the same algorithm on R ranks.

    torchrun --nproc_per_node 8 train.py --model stabilityai/stable-diffusion-3.5-medium --reward pickscore
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 train.py ...

Without torchrun (no RANK in the environment) everything here is the identity and train.py runs as one process.
What each rank does alone, and what is global (choice 17; the method of METHOD.md §3-5 unchanged):
- Rank r samples whole prompt groups, r G/R .. (r+1) G/R - 1 of the iteration's G (--prompts-per-step is the
  global count), so a group's normalisation needs nothing from other ranks and ranks never share a prompt. Every
  group's noise comes from its own generator seeded by (seed, iteration, group) (choice 7), so R ranks
  sample exactly what one process samples.
- Rollouts, x0 estimates, decoding and rewards stay local. The rewards (B x (T+1) floats) are all-gathered and every
  rank computes the whole batch's advantages, keeping its rows: --global-std and the logged means are global.
- The LoRA's gradients are all-reduced (averaged) once per optimizer step: about 19M float32 numbers for SD3.5 at
  rank 32. An explicit all-reduce rather than DistributedDataParallel because one optimizer step accumulates many
  backward passes (trained steps x micro-batches) and only the LoRA trains: one collective at the step reads
  plainly, where DDP would need no_sync() around all but the last backward.
- The held-out evaluation is sharded (contiguous slices of the prompt list, noises drawn for the whole list) and
  its rewards gathered. Only rank 0 writes (checkpoints, the LoRA, metrics, plots) and shows the progress bar.
- A rank that raises exits non-zero; torchrun then stops the other ranks. Collectives time out after TIMEOUT.
NCCL on CUDA (one GPU a rank, LOCAL_RANK), gloo on the CPU.
"""
import os
from datetime import timedelta

import torch
import torch.distributed as dist

TIMEOUT = timedelta(minutes=10)  # a collective waiting longer than this on a rank that died fails


def setup():
    """(rank, world_size, device) of this process; joins torchrun's process group when launched by it."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=TIMEOUT, device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=TIMEOUT)
    return dist.get_rank(), dist.get_world_size(), device


def active():
    return dist.is_available() and dist.is_initialized()


def rank():
    return dist.get_rank() if active() else 0


def world_size():
    return dist.get_world_size() if active() else 1


def shard(n):
    """This rank's contiguous slice of n items; the last ranks' are shorter when n does not divide."""
    size = -(-n // world_size())
    return slice(min(n, rank() * size), min(n, (rank() + 1) * size))


def _to_comm(x):
    """NCCL moves GPU tensors only; gloo, CPU ones."""
    return x.cuda() if dist.get_backend() == "nccl" else x.cpu()


def gather(x):
    """The rank-ordered concatenation (dim 0) of every rank's tensor x, of one shape on every rank."""
    if not active():
        return x
    x = _to_comm(x.contiguous())
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts).cpu()


def gather_uneven(x):
    """gather for tensors whose first dimension differs between ranks (the held-out shards)."""
    if not active():
        return x
    parts = [None] * world_size()
    dist.all_gather_object(parts, x.cpu())
    return torch.cat(parts)


def average_gradients(params):
    """Average the .grad of params over ranks: one all-reduce of one flat buffer."""
    if not active():
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def all_true(flag):
    """Whether flag holds on every rank, so that all ranks take or skip an optimizer step together."""
    if not active():
        return flag
    t = _to_comm(torch.tensor([1.0 if flag else 0.0]))
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def mean_metrics(m):
    """Every float metric averaged over ranks (per-rank stats of equal-sized shards)."""
    if not active():
        return m
    keys = sorted(k for k, v in m.items() if isinstance(v, float))
    t = _to_comm(torch.tensor([m[k] for k in keys], dtype=torch.float64))
    dist.all_reduce(t)
    return m | dict(zip(keys, (t / world_size()).tolist()))


def finish():
    if active():
        dist.destroy_process_group()
