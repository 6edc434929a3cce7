"""The mixture of experts' load on two processes: all-reduced, so every process moves the bias alike.

Apart from the other MoE tests so that the spawned processes import only torch and the model code.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from pipeline_lib.text.config import TextMoEParams
from pipeline_lib.text.models.moe import ExpertBalancer, MoE
from pipeline_lib.text.models.transformer import SwiGLU

D, WORLD = 16, 2


def _inputs() -> torch.Tensor:
    """Rank 0's rows are positive, rank 1's negative."""
    x = torch.randn(WORLD * 3, 5, D, generator=torch.Generator().manual_seed(3)).abs()
    return torch.cat([x[:3], -x[3:]])


def _skewed() -> MoE:
    torch.manual_seed(2)
    moe = MoE(D, TextMoEParams(enabled=True, routed_experts=8, top_k=2, bias_update_speed=0.01), SwiGLU, hidden=8,
              dropout=0.0)
    with torch.no_grad():  # positive tokens crowd expert 0, negative ones expert 1: each rank overloads its own
        moe.router.weight[0] += 1.0
        moe.router.weight[1] -= 1.0
    return moe


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        moe = _skewed()
        moe(_inputs()[rank * 3 : (rank + 1) * 3])  # this process's share of the batch
        local = moe.load.clone()
        metrics = ExpertBalancer(moe).after_step()
        torch.save({"bias": moe.expert_bias.clone(), "local": local, "violation": metrics["moe.max_violation"]},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        torch_dist.destroy_process_group()


def test_two_processes_move_the_bias_by_the_global_load(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    single = _skewed()
    single(_inputs())  # one process, the whole batch
    total = single.load.clone()
    violation = ExpertBalancer(single).after_step()["moe.max_violation"]
    torch.testing.assert_close(ranks[0]["local"] + ranks[1]["local"], total)
    for rank in ranks:
        torch.testing.assert_close(rank["bias"], single.expert_bias)
        torch.testing.assert_close(rank["violation"], violation)
    # The local loads alone would have moved the bias differently on some rank.
    local_steps = [0.01 * torch.sign(r["local"].mean() - r["local"]) for r in ranks]
    assert any(not torch.equal(step, single.expert_bias) for step in local_steps)
