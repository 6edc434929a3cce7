"""The base trainer: device, precision, DDP, accumulation, clipping, schedule, checkpoint/resume, logging.

The trainer speaks of samples, whatever a track makes of them: image rows, token windows, prompt indexes. A
method's trainer supplies `compute_loss(batch) -> dict` (and optionally `after_step`); a track may hand over a
`preprocess` module that turns a batch of stored rows into model inputs on the device, and step hooks that act
around each step whatever the method. Everything else lives here once. Three rules make runs reproducible and
resumable bit for bit on the CPU:

- Data order: the epoch's permutation comes from `DistributedSampler` seeded by (seed, epoch). Rank r holds
  rows r, r + W, r + 2W, ... of each global micro-batch, so W processes see exactly the global batch one
  process would.
- Randomness inside a step (mask noise, augmentations) is drawn from a generator seeded by (seed, step)
  for the step's whole global batch; each process keeps the rows of its micro-batch (`Batch.rows`). So
  neither the process count nor gradient accumulation changes what the model sees.
- A checkpoint holds the unwrapped model, optimizer, scheduler, scaler, step, RNG states and the logged
  history, written atomically; a run whose fingerprint (params + data) matches resumes from it. Metrics are
  logged as means over every `log_every` steps, and a checkpoint also closes such a window, so no logged
  mean straddles a resume point.

Step hooks (`StepHook`) are how model state outside the method is kept, e.g. the text track's mixture-of-experts
balancer (`text.models.moe.ExpertBalancer`): its loss terms join each micro-batch's loss, and after each optimizer
step it moves the routing biases by the step's all-reduced load.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
import torch
from timm.optim import param_groups_weight_decay
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from pipeline_lib.core import dist
from pipeline_lib.core.checkpoints import CHECKPOINT_NAME, read_checkpoint
from pipeline_lib.core.config import OptimParams
from pipeline_lib.core.errors import ConfigError, NonFiniteLossError
from pipeline_lib.core.tracking import Tracker

C = TypeVar("C", bound=OptimParams)




@dataclass
class Batch:
    """This process's share of one micro-batch of an optimizer step.

    Attributes:
        inputs: this process's samples on the training device, as `Trainer.load_inputs` made them from the stored
            rows (the preprocess module's output, or the rows themselves).
        labels: (b,) int64 targets on the device, when the trainer was given labels; else None.
        rows: which rows of the step's global batch these are: draw per-sample randomness for `global_size`
            rows with `generator`, then keep `[rows]`.
        global_size: samples in the step's global batch (`batch_size`).
        generator: CPU generator seeded by (seed, index of the batch), identical on every process and micro-step
            (the batch index is the step unless a method takes several steps per batch).
        step: the optimizer step this micro-batch belongs to.
    """

    inputs: Tensor
    labels: Tensor | None
    rows: slice
    global_size: int
    generator: torch.Generator
    step: int


@dataclass
class FitResult:
    """What a finished `fit` reports."""

    steps: int
    history: list[dict[str, float]] = field(default_factory=list)
    samples_per_second: float = 0.0  # median over the logging windows, resumed or not
    tokens_per_second: float = 0.0  # the same, where the method counts tokens (`Trainer.count_tokens`)
    resumed_from: int = 0


class StepHook(Protocol):
    """Model state a trainer keeps around each step whatever the method (the text track's expert balancer)."""

    def loss_terms(self) -> dict[str, Tensor]:
        """Named scalars added to the micro-batch's loss (and logged); cleared by the call."""
        ...

    def after_step(self) -> dict[str, Tensor]:
        """Called after each optimizer step; returns metrics to log."""
        ...


def step_seed(seed: int, step: int) -> int:
    """A 63-bit seed for one optimizer step, the same on every process and after a resume."""
    return ((seed * 1_000_003) + step) % (2**63 - 1)


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warmup to 1, then half-cosine down to `min_ratio` (per optimizer step)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def fused_adamw(groups: list[dict[str, Any]]) -> bool | None:
    """True where PyTorch has a fused AdamW kernel for every parameter (floating point, on the CPU or CUDA): one
    kernel per step instead of a loop of small ones (3-4% of an MAE step on the CPU). None elsewhere (e.g. MPS,
    XLA), PyTorch's default."""
    params = [p for group in groups for p in group["params"]]
    return True if params and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params) else None


def check_batch_size(cfg: OptimParams, num_samples: int, samples: str = "training samples") -> None:
    """The base trainer's rules for `<section>.batch_size` against the data and the processes: each micro-step's
    global micro-batch splits evenly over the processes, and an epoch holds at least one whole batch.

    A stage calls this before its MLflow run, with the size of the split it trains on (`samples` names it).

    Raises:
        ConfigError: naming `<section>.batch_size`.
    """
    key, world = f"{cfg.section}.batch_size", dist.world_size()
    micro_global = cfg.batch_size // cfg.accumulation_steps
    if micro_global % world:
        raise ConfigError(
            f"{key}={cfg.batch_size}: {cfg.batch_size} / {cfg.section}.accumulation_steps={cfg.accumulation_steps} "
            f"= {micro_global} samples per micro-step must divide evenly over {world} processes "
            f"(accepted: multiples of {cfg.accumulation_steps * world})"
        )
    if cfg.batch_size > num_samples:
        raise ConfigError(f"{key}={cfg.batch_size}: is larger than the {num_samples} {samples} (accepted: at most "
                          f"{num_samples}; an epoch holds at least one whole batch)")


class Trainer(Generic[C]):
    """Runs the optimisation loop for a model whose loss a subclass defines.

    Args:
        model: the model to train (checkpoints and exports hold it unwrapped).
        cfg: the stage's training section.
        inputs: the stored samples, indexed by row (a memory map is fine: a batch copies only its rows).
        preprocess: a module that turns a batch of stored rows, on the device, into model inputs; None keeps the
            rows as they are.
        labels: (N,) targets, when the method has them.
        hooks: model state kept around each step whatever the method (`StepHook`).
    """

    stage = "train"
    unit = "samples"  # what a sample is, for the throughput metric `<unit>_per_second`

    def __init__(
        self,
        model: nn.Module,
        cfg: C,
        inputs: np.ndarray,
        preprocess: nn.Module | None = None,
        *,
        device: torch.device,
        seed: int,
        checkpoint_dir: Path,
        tracker: Tracker,
        fingerprint: str,
        labels: np.ndarray | None = None,
        hooks: Sequence[StepHook] = (),
    ) -> None:
        if labels is not None and len(labels) != len(inputs):
            raise ValueError(f"{len(labels)} labels for {len(inputs)} samples")
        self.cfg, self.inputs, self.labels, self.device, self.seed = cfg, inputs, labels, device, seed
        self.tracker, self.fingerprint = tracker, fingerprint
        self.checkpoint_path = Path(checkpoint_dir) / CHECKPOINT_NAME
        self.world, self.rank = dist.world_size(), dist.rank()
        check_batch_size(cfg, len(inputs), f"training {self.unit}")
        micro_global = cfg.batch_size // cfg.accumulation_steps
        self.micro_global, self.micro_local = micro_global, micro_global // self.world
        self.steps_per_epoch = len(inputs) // cfg.batch_size
        updates = self.updates_per_batch()
        self.total_steps = cfg.epochs * self.steps_per_epoch * updates
        self.warmup_steps = round(cfg.warmup_epochs * self.steps_per_epoch * updates)

        self.model = model.to(device)  # unwrapped: what checkpoints and exports hold
        self.hooks = list(hooks)
        self.window_tokens = 0  # tokens counted in the current logging window (`count_tokens`)
        self.lr = cfg.learning_rate
        groups = self.param_groups()
        for group in groups:  # layer-wise lr decay: a group may scale the lr (timm's `lr_scale`)
            group["lr"] = self.lr * group.get("lr_scale", 1.0)
        self.optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=(0.9, cfg.adam_beta2),
                                           fused=fused_adamw(groups))
        min_ratio = cfg.min_lr / getattr(cfg, cfg.lr_key)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_factor(s, warmup_steps=self.warmup_steps, total_steps=self.total_steps, min_ratio=min_ratio),
        )
        self.bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
        self.scaler = torch.amp.GradScaler(device.type, enabled=False)  # bf16 needs no loss scaling
        self.forward_model = self._wrap(self.model)
        self.preprocess = None if preprocess is None else preprocess.to(device)
        self.history: list[dict[str, float]] = []
        self.stopped_at: int | None = None  # the step `should_stop` ended training at

    # ------------------------------------------------------------------------------------ for subclasses

    def compute_loss(self, batch: Batch) -> dict[str, Tensor]:
        """Return a dict with a scalar "loss" (and any other scalars to log) for this process's batch."""
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        """Called after each optimizer step (e.g. a momentum-encoder update)."""

    def count_tokens(self, batch: Batch) -> int:
        """Tokens in this process's micro-batch, for `tokens_per_second`; 0 (the default) logs no token rate."""
        return 0

    def should_stop(self, step: int) -> bool:
        """Called after optimizer step `step` (0-based) and `after_step`: True ends training there (early stopping;
        e.g. SFT at a target accuracy). The decision is saved with the checkpoint, so a resume does not train on.
        Every process must return the same answer."""
        return False

    def updates_per_batch(self) -> int:
        """Optimizer steps taken on each batch (GRPO's `num_iterations`); the schedule counts them all."""
        return 1

    def extra_state(self) -> dict[str, Any]:
        """Method state a checkpoint must carry beyond model and optimizer (tensors and plain values)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what `extra_state` returned."""

    def train_mode(self) -> None:
        """Put the model in training mode before each step (a linear probe keeps its encoder in eval mode)."""
        self.model.train()

    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: weight decay on weights, none on biases, norms and the model's `no_weight_decay`.

        A group may carry `lr_scale`, a factor on the lr (layer-wise decay); only parameters that require
        gradients belong in a group.
        """
        skip = self.model.no_weight_decay() if hasattr(self.model, "no_weight_decay") else ()
        return param_groups_weight_decay(self.model, self.cfg.weight_decay, no_weight_decay_list=skip)

    # ------------------------------------------------------------------------------------------ the loop

    def fit(self) -> FitResult:
        """Train from the last checkpoint (or from scratch) to `epochs`, or until `should_stop`; checkpoint on the
        way and at the end."""
        start = self.load_checkpoint()
        end = self.total_steps if self.stopped_at is None else self.stopped_at
        bar = tqdm(total=self.total_steps, initial=start, desc=self.stage, unit="step", dynamic_ncols=True,
                   mininterval=1.0, disable=not dist.is_main())
        window: dict[str, Tensor] = {}
        window_start, window_steps, self.window_tokens = time.perf_counter(), 0, 0
        for step in range(start, end):
            metrics = self.train_step(step)
            for name, value in metrics.items():
                window[name] = window.get(name, 0.0) + value
            window_steps += 1
            if self.should_stop(step):
                self.stopped_at = end = step + 1
            # A checkpoint closes the logging window too, so a run resumed from it logs the same averages.
            checkpoint_due = (step + 1) % self.cfg.checkpoint_every == 0 or step + 1 == end
            if (step + 1) % self.cfg.log_every == 0 or checkpoint_due:
                elapsed = time.perf_counter() - window_start
                logged = {name: dist.all_reduce_mean(value / window_steps).item() for name, value in window.items()}
                rate = f"{self.unit}_per_second"
                logged.update({"lr": max(self.scheduler.get_last_lr()),
                               rate: window_steps * self.cfg.batch_size / elapsed, "step_time": elapsed / window_steps})
                if self.window_tokens:  # every process's tokens: this one's times the process count
                    logged["tokens_per_second"] = self.window_tokens * self.world / elapsed
                self.log(step + 1, logged)
                bar.set_postfix(loss=f"{logged['loss']:.4f}", rate=f"{logged[rate]:.0f}/s")
                window, window_start, window_steps, self.window_tokens = {}, time.perf_counter(), 0, 0
            bar.update(1)
            if checkpoint_due:
                self.save_checkpoint(step + 1)
            if step + 1 == end:
                break
        bar.close()
        self.tracker.flush()
        return FitResult(steps=end, history=self.history, samples_per_second=self.median_rate(
            f"{self.unit}_per_second"), tokens_per_second=self.median_rate("tokens_per_second"), resumed_from=start)

    def median_rate(self, key: str) -> float:
        """The median of a logged rate over the whole run, resumed or not (0 when never logged)."""
        rates = [h[key] for h in self.history if key in h]
        return float(np.median(rates)) if rates else 0.0

    def train_step(self, step: int) -> dict[str, Tensor]:
        """One optimizer step over `accumulation_steps` micro-batches; returns detached metrics."""
        self.train_mode()
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, Tensor] = {}
        accumulation = self.cfg.accumulation_steps
        for micro, batch in enumerate(self.micro_batches(step)):
            sync = micro == accumulation - 1 or not isinstance(self.forward_model, DistributedDataParallel)
            with (nullcontext() if sync else self.forward_model.no_sync()), self.autocast():
                out = self.compute_loss(batch)
                for hook in self.hooks:  # e.g. mixture-of-experts layers' sequence-wise balance loss
                    terms = hook.loss_terms()
                    if terms:
                        out = {**out, "loss": out["loss"] + sum(terms.values()), **terms}
            self.window_tokens += self.count_tokens(batch)
            (out["loss"] / accumulation).backward()
            for name, value in out.items():
                totals[name] = totals.get(name, 0.0) + value.detach().float() / accumulation
        self.check_finite(totals["loss"], step)  # once per step: a NaN in any micro-batch makes the sum NaN
        max_norm = self.cfg.clip_grad if self.cfg.clip_grad is not None else math.inf
        params = [p for p in self.model.parameters() if p.grad is not None]
        totals["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, max_norm).detach().float()
        self.optimizer.step()
        self.scheduler.step()
        for hook in self.hooks:  # e.g. mixture-of-experts layers: bias step from the step's whole load
            totals.update(hook.after_step())
        self.after_step(step)
        return totals

    def micro_batches(self, step: int) -> Iterator[Batch]:
        """This process's rows of each micro-batch of global step `step`, on the device."""
        data_step = step // self.updates_per_batch()  # the batch this optimizer step trains on
        epoch, in_epoch = divmod(data_step, self.steps_per_epoch)
        order = self.epoch_order(epoch)
        for micro in range(self.cfg.accumulation_steps):
            start = (in_epoch * self.cfg.accumulation_steps + micro) * self.micro_local
            index = order[start : start + self.micro_local]
            rows = slice(micro * self.micro_global + self.rank, (micro + 1) * self.micro_global, self.world)
            generator = torch.Generator().manual_seed(step_seed(self.seed, data_step))
            labels = None if self.labels is None else torch.from_numpy(self.labels[index]).to(self.device)
            yield Batch(self.load_inputs(index), labels, rows, self.cfg.batch_size, generator, step)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """This process's sample order for `epoch` (cached): the sampler's shard of a seeded permutation."""
        if getattr(self, "_order_epoch", None) != epoch:
            sampler = DistributedSampler(range(len(self.inputs)), num_replicas=self.world, rank=self.rank,
                                         shuffle=True, seed=self.seed, drop_last=True)
            sampler.set_epoch(epoch)
            self._order, self._order_epoch = np.fromiter(iter(sampler), dtype=np.int64), epoch
        return self._order

    def load_inputs(self, index: np.ndarray) -> Tensor:
        """Stored rows `index` -> this micro-batch's inputs on the device (through `preprocess`, if any)."""
        rows = torch.from_numpy(np.asarray(self.inputs[index]))  # fancy indexing copies the rows out of a memory map
        rows = rows.to(self.device, non_blocking=True)
        return rows if self.preprocess is None else self.preprocess(rows)

    # --------------------------------------------------------------------------------- runtime plumbing

    def autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def _wrap(self, model: nn.Module) -> nn.Module:
        """DDP across processes, then `torch.compile` on CUDA when asked; checkpoints keep `self.model`."""
        wrapped: nn.Module = model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            wrapped = DistributedDataParallel(model, device_ids=ids)
        if self.cfg.compile and self.device.type == "cuda":
            wrapped = torch.compile(wrapped)
        return wrapped

    def check_finite(self, loss: Tensor, step: int) -> None:
        """Stop every process together if any saw a non-finite loss, naming the step and the checkpoint."""
        finite = dist.all_reduce_min(torch.isfinite(loss.detach()).float().reshape(1))
        if finite.item() < 1:
            saved = torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)["step"] if (
                self.checkpoint_path.is_file()) else None
            where = f"{self.checkpoint_path} (step {saved}) is kept" if saved is not None else "no checkpoint yet"
            raise NonFiniteLossError(
                f"{self.stage}: loss is {loss.item()} at step {step + 1}; stopped before updating the weights. "
                f"Last good checkpoint: {where}. Lower {self.cfg.section}.{self.cfg.lr_key} or set "
                f"{self.cfg.section}.clip_grad."
            )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.history.append({"step": step, **metrics})
        if dist.is_main():
            self.tracker.log_metrics(metrics, step=step)

    # ------------------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self, step: int) -> None:
        """Write the full training state atomically (rank 0), so a kill at any moment leaves a loadable file."""
        if dist.is_main():
            state = {
                "step": step,
                "fingerprint": self.fingerprint,
                "run_id": self.tracker.run_id,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "history": self.history,
                "stopped_at": self.stopped_at,
                "extra": self.extra_state(),
                "rng": {
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                    "numpy": _numpy_state(),
                    "python": list(random.getstate()[1]),
                },
            }
            self.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.checkpoint_path.with_suffix(f".tmp-{os.getpid()}")
            torch.save(state, partial)
            os.replace(partial, self.checkpoint_path)
        dist.barrier()

    def load_checkpoint(self) -> int:
        """Restore a matching checkpoint and return its step (0 when starting fresh)."""
        state = read_checkpoint(self.checkpoint_path, self.fingerprint)
        if state is None:
            return 0
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.history = list(state["history"])
        self.stopped_at = state.get("stopped_at")
        self.load_extra_state(state.get("extra", {}))
        torch.set_rng_state(state["rng"]["torch"].cpu())
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["rng"]["cuda"]])
        np.random.set_state(("MT19937", np.array(state["rng"]["numpy"][0], dtype=np.uint32),
                             *state["rng"]["numpy"][1:]))
        random.setstate((3, tuple(state["rng"]["python"]), None))
        if dist.is_main():
            print(f"{self.stage}: resuming from {self.checkpoint_path} at step {state['step']}/{self.total_steps}")
        return int(state["step"])






def _numpy_state() -> list[Any]:
    _, keys, position, has_gauss, cached = np.random.get_state()
    return [keys.tolist(), int(position), int(has_gauss), float(cached)]
