"""GRPO of a finetuned task model against a rule reward (DeepSeek-R1 style), on the base trainer and the GRPO
objective the vision rl stage uses (`losses.grpo`: group advantages, clip-higher, k3 KL, token aggregation).

Each optimizer step takes `batch_size` prompts of the `rl` split. On a batch's first update, the policy (in eval
mode: the policy that samples is the one being updated) completes each prompt `group_size` times
(`rollout.complete`); every completion is scored by the declared rule (`accuracy`, `format` or TinyZero's
`combined`) and the rewards become group-relative advantages. The batch is used for `num_iterations` updates.

Per-token log-probabilities of a completion:

- `ar`: exact. One teacher-forced pass over prompt + completion gives log p(token | prefix) at every completion
  token, the log-probs the sampler drew from.
- `mdm`: d1's one-pass estimate (Zhao et al. 2025, "d1: Scaling Reasoning in Diffusion Large Language Models via
  Reinforcement Learning", https://arxiv.org/abs/2504.12216, section 3.2, diffu-GRPO): the whole completion is
  masked, each prompt token is masked with probability `prompt_mask_prob`, and one forward pass gives
  log p(token | masked sequence) at each completion position. This is an approximation: a masked model has no
  exact per-token likelihood, and the sampler decoded the tokens in another order with partial context. Each
  inner update draws a new prompt mask; the old policy's and the reference's log-probs of that update use the
  same mask, so ratio and KL compare like with like.

The tokens of a completion are those up to and including its first ``<eos>`` (`rollout.completion_mask`). The
KL is the k3 estimate per token against the frozen SFT model. Sampling uses a generator seeded by (seed, batch,
first row), so a run is reproducible for a given process count (not across process counts, unlike the masks of
pretraining: each process samples only its own prompts).
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline_lib.core import dist
from pipeline_lib.core.config import flatten, params_hash
from pipeline_lib.core.grpo import group_advantages, grpo_loss, k3_kl
from pipeline_lib.core.outputs import staged_dir
from pipeline_lib.core.registry import model_uri
from pipeline_lib.core.tracking import Tracker, read_run_record, write_json_atomic, write_run_record
from pipeline_lib.core.trainer import Batch, Trainer, check_batch_size, code_digest, step_seed
from pipeline_lib.text.config import TextParams, TextRLParams
from pipeline_lib.text.data.checkers import Checker
from pipeline_lib.text.data.task_data import copy_task_meta, read_task, task_digest
from pipeline_lib.text.data.tasks import Example
from pipeline_lib.text.data.tokenizer import SpecialTokens
from pipeline_lib.text.finetune import register_task_model, save_task_model, weights_digest
from pipeline_lib.text.models.moe import ExpertBalancer
from pipeline_lib.text.models.saved import CONFIG_FILE, load_lm
from pipeline_lib.text.models.transformer import TransformerLM
from pipeline_lib.text.rewards import accuracy_reward, combined_reward, format_reward
from pipeline_lib.text.rollout import complete, completion_mask, decode_completions, encode_prompts
from pipeline_lib.text.task_evaluate import completions_of

PROBE_PROMPTS = 64


class NoLearningSignal(ValueError):
    """Every group of the probe got equal rewards: GRPO's advantages would all be 0."""


def reward_of(cfg: TextRLParams, text: str, example: Example, checker: Checker) -> float:
    """The declared rule reward of one completion."""
    if cfg.reward == "accuracy":
        return accuracy_reward(text, example, checker)
    if cfg.reward == "format":
        return format_reward(text)
    return combined_reward(text, example, checker, format_score=cfg.format_score)


