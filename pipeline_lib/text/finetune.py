"""Supervised finetuning (SFT) of the text track's language models on a verifiable task, on the base trainer.

The model starts from the pretrained language model (`models/text/<objective>`) or, for the baseline that
measures what pretraining gives, from fresh weights of the same architecture and tokenizer with the same budget.
Either way its vocabulary grows by the answer tags and ``<eos>`` (`rollout.task_tokenizer`, `grow_vocab`), and it
learns the `train` split's completions (`rollout.encode_examples`) with its objective's SFT loss
(`Objective.sft_loss` of `models.objectives`):

- `ar`: next-token cross-entropy on the answer tokens only (`losses.sft_ar_loss`); prompt and padding are read,
  never learned.
- `mdm`: LLaDA's SFT (`losses.sft_mdm_loss`): the prompt is never masked; the answer and its ``<eos>`` padding
  are masked with one probability per sequence, and each sequence's loss is divided by its response length.

The model folder is a language-model folder (`models.saved.load_lm` reads it) whose `config.json` adds `task`:
the ``<eos>`` id, `answer_tokens`, `prompt_len` and the checker, which GRPO, the evaluation and the registered
model read.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor

from pipeline_lib.core import dist
from pipeline_lib.core.checkpoints import code_digest
from pipeline_lib.core.config import flatten, params_hash
from pipeline_lib.core.errors import ConfigError
from pipeline_lib.core.outputs import staged_dir
from pipeline_lib.core.registry import ALIASES, ModelKind, model_uri
from pipeline_lib.core.tracking import Tracker, upstream_model, write_json_atomic, write_run_record
from pipeline_lib.core.trainer import Batch, Trainer, check_batch_size
from pipeline_lib.text.config import TextParams, TextSFTParams
from pipeline_lib.text.data.checkers import Checker
from pipeline_lib.text.data.task_data import TaskData, copy_task_meta, read_task, task_digest
from pipeline_lib.text.data.tasks import Example
from pipeline_lib.text.data.tokenizer import SpecialTokens, load_tokenizer
from pipeline_lib.text.models.objectives import resolve_objective
from pipeline_lib.text.models.saved import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, exported, lm_config, load_lm
from pipeline_lib.text.models.transformer import TransformerLM, grow_vocab
from pipeline_lib.text.pretrain import LMTrainer, build_lm
from pipeline_lib.text.rollout import (
    EOS,
    ROLE,
    check_fits,
    default_block_length,
    encode_examples,
    prompt_length,
    task_tokenizer,
)


class SFTTrainer(LMTrainer):
    """The language-model trainer on task rows: `Batch.inputs` holds (b, 2, T) int64, the ids and their `ROLE`s;
    the objective's strategy turns them into its SFT loss.

    With `early_stop`, training ends at the first of its checks that reaches its target; each check is logged as
    `holdout_accuracy`.
    """

    stage = "text_sft"

    def __init__(self, *args: Any, early_stop: EarlyStop | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.early_stop = early_stop
        self.checks: list[tuple[int, float]] = []  # (step, holdout exact match) of each check

    def compute_loss(self, batch: Batch) -> dict[str, Tensor]:
        ids, roles = batch.inputs[:, 0], batch.inputs[:, 1]  # (b, T) each
        return self.strategy.sft_loss(self.forward_model, batch, ids, key_mask=roles != ROLE.PAD,
                                      answer=roles == ROLE.ANSWER, response=roles >= ROLE.ANSWER,
                                      mask_id=self.mask_id, eps=self.mdm_eps)

    def should_stop(self, step: int) -> bool:
        if self.early_stop is None or (step + 1) % self.early_stop.every:
            return False
        accuracy = self.early_stop.score(exported(self.model))
        self.model.train()
        self.checks.append((step + 1, accuracy))
        if dist.is_main():
            self.tracker.log_metrics({"holdout_accuracy": accuracy}, step=step + 1)
        return accuracy >= self.early_stop.target


@dataclass(frozen=True)
class EarlyStop:
    """SFT's stop at the edge of competence (`text_sft.stop_at_accuracy`): every `every` steps `score` gives the
    model's greedy exact match on the held-out examples; training ends at the first that reaches `target`."""

    score: Callable[[TransformerLM], float]
    target: float
    every: int


def holdout_split(examples: Sequence[Example], cfg: TextSFTParams) -> tuple[list[Example], list[Example]]:
    """(trained, held out): the last `text_sft.holdout` train examples are held out when SFT stops early, none
    otherwise."""
    cut = len(examples) - (cfg.holdout if cfg.stop_at_accuracy is not None else 0)
    return list(examples[:cut]), list(examples[cut:])


