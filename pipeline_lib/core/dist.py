"""Distributed helpers: one code path for a single process and for `torchrun --nproc_per_node N`.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them everything here degrades to a single process.
Backend: NCCL when the device is CUDA, gloo otherwise (CPU processes on one machine).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Only rank 0 prints, logs and writes files."""
    return rank() == 0


def resolve_device(preference: str) -> torch.device:
    """The training device: `auto` picks this process's GPU, then Apple MPS, then the CPU."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("device='cuda': CUDA is not available on this machine; use device: auto or cpu")
        return torch.device("cuda", local_rank)
    if preference == "mps" or (preference == "auto" and torch.backends.mps.is_available()):
        if not torch.backends.mps.is_available():
            raise ValueError("device='mps': Apple MPS is not available on this machine; use device: auto or cpu")
        return torch.device("mps")
    return torch.device("cpu")


def init_distributed(device: torch.device) -> None:
    """Join the process group torchrun describes (no-op for a single process or when already joined)."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1 or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def _all_reduce(tensor: torch.Tensor, op: dist.ReduceOp) -> torch.Tensor:
    """`tensor` reduced with `op` over all processes (a copy; the input is left alone)."""
    out = tensor.clone()
    if world_size() > 1:
        dist.all_reduce(out, op=op)
    return out


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of `tensor` over all processes (a copy; the input is left alone)."""
    return _all_reduce(tensor, dist.ReduceOp.SUM) / world_size()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of `tensor` over all processes (a copy; the input is left alone)."""
    return _all_reduce(tensor, dist.ReduceOp.SUM)


def all_reduce_min(tensor: torch.Tensor) -> torch.Tensor:
    """Minimum of `tensor` over all processes (a copy; the input is left alone)."""
    return _all_reduce(tensor, dist.ReduceOp.MIN)