def token_logps(model: nn.Module, objective: str, prompt_ids: Tensor, real: Tensor, completions: Tensor, *,
                mask_id: int | None, prompt_mask_prob: float, mask_seed: int) -> tuple[Tensor, Tensor]:
    """Per-token log-probs (n, A) of `completions` after left-padded prompts (n, P), and the policy's entropy at
    those positions (n, A); AR exact, MDM d1's one-pass estimate with the prompt mask drawn from `mask_seed`."""
    P = prompt_ids.shape[1]
    key_mask = torch.cat([real, torch.ones_like(completions, dtype=torch.bool)], dim=1)
    if objective == "ar":
        sequence = torch.cat([prompt_ids, completions], dim=1)  # (n, P + A)
        logits = model(sequence[:, :-1], key_mask=key_mask[:, :-1])[:, P - 1 :]  # predictions of the A tokens
    else:
        generator = torch.Generator().manual_seed(mask_seed)
        hidden = (torch.rand(prompt_ids.shape, generator=generator) < prompt_mask_prob).to(prompt_ids.device) & real
        sequence = torch.cat([prompt_ids.masked_fill(hidden, mask_id), torch.full_like(completions, mask_id)], dim=1)
        logits = model(sequence, key_mask=key_mask)[:, P:]
    log_probs = F.log_softmax(logits.float(), dim=-1)  # (n, A, V)
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
    return log_probs.gather(-1, completions.unsqueeze(-1)).squeeze(-1), entropy