def early_stop(cfg: TextSFTParams, held_out: Sequence[Example], objective: str, tokenizer: SpecialTokens,
               checker: Checker, task: dict[str, Any]) -> EarlyStop | None:
    """The early stop of `text_sft.stop_at_accuracy` on the held-out examples (greedy, as the registered task
    model answers: `mdm` in blocks of `rollout.default_block_length`), or None without one."""
    from pipeline_lib.text.task_evaluate import greedy_accuracy

    if cfg.stop_at_accuracy is None:
        return None
    return EarlyStop(lambda model: greedy_accuracy(model, objective, tokenizer, held_out, checker, task,
                                                   block_length=default_block_length(task)),
                     cfg.stop_at_accuracy, cfg.check_every)



@dataclass(frozen=True)
class SFTPaths:
    """Where a finetuning stage reads and writes; `pretrained` None trains the from-scratch baseline."""

    task: Path
    data: Path
    pretrained: Path | None
    out: Path
    metrics: Path
    plots: Path
    checkpoints: Path


def logged_params(params: TextParams, objective: str, init: str) -> dict[str, Any]:
    """The params an SFT run uses, flat and dotted."""
    return {"seed": params.seed, "text_sft.objective": objective, "text_sft.init": init,
            **flatten(params.text_model, "text_model."), **flatten(params.text_task, "text_task."),
            **flatten(params.text_sft, "text_sft.")}


def weights_digest(folder: Path | None) -> str:
    """sha256 of a model folder's weights ("none" for no folder)."""
    return "none" if folder is None else hashlib.sha256((Path(folder) / WEIGHTS_FILE).read_bytes()).hexdigest()


def fingerprint(params: TextParams, paths: SFTPaths, objective: str) -> str:
    """Identifies a resumable run: params, task data, the starting weights and the library code."""
    init = "pretrained" if paths.pretrained else "scratch"
    return params_hash({**logged_params(params, objective, init), "task": task_digest(paths.task),
                        "start": weights_digest(paths.pretrained), "code": code_digest()})


def check_objective(config: dict[str, Any], folder: Path, objective: str) -> None:
    """The pretrained model (its config.json) was trained with the objective this stage finetunes."""
    if config["objective"] != objective:
        raise ValueError(f"{folder} is an {config['objective']!r} model, not {objective!r}")


def check_inputs(params: TextParams, paths: SFTPaths, objective: str) -> None:
    """The params that only the task data and the tokenizer decide, checked by the stage before its MLflow run
    from the task files, config.json and tokenizer.json (no weights): the longest prompt plus
    `text_task.answer_tokens` fits the model's context (`rollout.check_fits`), every train completion fits
    `text_task.answer_tokens` (`rollout.encode_examples`), and `text_sft.batch_size` fits the train split (and
    the processes) after the held-out examples of the early stop.

    Raises:
        ConfigError: naming the key; FileNotFoundError, ValueError: missing or wrong inputs.
    """
    data = read_task(paths.task)
    if paths.pretrained is not None:
        config = json.loads((paths.pretrained / CONFIG_FILE).read_text())
        check_objective(config, paths.pretrained, objective)
        base, max_len = load_tokenizer(paths.pretrained / TOKENIZER_FILE), config["max_len"]
    else:
        base, max_len = load_tokenizer(paths.data / TOKENIZER_FILE), params.text_model.seq_len
    tokenizer = task_tokenizer(base)
    layout = task_layout([example.prompt for split in data.splits.values() for example in split], tokenizer, params,
                         max_len)
    encode_examples(data.splits["train"], tokenizer, prompt_len=layout["prompt_len"],
                    answer_tokens=layout["answer_tokens"], split="train")
    trained, _ = holdout_split(data.splits["train"], params.text_sft)
    cfg, train = params.text_sft, len(data.splits["train"])
    if len(trained) < cfg.batch_size:
        raise ConfigError(f"text_sft.holdout={cfg.holdout}: leaves {len(trained)} of the {train} train examples to "
                          f"train on, fewer than text_sft.batch_size={cfg.batch_size} (accepted: at most "
                          f"{train - cfg.batch_size})")
    check_batch_size(cfg, len(trained), "train examples (the held-out ones left out)")


