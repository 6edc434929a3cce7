"""Language-model pretraining of the text track: one transformer, trained as `ar` or `mdm` by the base trainer.

`ar` is next-token cross-entropy on a causal model; `mdm` is LLaDA's masked diffusion (Nie et al. 2025) on a
bidirectional model with a MASK id outside the vocabulary; what differs between them is the objective's strategy
(`models.objectives`), chosen once by name. Everything else (device, bf16, accumulation, clipping,
checkpoint/resume, DDP, logging cadence) is the base trainer's. The training tokens are cut into windows of
`seq_len + 1` ids (each window's last id is the next one's first); an epoch is one pass over them.

A trained model is a folder: `model.safetensors`, `config.json` (architecture, objective) and the
`tokenizer.json` of the data it was trained on, so it generates text without the prepared data.

With `text_pretrain.mdm_init: ar`, `mdm` continues from the trained `ar` model's folder (DiffuGPT's adaptation,
Gong et al. 2025, "Scaling Diffusion Language Models via Adaptation from Autoregressive Models"): `adapt_from_ar`
copies its weights into a shifted bidirectional model (`TransformerLM.shift`), and the trainer anneals the
attention from causal to bidirectional over `text_pretrain.mdm_anneal_epochs` (`anneal_fraction`).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from pipeline_lib.core import dist
from pipeline_lib.core.checkpoints import code_digest
from pipeline_lib.core.config import flatten, params_hash
from pipeline_lib.core.download import sha256_file
from pipeline_lib.core.errors import ConfigError
from pipeline_lib.core.outputs import staged_dir
from pipeline_lib.core.registry import ALIASES, ModelKind
from pipeline_lib.core.tracking import Tracker, write_json_atomic, write_run_record
from pipeline_lib.core.trainer import Batch, Trainer, check_batch_size
from pipeline_lib.text.config import LMTrainParams, TextParams, TextPretrainParams
from pipeline_lib.text.data.corpus import read_text_meta, read_tokens
from pipeline_lib.text.data.tokenizer import load_tokenizer
from pipeline_lib.text.hparams import AutoHparams, ScalingLawRangeWarning, auto_hparams, flops_per_token
from pipeline_lib.text.losses import ar_loss
from pipeline_lib.text.models.likelihood import consecutive_windows
from pipeline_lib.text.models.moe import ExpertBalancer
from pipeline_lib.text.models.mtp import MultiTokenPrediction, mtp_losses
from pipeline_lib.text.models.objectives import resolve_objective
from pipeline_lib.text.models.saved import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, exported, lm_config
from pipeline_lib.text.models.transformer import TransformerLM


def language_model_kind(objective: str) -> ModelKind:
    """What every version of one objective's registered language model is."""
    return ModelKind("text", "language-model", objective)


def language_model_description(name: str, objective: str) -> str:
    """The registered language model's description: what it holds, which stage registers it, how to load it."""
    strategy = resolve_objective(objective)
    return (f"{strategy.title.capitalize()} language model of the text track, pretrained on the "
            f"text corpus. Every version is registered by the DVC stage `text_pretrain@{objective}`. {ALIASES}\n\n"
            f"Load: `mlflow.pyfunc.load_model(\"models:/{name}@challenger\").predict([\"The \"], "
            "params={\"max_new_tokens\": 20})` -> one continuation per prompt; `max_new_tokens` may be anything "
            f"from 1 to the model's context and beyond; the other sampler params: {strategy.sampler_params}, `seed`. "
            f"Or: `python -m pipeline_lib.text.serving models:/{name}@challenger --prompt \"The \"`.")


def window_count(num_tokens: int, seq_len: int, split: str = "training") -> int:
    """How many windows of `seq_len + 1` ids, starting every `seq_len` ids, `num_tokens` ids hold (at least one).

    Raises:
        ConfigError: naming `text_model.seq_len` when not even one window fits.
    """
    count = (num_tokens - 1) // seq_len
    if count < 1:
        raise ConfigError(f"text_model.seq_len={seq_len}: the {num_tokens} {split} tokens are too few for one window "
                          f"of text_model.seq_len + 1 (accepted: at most {num_tokens - 1})")
    return count


