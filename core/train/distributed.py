"""Data-parallel training under ``torchrun``: who this process is, joining the group, and checking the ranks agree
(torchvision's ``references/classification/utils.py`` keeps the same helpers apart from the training loop)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from core import checkpoint
from core.inference import resolve_device


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


SINGLE_PROCESS = Distributed()  # one process, rank 0: the default of every caller that is not under torchrun


def setup_distributed(device_name: str) -> Distributed:
    """Under ``torchrun`` (WORLD_SIZE > 1) join the process group: NCCL on GPUs, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return SINGLE_PROCESS
    backend = "nccl" if resolve_device(device_name).type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return Distributed(dist.get_rank(), world_size, int(os.environ.get("LOCAL_RANK", "0")))


def check_ranks_agree(model: nn.Module) -> None:
    """DDP must leave every rank with the same weights; a fingerprint of all parameters is compared across ranks."""
    fingerprint = torch.stack([p.detach().double().sum() for p in checkpoint._unwrap(model).parameters()]).sum()
    gathered = [torch.zeros_like(fingerprint) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, fingerprint)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise RuntimeError(f"ranks disagree after training: {[g.item() for g in gathered]}")
    if dist.get_rank() == 0:
        print(f"all {len(gathered)} ranks hold identical weights (fingerprint {gathered[0].item():.6f})")