def start_model(params: TextParams, paths: SFTPaths, objective: str) -> tuple[TransformerLM, SpecialTokens]:
    """The pretrained model (or fresh weights of the same architecture) with the task tokens added."""
    if paths.pretrained is not None:
        model, base, config = load_lm(paths.pretrained)
        check_objective(config, paths.pretrained, objective)
    else:
        base = load_tokenizer(paths.data / TOKENIZER_FILE)
        torch.manual_seed(params.seed)  # identical initial weights in every run and on every process
        model = build_lm(base.vocab_size, params, objective)
    tokenizer = task_tokenizer(base)
    return grow_vocab(model, tokenizer.vocab_size - model.vocab_size), tokenizer


def task_layout(task_prompts: list[str], tokenizer: SpecialTokens, params: TextParams, max_len: int) -> dict[str, Any]:
    """What every task model records in `config.json["task"]`; refuses a layout over the model's context."""
    prompt_len = prompt_length(task_prompts, tokenizer)
    check_fits(prompt_len, params.text_task.answer_tokens, max_len)
    return {"eos": EOS, "eos_id": tokenizer.token_id(EOS), "prompt_len": prompt_len,
            "answer_tokens": params.text_task.answer_tokens}


def sft_trainer(params: TextParams, model: TransformerLM, tokenizer: SpecialTokens, data: TaskData, objective: str,
                **kwargs: Any) -> tuple[SFTTrainer, dict[str, Any]]:
    """The SFT trainer of a task model on the train split (its last `text_sft.holdout` examples held out for the
    early stop when `text_sft.stop_at_accuracy` is set) and the task layout its config records; `kwargs` are the
    base trainer's (device, seed, checkpoint_dir, tracker, fingerprint)."""
    cfg = params.text_sft
    prompts = [example.prompt for split in data.splits.values() for example in split]
    layout = task_layout(prompts, tokenizer, params, model.max_len)
    trained, held_out = holdout_split(data.splits["train"], cfg)
    rows = encode_examples(trained, tokenizer, prompt_len=layout["prompt_len"], answer_tokens=layout["answer_tokens"],
                           split="train")
    stacked = np.stack([rows.ids, rows.roles.astype(np.int64)], axis=1)  # (N, 2, T)
    stop = early_stop(cfg, held_out, objective, tokenizer, data.checker, layout)
    trainer = SFTTrainer(model, cfg, stacked, objective=objective, mdm_eps=cfg.mdm_eps, early_stop=stop, **kwargs)
    return trainer, layout


def run_text_sft(params: TextParams, paths: SFTPaths, objective: str, tracker: Tracker,
                 device: torch.device) -> dict[str, Any]:
    """Finetune (resuming a matching checkpoint); rank 0 writes the model folder, metrics and loss curve."""
    data = read_task(paths.task)
    model, tokenizer = start_model(params, paths, objective)
    trainer, layout = sft_trainer(params, model, tokenizer, data, objective, device=device, seed=params.seed,
                                  checkpoint_dir=paths.checkpoints, tracker=tracker,
                                  fingerprint=fingerprint(params, paths, objective))
    init = "pretrained" if paths.pretrained else "scratch"
    cfg = params.text_sft
    if dist.is_main():
        stop = ("" if trainer.early_stop is None else f", stopping at the first check of {cfg.holdout} held-out "
                f"examples (every {cfg.check_every} steps) with exact match >= {cfg.stop_at_accuracy}")
        print(f"text_sft: {objective} from {init} on {len(trainer.inputs)} {data.meta['kind']} examples of "
              f"{trainer.inputs.shape[-1]} tokens, {trainer.total_steps} steps, lr {trainer.lr:.2e}, "
              f"{dist.world_size()} process(es) on {device}{stop}")
    started = time.perf_counter()
    result = trainer.fit()
    if not dist.is_main():
        return {}
    last = result.history[-1] if result.history else {}
    summary = {"loss": last.get("loss", float("nan")), "steps": result.steps,
               "examples_per_second": result.samples_per_second, "resumed_from_step": result.resumed_from,
               "train_seconds": round(time.perf_counter() - started, 2)}
    if trainer.early_stop is not None:
        summary.update(stopped_early=trainer.stopped_at is not None,
                       holdout_accuracy=trainer.checks[-1][1] if trainer.checks else None)
    config = {**layout, "checker": data.checker_name, "kind": data.meta["kind"], "init": init}
    write_outputs(params, paths, objective, trainer, tokenizer, config, summary, tracker)
    return summary