def token_windows(tokens: np.ndarray, seq_len: int, split: str = "training") -> np.ndarray:
    """Flat ids -> (N, seq_len + 1) windows starting every `seq_len` ids: a view, nothing is copied."""
    window_count(len(tokens), seq_len, split)  # refuses too few tokens, naming the key
    return consecutive_windows(tokens, seq_len)


def adapts_from_ar(params: TextParams, objective: str) -> bool:
    """Whether `objective` starts from the trained `ar` model (`mdm` with `text_pretrain.mdm_init: ar`)."""
    return objective == "mdm" and params.text_pretrain.mdm_init == "ar"


def build_lm(vocab_size: int, params: TextParams, objective: str, *, shift: bool = False) -> TransformerLM:
    """The transformer `text_model` describes: causal for `ar`, bidirectional with a MASK id for `mdm` (`shift`: in
    the AR layout, for adapting an AR model), with mixture-of-experts feed-forwards when `text_model.moe.enabled`."""
    cfg = params.text_model
    return resolve_objective(objective).build(vocab_size, d_model=cfg.d_model, n_layer=cfg.n_layer,
                                              n_head=cfg.n_head, max_len=cfg.seq_len, dropout=cfg.dropout,
                                              moe=cfg.moe if cfg.moe.enabled else None, shift=shift)


def pretrain_model(vocab_size: int, params: TextParams, objective: str) -> TransformerLM:
    """The model text_pretrain starts `objective` from, before any AR weights are loaded into it: `build_lm`,
    shifted when it adapts the AR model."""
    return build_lm(vocab_size, params, objective, shift=adapts_from_ar(params, objective))


def init_folder(params: TextParams, paths: LMPaths, objective: str) -> Path | None:
    """The AR model folder this run continues from (`mdm_init: ar`), or None when it starts from fresh weights."""
    return paths.init if adapts_from_ar(params, objective) else None


def check_ar_init(folder: Path | None, model: TransformerLM, data_sha256: str) -> dict[str, Any]:
    """The config.json of the AR model folder `folder` that `mdm_init: ar` continues from, checked against the
    masked model to build and the training tokens.

    Raises:
        ConfigError: naming `text_pretrain.mdm_init` when the folder is missing, holds no `ar` model, or one of
            another architecture or trained on other tokens.
    """
    key = "text_pretrain.mdm_init='ar'"
    if folder is None or not (Path(folder) / CONFIG_FILE).is_file() or not (Path(folder) / WEIGHTS_FILE).is_file():
        raise ConfigError(f"{key}: mdm continues from the trained ar model, and {folder} holds none (train "
                          "text_pretrain@ar first: `dvc repro text_pretrain@ar`, or pass its folder as --init)")
    config = json.loads((Path(folder) / CONFIG_FILE).read_text())
    if config.get("objective") != "ar":
        raise ConfigError(f"{key}: {folder} holds a {config.get('objective')!r} model, not an ar one")
    wanted = {**model.architecture(), "vocab_size": model.vocab_size, "shift": False}
    config = {"shift": False, **config}  # folders written before the key existed are unshifted
    differ = {name: (config.get(name), value) for name, value in wanted.items() if config.get(name) != value}
    if differ:
        listed = ", ".join(f"{name} {have!r} (text_model: {want!r})" for name, (have, want) in differ.items())
        raise ConfigError(f"{key}: the ar model in {folder} has another architecture: {listed}; retrain it")
    if config.get("data") != data_sha256:
        raise ConfigError(f"{key}: the ar model in {folder} was trained on other tokens (train.bin sha256 "
                          f"{config.get('data')}, these are {data_sha256}); retrain it")
    return config


def adapt_from_ar(model: TransformerLM, ar_weights: Mapping[str, Tensor]) -> TransformerLM:
    """Load an AR model's `state_dict` into the shifted masked `model`, in place: every weight copied, the MASK row
    of the embedding set to the mean of the token rows (as `grow_vocab` starts a new token). Returns `model`."""
    weights = dict(ar_weights)
    embed = weights["embed.weight"]  # (V, C)
    weights["embed.weight"] = torch.cat([embed, embed.mean(dim=0, keepdim=True)])  # (V + 1, C)
    model.load_state_dict(weights)
    return model