class TextGRPOTrainer(Trainer[TextRLParams]):
    """GRPO of a task model on prompts; `Batch.inputs` holds the indexes of the step's prompts.

    Args (beyond the base trainer's):
        prompt_ids, real: (N, P) left-padded prompts of the rl split and their key mask (`encode_prompts`).
        examples: the N examples, for the rewards.
        reference: the frozen SFT model.
        objective: `ar` or `mdm`.
        tokenizer, checker, task: the task model's tokenizer, the task's checker, `config.json["task"]`.
    """

    stage = "text_rl"

    def __init__(self, model: TransformerLM, cfg: TextRLParams, prompt_ids: np.ndarray, real: np.ndarray,
                 examples: Sequence[Example], *, reference: TransformerLM, objective: str, tokenizer: SpecialTokens,
                 checker: Checker, task: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(model, cfg, np.arange(len(examples)), hooks=[ExpertBalancer(model)], **kwargs)
        self.prompt_ids, self.real, self.examples = prompt_ids, real, list(examples)
        self.reference = reference.to(self.device).eval().requires_grad_(False)
        self.objective, self.tokenizer, self.checker, self.task = objective, tokenizer, checker, task
        self.sampled: dict[str, dict[str, Any]] = {}

    def updates_per_batch(self) -> int:
        return self.cfg.num_iterations  # type: ignore[attr-defined]

    def train_mode(self) -> None:
        self.model.eval()

    def load_inputs(self, index: np.ndarray) -> Tensor:
        return torch.from_numpy(np.asarray(index, dtype=np.int64))  # prompt indexes stay on the CPU

    def extra_state(self) -> dict[str, Any]:
        return {"sampled": {key: {k: v.cpu() for k, v in value.items() if isinstance(v, Tensor)}
                            for key, value in self.sampled.items()}}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.sampled = {key: {k: v.to(self.device) for k, v in value.items()}
                        for key, value in state.get("sampled", {}).items()}

    def prompts(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """The prompts of `index`, each repeated `group_size` times: (b * G, P) ids and key mask."""
        G = self.cfg.group_size  # type: ignore[attr-defined]
        ids = torch.from_numpy(self.prompt_ids[index.numpy()]).to(self.device).repeat_interleave(G, dim=0)
        real = torch.from_numpy(self.real[index.numpy()]).to(self.device).repeat_interleave(G, dim=0)
        return ids, real

    def logps(self, model: nn.Module, prompt_ids: Tensor, real: Tensor, completions: Tensor,
              mask_seed: int) -> tuple[Tensor, Tensor]:
        cfg: TextRLParams = self.cfg  # type: ignore[assignment]
        return token_logps(model, self.objective, prompt_ids, real, completions, mask_id=self.model.mask_id,
                           prompt_mask_prob=cfg.prompt_mask_prob, mask_seed=mask_seed)

    @torch.no_grad()
    def sample(self, batch: Batch, index: Tensor, batch_index: int) -> dict[str, Any]:
        """Complete each prompt G times, score, and keep what the batch's updates need."""
        cfg: TextRLParams = self.cfg  # type: ignore[assignment]
        prompt_ids, real = self.prompts(index)
        seed = step_seed(self.seed, batch_index) + batch.rows.start
        generator = torch.Generator(device=self.device).manual_seed(seed)
        completions = complete(self.model, self.objective, prompt_ids, real, answer_tokens=self.task["answer_tokens"],
                               temperature=cfg.temperature, block_length=cfg.block_length,
                               eos_id=self.task["eos_id"], generator=generator)
        texts = decode_completions(completions, self.tokenizer, self.task["eos_id"])
        G = cfg.group_size
        examples = [self.examples[i] for i in index.tolist() for _ in range(G)]
        rewards = torch.tensor([reward_of(cfg, t, e, self.checker) for t, e in zip(texts, examples, strict=True)])
        right = torch.tensor([accuracy_reward(t, e, self.checker) for t, e in zip(texts, examples, strict=True)])
        mask_seeds = torch.tensor([step_seed(seed, i) for i in range(cfg.num_iterations)])
        sampled: dict[str, Any] = {
            "completions": completions, "mask": completion_mask(completions, self.task["eos_id"]),
            "rewards": rewards.view(-1, G).to(self.device), "right": right.to(self.device),
            "mask_seeds": mask_seeds,
        }
        sampled["advantages"] = group_advantages(sampled["rewards"], scale=cfg.scale_rewards)
        refs, olds = [], []
        for mask_seed in mask_seeds.tolist():
            refs.append(self.logps(self.reference, prompt_ids, real, completions, mask_seed)[0])
            if cfg.num_iterations > 1:  # with one update the sampling policy is the policy: old = logp.detach()
                olds.append(self.logps(self.model, prompt_ids, real, completions, mask_seed)[0])
        sampled["ref_logp"] = torch.stack(refs)
        if olds:
            sampled["old_logp"] = torch.stack(olds)
        if dist.is_main() and batch.rows.start == 0 and batch_index % cfg.samples_every == 0:
            self.log_samples(batch_index, index, texts, rewards)
        return sampled

    def log_samples(self, batch_index: int, index: Tensor, texts: list[str], rewards: Tensor) -> None:
        """A text table of the first prompts' completions and rewards, as an MLflow artifact."""
        G = self.cfg.group_size  # type: ignore[attr-defined]
        lines = [f"step {batch_index * self.updates_per_batch()}: completions and rewards"]
        for row, i in enumerate(index.tolist()[:4]):
            example = self.examples[i]
            lines.append(f"\nprompt {example.prompt!r} answer {example.answer!r}")
            lines += [f"  {rewards[row * G + j].item():.2f}  {texts[row * G + j]!r}" for j in range(G)]
        self.tracker.log_text("\n".join(lines) + "\n", f"samples/step_{batch_index * self.updates_per_batch():05d}.txt")

    def compute_loss(self, batch: Batch) -> dict[str, Tensor]:
        cfg: TextRLParams = self.cfg  # type: ignore[assignment]
        batch_index, iteration = divmod(batch.step, cfg.num_iterations)
        key = f"{batch_index}:{batch.rows.start}"
        if iteration == 0 or key not in self.sampled:
            if iteration == 0 and batch.rows.start == self.rank:  # a new batch: forget the previous one
                self.sampled = {}
            self.sampled[key] = self.sample(batch, batch.inputs, batch_index)
        sampled = self.sampled[key]
        prompt_ids, real = self.prompts(batch.inputs)
        completions, mask = sampled["completions"], sampled["mask"]
        mask_seed = int(sampled["mask_seeds"][iteration])
        logp, entropy = self.logps(self.forward_model, prompt_ids, real, completions, mask_seed)
        old = sampled["old_logp"][iteration] if "old_logp" in sampled else logp.detach()
        ref = sampled["ref_logp"][iteration]
        shape = (-1, cfg.group_size, completions.shape[1])  # (b, G, A)
        out = grpo_loss(logp.view(shape), old.view(shape), sampled["advantages"], kl=k3_kl(logp, ref).view(shape),
                        epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high, beta=cfg.beta, mask=mask.view(shape),
                        aggregation=cfg.aggregation)
        rewards = sampled["rewards"]
        with torch.no_grad():
            group_std = rewards.std(dim=1)
            lengths = mask.sum(dim=1).float()
            out.update(reward=rewards.mean(), reward_std=group_std.mean(),
                       frac_reward_zero_std=(group_std == 0).float().mean(), accuracy=sampled["right"].mean(),
                       entropy=(entropy * mask).sum() / mask.sum(), completion_length=lengths.mean(),
                       completion_length_min=lengths.min(), completion_length_max=lengths.max())
        return out


@dataclass(frozen=True)
class RLPaths:
    """Where the text rl stage reads and writes."""

    task: Path
    sft: Path
    out: Path
    metrics: Path
    plots: Path
    checkpoints: Path


def logged_params(params: TextParams, objective: str) -> dict[str, Any]:
    """The params a text rl run uses, flat and dotted."""
    return {"seed": params.seed, "text_rl.objective": objective, **flatten(params.text_rl, "text_rl.")}


def fingerprint(params: TextParams, paths: RLPaths, objective: str) -> str:
    """Identifies a resumable run: params, task data, the SFT weights and the library code."""
    return params_hash({**logged_params(params, objective), "task": task_digest(paths.task),
                        "sft": weights_digest(paths.sft), "code": code_digest()})


@torch.no_grad()
def probe_signal(model: TransformerLM, objective: str, tokenizer: SpecialTokens, examples: Sequence[Example],
                 checker: Checker, task: dict[str, Any], cfg: TextRLParams, seed: int) -> dict[str, float]:
    """Sample G completions for the first prompts of the rl split, as training will: the mean reward, the pass
    rate and the share of groups whose rewards are all equal (no learning signal)."""
    probe = list(examples[:PROBE_PROMPTS])
    G = cfg.group_size
    texts = [text for group in completions_of(model, objective, tokenizer, [e.prompt for e in probe], task,
                                              temperature=cfg.temperature, block_length=cfg.block_length, samples=G,
                                              seed=seed) for text in group]
    pairs = list(zip(texts, [e for e in probe for _ in range(G)], strict=True))
    rewards = torch.tensor([reward_of(cfg, t, e, checker) for t, e in pairs]).view(-1, G)
    return {"reward": rewards.mean().item(), "pass_rate": float(np.mean([accuracy_reward(t, e, checker)
                                                                         for t, e in pairs])),
            "frac_reward_zero_std": (rewards.std(dim=1) == 0).float().mean().item(), "prompts": len(probe)}


def check_signal(probe: dict[str, float], cfg: TextRLParams) -> None:
    """Refuse a run in which every probe group is all right or all wrong; warn when most are."""
    where = (f"on {probe['prompts']} rl prompts x text_rl.group_size={cfg.group_size} completions "
             f"(pass rate {probe['pass_rate']:.3f}, text_rl.reward={cfg.reward})")
    if probe["frac_reward_zero_std"] >= 1.0:
        raise NoLearningSignal(
            f"no learning signal: every group got equal rewards {where}, so every advantage is 0. Finetune more or "
            f"less (text_sft.epochs), pick an easier or harder task, or raise text_rl.group_size or "
            f"text_rl.temperature")
    if probe["frac_reward_zero_std"] > 0.9 and dist.is_main():
        print(f"text_rl: warning: {probe['frac_reward_zero_std']:.0%} of the groups got equal rewards {where}; "
              f"little learning signal")


def check_task_model(config: dict[str, Any], folder: Path, objective: str) -> None:
    """GRPO starts from a task model (its config.json) of this objective: the out of text_sft."""
    if "task" not in config or config["objective"] != objective:
        raise ValueError(f"{folder} is not an {objective!r} task model (config.json has no 'task' or another "
                         "objective); give the out of text_sft")


def check_inputs(params: TextParams, paths: RLPaths, objective: str) -> None:
    """The params that only the task data decides, checked by the stage before its MLflow run from the task
    files and the SFT model's config.json: `text_rl.batch_size` against the rl prompts (and the processes).

    Raises:
        ConfigError: naming the key; FileNotFoundError, ValueError: missing or wrong inputs.
    """
    check_task_model(json.loads((Path(paths.sft) / CONFIG_FILE).read_text()), paths.sft, objective)
    check_batch_size(params.text_rl, len(read_task(paths.task).splits["rl"]), "rl prompts")


def run_text_rl(params: TextParams, paths: RLPaths, objective: str, tracker: Tracker,
                device: torch.device) -> dict[str, Any]:
    """Post-train the SFT model with GRPO on the rl split (resuming a matching checkpoint); rank 0 writes the
    model, the curves and the metrics, and registers the model."""
    cfg = params.text_rl
    data = read_task(paths.task)
    policy, tokenizer, config = load_lm(paths.sft, device)
    check_task_model(config, paths.sft, objective)
    task = config["task"]
    examples = data.splits["rl"]
    probe = probe_signal(policy, objective, tokenizer, examples, data.checker, task, cfg, params.seed)
    check_signal(probe, cfg)
    ids, real = encode_prompts([e.prompt for e in examples], tokenizer, task["prompt_len"])
    trainer = TextGRPOTrainer(policy, cfg, ids, real, examples, reference=copy.deepcopy(policy), objective=objective,
                              tokenizer=tokenizer, checker=data.checker, task=task, device=device, seed=params.seed,
                              checkpoint_dir=paths.checkpoints, tracker=tracker,
                              fingerprint=fingerprint(params, paths, objective))
    if dist.is_main():
        print(f"text_rl: GRPO of {objective} on {len(examples)} rl prompts, G={cfg.group_size}, reward {cfg.reward}, "
              f"{trainer.total_steps} steps, lr {trainer.lr:.2e}; probe pass rate {probe['pass_rate']:.3f}, "
              f"{probe['frac_reward_zero_std']:.0%} of groups without signal")
    started = time.perf_counter()
    result = trainer.fit()
    if not dist.is_main():
        return {}
    history = result.history
    first, last = (history[0], history[-1]) if history else ({}, {})
    summary = {"rl_seconds": round(time.perf_counter() - started, 2), "steps": result.steps,
               "resumed_from_step": result.resumed_from, "probe": probe,
               "first": {k: first[k] for k in ("reward", "accuracy", "kl") if k in first},
               "last": {k: last[k] for k in ("reward", "accuracy", "kl", "entropy", "clip_ratio") if k in last}}
    write_outputs(params, paths, objective, trainer, tokenizer, config, summary, tracker)
    return summary


def write_outputs(params: TextParams, paths: RLPaths, objective: str, trainer: Trainer, tokenizer: SpecialTokens,
                  config: dict[str, Any], summary: dict[str, Any], tracker: Tracker) -> None:
    """Model folder, curves and metrics, staged and renamed into place; the model is registered with lineage to
    the SFT version (and through it the pretrained one)."""
    from pipeline_lib.core.outputs import write_csv

    upstream = read_run_record(paths.sft)
    sft = {"sha256": weights_digest(paths.sft), "run_id": upstream.get("run_id"),
           "model_name": upstream.get("model_name"), "model_version": upstream.get("model_version")}
    columns = ["step", "loss", "reward", "reward_std", "frac_reward_zero_std", "accuracy", "kl", "entropy",
               "clip_ratio", "completion_length"]
    with staged_dir(paths.plots) as plots:
        write_csv(plots / "reward.csv", trainer.history, columns)
    with staged_dir(paths.out) as out:
        save_task_model(trainer.model, tokenizer, objective, config["task"], out,  # type: ignore[arg-type]
                        pretrained=config.get("pretrained"), sft=sft)
        copy_task_meta(paths.task, out)
    flat = {"rl_seconds": summary["rl_seconds"], **{f"probe.{k}": v for k, v in summary["probe"].items()}}
    tracker.log_metrics(flat)
    tracker.flush()
    first, last = summary["first"], summary["last"]
    version = register_task_model(
        params, paths.out, tracker, config["task"], objective=objective,
        headline=f"GRPO reward on the rl batches {first.get('reward', float('nan')):.3f} -> "
                 f"{last.get('reward', float('nan')):.3f} in {summary['steps']} steps (text_rl@{objective}); "
                 "text_task_evaluate replaces this line with the test exact match",
        started_from=model_uri(sft["model_name"], sft["model_version"]))
    write_run_record(paths.out / "run.json", tracker, objective=objective,
                     model_name=params.tracking.task_name(objective), model_version=version)
    write_json_atomic(paths.metrics, summary)