def save_task_model(model: TransformerLM, tokenizer: SpecialTokens, objective: str, task: dict[str, Any],
                    out: Path, **extra: Any) -> None:
    """A task model folder: weights, config (architecture, objective, `task`, extras) and tokenizer."""
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, out / WEIGHTS_FILE)
    config = lm_config(model, objective, task=task, **extra)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save(out / TOKENIZER_FILE)


def task_model_kind(objective: str) -> ModelKind:
    """What every version of one objective's registered task model is (SFT and GRPO versions alike)."""
    return ModelKind("text", "task-model", objective)


def task_model_description(name: str, objective: str) -> str:
    """The registered task model's description: what it holds, which stages register it, how to load it."""
    strategy = resolve_objective(objective)
    return (f"{strategy.title.capitalize()} task model of the text track: the pretrained language "
            "model finetuned on the verifiable task of `text_task`. Versions come from two stages, in this order: "
            f"`text_sft@{objective}` (supervised finetuning on the train split) and `text_rl@{objective}` (that model "
            "post-trained with GRPO against the rule reward, on the rl split), so after a full `dvc repro` the "
            f"newest is the post-trained one. {ALIASES}\n\n"
            f"Load: `mlflow.pyfunc.load_model(\"models:/{name}@champion\").predict([\"57+38=\"])` -> one "
            "completion per prompt, greedy and cut at `<eos>` by default (e.g. `<answer>95</answer>`); sampler "
            f"params: `max_new_tokens`, {strategy.sampler_params}, `seed`. Or: "
            f"`python -m pipeline_lib.text.serving models:/{name}@champion --prompt \"57+38=\" --temperature 0`.")


def register_task_model(params: TextParams, folder: Path, tracker: Tracker, task: dict[str, Any], *, objective: str,
                        headline: str, started_from: str | None) -> int | None:
    """Register a task model folder as a version of `<tracking.task_model>-<objective>`; greedy completions by
    default, for `mdm` in two blocks (as the default text_rl and text_task_evaluate sample): one block over the
    whole answer commits the end-of-sequence fill first, its most confident positions, and so fixes the answer's
    length before its digits."""
    from pipeline_lib.core.registry import register_model
    from pipeline_lib.text.serving import LanguageModel

    if tracker.run_id is None:
        return None
    name = params.tracking.task_name(objective)
    prompt = json.loads((folder / "task.json").read_text())["examples"]["test"][0]
    defaults = {**LanguageModel.default_params(task["prompt_len"] + task["answer_tokens"]),
                "max_new_tokens": task["answer_tokens"],
                "block_length": default_block_length(task), "temperature": 0.0}
    return register_model(LanguageModel(), folder, name=name, kind=task_model_kind(objective), artifact_name="lm",
                          input_example=[prompt], inference_params=defaults, tags=tracker.lineage,
                          description=task_model_description(name, objective), headline=headline,
                          started_from=started_from)


def write_outputs(params: TextParams, paths: SFTPaths, objective: str, trainer: Trainer, tokenizer: SpecialTokens,
                  task: dict[str, Any], summary: dict[str, Any], tracker: Tracker) -> None:
    """Model folder, loss curve and metrics, staged and renamed into place; the pretrained-then-finetuned model
    is registered (tags: objective, stage, lineage to the pretrained version), the baseline only measured."""
    from pipeline_lib.core.outputs import write_csv

    model = exported(trainer.model)
    pretrained = upstream_model(paths.pretrained, weights_digest(paths.pretrained))
    with staged_dir(paths.plots) as plots:
        write_csv(plots / "loss.csv", trainer.history, ["step", "loss", "lr"])
    with staged_dir(paths.out) as out:
        save_task_model(model, tokenizer, objective, task, out, pretrained=pretrained)
        copy_task_meta(paths.task, out)
    tracker.log_metrics({k: float(v) for k, v in summary.items()}, step=summary["steps"])
    tracker.flush()
    version = None
    if paths.pretrained is not None:
        version = register_task_model(
            params, paths.out, tracker, task, objective=objective,
            headline=f"training loss {summary['loss']:.4f} after {summary['steps']} steps (text_sft@{objective}); "
                     "text_task_evaluate replaces this line with the test exact match",
            started_from=model_uri(pretrained["model_name"], pretrained["model_version"]))
    write_run_record(paths.out / "run.json", tracker, objective=objective, init=task["init"],
                     model_name=params.tracking.task_name(objective) if version else None, model_version=version)
    write_json_atomic(paths.metrics, summary)