def anneal_fraction(step: int, anneal_steps: int) -> float | None:
    """The chance that a query reads a later key at `step` of a linear anneal over `anneal_steps` steps: 0 (causal)
    at step 0, rising by 1 / anneal_steps a step, None from `anneal_steps` on (the model's own bidirectional
    attention). DiffuGPT's (step + 1) / anneal_steps, started one step earlier so the first step is the AR model's.

    Examples:
        >>> [anneal_fraction(step, 4) for step in range(5)]
        [0.0, 0.25, 0.5, 0.75, None]
    """
    return step / anneal_steps if step < anneal_steps else None


class LMTrainer(Trainer[LMTrainParams]):
    """The base trainer on token windows: `Batch.inputs` holds (b, seq_len + 1) int64 ids; the objective's
    strategy (`models.objectives`, resolved once here) says how they become a loss.

    A `MultiTokenPrediction` model (`ar` only) adds `mtp_weight` times its modules' mean loss to the next-token
    loss and logs each depth's loss and accuracy beside the main model's next-token accuracy.
    """

    stage = "text_pretrain"

    def __init__(self, model: nn.Module, cfg: LMTrainParams, inputs: np.ndarray, *, objective: str, mdm_eps: float,
                 mtp_weight: float = 0.0, anneal_epochs: float = 0.0, **kwargs: Any) -> None:
        # Mixture-of-experts layers are balanced whatever the method (an empty hook without them).
        super().__init__(model, cfg, inputs, hooks=[ExpertBalancer(model)], **kwargs)
        self.objective, self.mdm_eps, self.mtp_weight = objective, mdm_eps, mtp_weight
        self.strategy = resolve_objective(objective)
        self.anneal_steps = round(anneal_epochs * self.steps_per_epoch)

    @property
    def mask_id(self) -> int | None:
        """The language model's MASK id (None without one)."""
        return exported(self.model).mask_id

    def load_inputs(self, index: np.ndarray) -> Tensor:
        return torch.from_numpy(self.inputs[index].astype(np.int64)).to(self.device, non_blocking=True)

    def count_tokens(self, batch: Batch) -> int:
        """The positions the model reads: every row but its last token (the last target)."""
        return batch.inputs.shape[0] * (batch.inputs.shape[-1] - 1)

    def compute_loss(self, batch: Batch) -> dict[str, Tensor]:
        ids = batch.inputs  # (b, L + 1)
        if isinstance(self.model, MultiTokenPrediction):
            logits = self.forward_model(ids[:, :-1])  # [main (b, L, V), depth k (b, L - k, V) ...]
            next_token = ar_loss(logits[0], ids[:, 1:])
            extra = mtp_losses(logits, ids)
            return {"loss": next_token + self.mtp_weight * extra["mtp_loss"], "next_token_loss": next_token, **extra}
        lm = exported(self.model)
        return self.strategy.pretrain_loss(self.forward_model, batch, mask_id=lm.mask_id, eps=self.mdm_eps,
                                           context=lm.context, anneal=anneal_fraction(batch.step, self.anneal_steps))


@dataclass(frozen=True)
class LMPaths:
    """Where the text pretrain stage reads and writes; `init`, the AR model folder `mdm_init: ar` continues from."""

    data: Path
    out: Path
    metrics: Path
    plots: Path
    checkpoints: Path
    init: Path | None = None


def logged_params(params: TextParams, objective: str) -> dict[str, Any]:
    """The params a text pretrain run uses, flat and dotted."""
    return {"seed": params.seed, "text_pretrain.objective": objective, **flatten(params.text_model, "text_model."),
            **flatten(params.text_pretrain, "text_pretrain.")}


def fingerprint(params: TextParams, paths: LMPaths, objective: str) -> str:
    """Identifies a resumable run: params, the training tokens, the library code and the AR weights it adapts."""
    meta = read_text_meta(paths.data)
    init = init_folder(params, paths, objective)
    return params_hash({**logged_params(params, objective), "data": meta["sha256"]["train.bin"],
                        "code": code_digest(), "init": None if init is None else sha256_file(init / WEIGHTS_FILE)})


