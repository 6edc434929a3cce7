"""Language-model pretraining of the text track: one transformer, trained as `ar` or `mdm` by the base trainer.

`ar` is next-token cross-entropy on a causal model; `mdm` is LLaDA's masked diffusion (Nie et al. 2025) on a
bidirectional model with a MASK id outside the vocabulary. Everything else (device, bf16, accumulation,
clipping, checkpoint/resume, DDP, logging cadence) is the base trainer's. The training tokens are cut into
windows of `seq_len + 1` ids (each window's last id is the next one's first); an epoch is one pass over them.

A trained model is a folder: `model.safetensors`, `config.json` (architecture, objective) and the
`tokenizer.json` of the data it was trained on, so it generates text without the prepared data.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from pipeline_lib import dist
from pipeline_lib.config import Params, flatten, params_hash
from pipeline_lib.losses.lm import ar_loss, mdm_corrupt, mdm_loss
from pipeline_lib.models.transformer import TransformerLM
from pipeline_lib.outputs import staged_dir
from pipeline_lib.text.corpus import read_text_meta, read_tokens
from pipeline_lib.text.tokenizer import Tokenizer, load_tokenizer
from pipeline_lib.tracking import Tracker, write_json_atomic, write_run_record
from pipeline_lib.trainers.base import Batch, Trainer, code_digest

WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE = "model.safetensors", "config.json", "tokenizer.json"
OBJECTIVES = ("ar", "mdm")


def token_windows(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """Flat ids -> (N, seq_len + 1) windows starting every `seq_len` ids: a view, nothing is copied."""
    count = (len(tokens) - 1) // seq_len
    if count < 1:
        raise ValueError(f"{len(tokens)} tokens are too few for one window of text_model.seq_len={seq_len} + 1")
    return np.lib.stride_tricks.sliding_window_view(tokens[: count * seq_len + 1], seq_len + 1)[::seq_len]


def build_lm(vocab_size: int, params: Params, objective: str) -> TransformerLM:
    """The transformer `text_model` describes: causal for `ar`, bidirectional with a MASK id for `mdm`."""
    cfg = params.text_model
    return TransformerLM(vocab_size, d_model=cfg.d_model, n_layer=cfg.n_layer, n_head=cfg.n_head,
                         max_len=cfg.seq_len, causal=objective == "ar", mask_token=objective == "mdm",
                         dropout=cfg.dropout)


class LMTrainer(Trainer):
    """The base trainer on token windows: `Batch.images` holds (b, seq_len + 1) int64 ids."""

    stage = "text_pretrain"

    def __init__(self, *args: Any, objective: str, mdm_eps: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.objective, self.mdm_eps = objective, mdm_eps

    def load_images(self, index: np.ndarray) -> Tensor:
        return torch.from_numpy(self.images[index].astype(np.int64)).to(self.device, non_blocking=True)

    def compute_loss(self, batch: Batch) -> dict[str, Tensor]:
        ids = batch.images  # (b, L + 1)
        if self.objective == "ar":
            return {"loss": ar_loss(self.forward_model(ids[:, :-1]), ids[:, 1:])}
        clean = ids[:, :-1]  # (b, L)
        mask_id = self.model.mask_id
        # Masks are drawn for the step's whole global batch, then this process keeps its rows (the base
        # trainer's rule), so N processes mask exactly what one process would.
        _, masked, p = mdm_corrupt(torch.zeros(batch.global_size, clean.shape[1], dtype=torch.long),
                                   mask_id=mask_id, eps=self.mdm_eps, generator=batch.generator)
        masked, p = masked[batch.rows].to(self.device), p[batch.rows].to(self.device)
        logits = self.forward_model(clean.masked_fill(masked, mask_id))
        return {"loss": mdm_loss(logits, clean, masked, p), "mask_rate": masked.float().mean()}


@dataclass(frozen=True)
class LMPaths:
    """Where the text pretrain stage reads and writes."""

    data: Path
    out: Path
    metrics: Path
    plots: Path
    checkpoints: Path


def logged_params(params: Params, objective: str) -> dict[str, Any]:
    """The params a text pretrain run uses, flat and dotted."""
    return {"seed": params.seed, "text_pretrain.objective": objective, **flatten(params.text_model, "text_model."),
            **flatten(params.text_pretrain, "text_pretrain.")}


def fingerprint(params: Params, paths: LMPaths, objective: str) -> str:
    """Identifies a resumable run: params, the training tokens and the library code."""
    meta = read_text_meta(paths.data)
    return params_hash({**logged_params(params, objective), "data": meta["sha256"]["train.bin"],
                        "code": code_digest()})


def run_text_pretrain(params: Params, paths: LMPaths, objective: str, tracker: Tracker,
                      device: torch.device) -> dict[str, Any]:
    """Train the language model (resuming a matching checkpoint); rank 0 writes the model, metrics and curve."""
    meta = read_text_meta(paths.data)
    windows = token_windows(read_tokens(paths.data, "train"), params.text_model.seq_len)
    torch.manual_seed(params.seed)  # identical initial weights in every run and on every process
    model = build_lm(meta["vocab_size"], params, objective)
    trainer = LMTrainer(model, params.text_pretrain, windows, nn.Identity(), objective=objective,
                        mdm_eps=params.text_pretrain.mdm_eps, device=device, seed=params.seed,
                        checkpoint_dir=paths.checkpoints, tracker=tracker,
                        fingerprint=fingerprint(params, paths, objective))
    tokens_per_step = params.text_pretrain.batch_size * params.text_model.seq_len
    if dist.is_main():
        print(f"text_pretrain: {objective} on {len(windows)} windows of {params.text_model.seq_len} tokens, "
              f"{model.num_params() / 1e6:.3f}M non-embedding params, {trainer.total_steps} steps of "
              f"{tokens_per_step} tokens, lr {trainer.lr:.2e}, {dist.world_size()} process(es) on {device}")
    started = time.perf_counter()
    result = trainer.fit()
    if not dist.is_main():
        return {}
    last = result.history[-1] if result.history else {}
    summary = {"loss": last.get("loss", float("nan")), "steps": result.steps,
               "tokens_per_second": result.images_per_second * params.text_model.seq_len,
               "resumed_from_step": result.resumed_from, "train_seconds": round(time.perf_counter() - started, 2),
               "params": model.num_params(non_embedding=False), "non_embedding_params": model.num_params()}
    write_outputs(params, paths, objective, trainer, summary, tracker)
    return summary


def write_outputs(params: Params, paths: LMPaths, objective: str, trainer: Trainer, summary: dict[str, Any],
                  tracker: Tracker) -> None:
    """Model folder, loss curve and metrics, each written aside and renamed into place; the model is registered
    in MLflow as a version of `tracking.lm_model` tagged with its objective, and `run.json` points at it."""
    from pipeline_lib.eval.plots import write_csv
    from pipeline_lib.registry import register_model
    from pipeline_lib.text.generate import LanguageModel

    model: TransformerLM = trainer.model  # type: ignore[assignment]
    with staged_dir(paths.plots) as plots:
        write_csv(plots / "loss.csv", trainer.history, ["step", "loss", "lr"])
    with staged_dir(paths.out) as out:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, out / WEIGHTS_FILE)
        config = {"objective": objective, "vocab_size": model.vocab_size, "max_len": model.max_len,
                  **{k: getattr(params.text_model, k) for k in ("d_model", "n_layer", "n_head")},
                  "data": read_text_meta(paths.data)["sha256"]["train.bin"]}
        (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        shutil.copy(paths.data / TOKENIZER_FILE, out / TOKENIZER_FILE)
    tracker.log_metrics({k: float(v) for k, v in summary.items()}, step=summary["steps"])
    tracker.flush()
    version = None
    if tracker.run_id is not None:
        example = load_tokenizer(paths.data / TOKENIZER_FILE).decode(read_tokens(paths.data, "train")[:16].tolist())
        version = register_model(LanguageModel(), paths.out, name=params.tracking.lm_model, artifact_name="lm",
                                 input_example=[example], inference_params=LanguageModel.default_params(model.max_len),
                                 tags={**tracker.lineage, "objective": objective})
    write_run_record(paths.out / "run.json", tracker, objective=objective, model_name=params.tracking.lm_model,
                     model_version=version)
    write_json_atomic(paths.metrics, summary)


def load_lm(folder: Path, device: torch.device | str = "cpu") -> tuple[TransformerLM, Tokenizer, dict[str, Any]]:
    """A trained language model folder -> (model in eval mode, its tokenizer, its config)."""
    folder = Path(folder)
    config = json.loads((folder / CONFIG_FILE).read_text())
    model = TransformerLM(config["vocab_size"], d_model=config["d_model"], n_layer=config["n_layer"],
                          n_head=config["n_head"], max_len=config["max_len"], causal=config["objective"] == "ar",
                          mask_token=config["objective"] == "mdm")
    model.load_state_dict(load_file(folder / WEIGHTS_FILE))
    return model.to(device).eval(), load_tokenizer(folder / TOKENIZER_FILE), config