def auto_hparams_for(params: TextParams, model: TransformerLM, windows: np.ndarray, objective: str) -> AutoHparams:
    """`hparams: auto`: the batch and lr of DeepSeek LLM's laws for this model (FLOPs per token of its active
    feed-forward) trained on `windows` for `epochs`, or at `compute_budget`."""
    cfg, seq_len = params.text_pretrain.for_objective(objective), params.text_model.seq_len
    flops = flops_per_token(n_layer=model.n_layer, d_model=model.embed.weight.shape[1], seq_len=seq_len,
                            mlp_active_params=round(model.active_mlp_params()))
    with warnings.catch_warnings():  # the notes say the same and are printed and logged below
        warnings.simplefilter("ignore", ScalingLawRangeWarning)
        return auto_hparams(flops_per_token=flops, tokens=cfg.epochs * len(windows) * seq_len, seq_len=seq_len,
                            compute=cfg.compute_budget, max_batch=len(windows),
                            multiple_of=cfg.accumulation_steps * dist.world_size())


def training_setup(params: TextParams, model: TransformerLM, windows: np.ndarray,
                   objective: str) -> tuple[nn.Module, TextPretrainParams, AutoHparams | None]:
    """What `text_pretrain` trains and with which keys: the model, wrapped in multi-token prediction for `ar`
    with `mtp_depth`, and the section, with batch_size and base_lr from the laws with `hparams: auto`."""
    cfg, auto = params.text_pretrain.for_objective(objective), None
    if cfg.hparams == "auto":
        auto = auto_hparams_for(params, model, windows, objective)
        cfg = dataclasses.replace(cfg, batch_size=auto.batch_size, base_lr=auto.lr * 256 / auto.batch_size)
    trained: nn.Module = model
    if cfg.mtp_depth and resolve_objective(objective).multi_token_prediction:
        trained = MultiTokenPrediction(model, cfg.mtp_depth)
    return trained, cfg, auto


def describe(model: TransformerLM, trained: nn.Module) -> str:
    """Parameter counts for the start-of-run line: non-embedding, active per token with experts, MTP modules."""
    text = f"{model.num_params() / 1e6:.3f}M non-embedding params"
    if model.moe is not None:
        text += f" ({model.num_active_params() / 1e6:.3f}M active per token)"
    if trained is not model:
        extra = sum(p.numel() for p in trained.parameters()) - sum(p.numel() for p in model.parameters())
        text += f" + {extra / 1e6:.3f}M in multi-token prediction (training only)"
    return text


def check_inputs(params: TextParams, paths: LMPaths, objective: str) -> None:
    """The params that only the prepared text decides, checked by the stage before its MLflow run from
    meta.json: `text_model.seq_len` against the training tokens (`window_count`), and with `hparams: manual`
    `text_pretrain.batch_size` against the windows (and the processes); `auto` caps its batch at them itself.
    An `mdm` that adapts the AR model checks that model (`check_ar_init`).

    Raises:
        ConfigError: naming the key; DataError: no prepared text.
    """
    meta = read_text_meta(paths.data)
    windows = window_count(meta["num_tokens"]["train"], params.text_model.seq_len)
    if params.text_pretrain.hparams == "manual":
        check_batch_size(params.text_pretrain, windows, "training windows of text_model.seq_len + 1 tokens")
    if adapts_from_ar(params, objective):
        check_ar_init(paths.init, pretrain_model(meta["vocab_size"], params, objective), meta["sha256"]["train.bin"])


def run_text_pretrain(params: TextParams, paths: LMPaths, objective: str, tracker: Tracker,
                      device: torch.device) -> dict[str, Any]:
    """Train the language model (resuming a matching checkpoint); rank 0 writes the model, metrics and curve."""
    meta = read_text_meta(paths.data)
    windows = token_windows(read_tokens(paths.data, "train"), params.text_model.seq_len)
    torch.manual_seed(params.seed)  # identical initial weights in every run and on every process
    model = pretrain_model(meta["vocab_size"], params, objective)
    adapted = adapts_from_ar(params, objective)
    if adapted:
        check_ar_init(paths.init, model, meta["sha256"]["train.bin"])
        adapt_from_ar(model, load_file(Path(paths.init) / WEIGHTS_FILE))  # type: ignore[arg-type]  # checked above
    trained, cfg, auto = training_setup(params, model, windows, objective)
    trainer = LMTrainer(trained, cfg, windows, objective=objective, mdm_eps=cfg.mdm_eps,
                        mtp_weight=cfg.mtp_weight, anneal_epochs=cfg.mdm_anneal_epochs if adapted else 0.0,
                        device=device, seed=params.seed,
                        checkpoint_dir=paths.checkpoints, tracker=tracker,
                        fingerprint=fingerprint(params, paths, objective))
    tokens_per_step = cfg.batch_size * params.text_model.seq_len
    if dist.is_main():
        if auto is not None:
            tracker.log_params(auto.as_params())
            print(f"text_pretrain: hparams auto at C = {auto.compute:.3g} FLOPs ({auto.flops_per_token:.3g} per "
                  f"token x {auto.tokens:.3g} tokens): law lr {auto.law_lr:.3g}, batch {auto.law_batch_tokens:.4g} "
                  f"tokens; used lr {auto.lr:.3g}, batch {auto.batch_size}")
            for note in auto.notes:
                print(f"text_pretrain: warning: {note}")
        if cfg.mtp_depth and not trainer.strategy.multi_token_prediction:
            print("text_pretrain: text_pretrain.mtp_depth applies to ar only (mdm predicts every masked position "
                  "at once); training mdm without it")
        if adapted:
            print(f"text_pretrain: mdm continues from the ar model in {paths.init} (text_pretrain.mdm_init: ar), "
                  f"attention annealed to bidirectional over {trainer.anneal_steps} steps")
        print(f"text_pretrain: {objective} on {len(windows)} windows of {params.text_model.seq_len} tokens, "
              f"{describe(model, trained)}, {trainer.total_steps} steps of {tokens_per_step} tokens, "
              f"lr {trainer.lr:.2e}, {dist.world_size()} process(es) on {device}")
    started = time.perf_counter()
    result = trainer.fit()
    if not dist.is_main():
        return {}
    last = result.history[-1] if result.history else {}
    summary = {"loss": last.get("loss", float("nan")), "steps": result.steps,
               "tokens_per_second": result.tokens_per_second,
               "resumed_from_step": result.resumed_from, "train_seconds": round(time.perf_counter() - started, 2),
               "params": model.num_params(non_embedding=False), "non_embedding_params": model.num_params()}
    summary.update({key: last[key] for key in ("next_token_loss", "mtp_loss", "accuracy", "mtp1_accuracy",
                                               "moe.max_violation") if key in last})
    write_outputs(params, paths, objective, trainer, summary, tracker)
    return summary


def write_outputs(params: TextParams, paths: LMPaths, objective: str, trainer: Trainer, summary: dict[str, Any],
                  tracker: Tracker) -> None:
    """Model folder, loss curve and metrics, each written aside and renamed into place; the model is registered
    in MLflow as a version of `<tracking.lm_model>-<objective>`, and `run.json` points at it."""
    from pipeline_lib.core.outputs import write_csv
    from pipeline_lib.core.registry import register_model
    from pipeline_lib.text.serving import LanguageModel

    name = params.tracking.lm_name(objective)
    model = exported(trainer.model)  # without multi-token prediction modules
    with staged_dir(paths.plots) as plots:
        write_csv(plots / "loss.csv", trainer.history, ["step", "loss", "lr"])
    with staged_dir(paths.out) as out:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, out / WEIGHTS_FILE)
        config = lm_config(model, objective, data=read_text_meta(paths.data)["sha256"]["train.bin"])
        (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        shutil.copy(paths.data / TOKENIZER_FILE, out / TOKENIZER_FILE)
    tracker.log_metrics({k: float(v) for k, v in summary.items()}, step=summary["steps"])
    tracker.flush()
    version = None
    if tracker.run_id is not None:
        example = load_tokenizer(paths.data / TOKENIZER_FILE).decode(read_tokens(paths.data, "train")[:16].tolist())
        version = register_model(LanguageModel(), paths.out, name=name, kind=language_model_kind(objective),
                                 artifact_name="lm", input_example=[example],
                                 inference_params=LanguageModel.default_params(model.max_len), tags=tracker.lineage,
                                 description=language_model_description(name, objective),
                                 headline=f"training loss {summary['loss']:.4f} after {summary['steps']} steps "
                                          f"(text_pretrain@{objective}); text_evaluate replaces this line with the "
                                          "validation bits per character")
    write_run_record(paths.out / "run.json", tracker, objective=objective, model_name=name, model_version=version)
    write_json_atomic(paths.metrics, summary)


