"""GRPO of a finetuned task model against a rule reward (DeepSeek-R1 style), on the GRPO trainer the vision rl
stage uses (`pipeline_lib.core.grpo`: group advantages, clip-higher, k3 KL, token aggregation); this module gives it
the text policy.

Each optimizer step takes `batch_size` prompts of the `rl` split. On a batch's first update, the policy (in eval
mode: the policy that samples is the one being updated) completes each prompt `group_size` times
(`rollout.complete`); every completion is scored by the declared rule (`rewards.REWARDS[text_rl.reward]`:
`accuracy`, `format` or TinyZero's `combined`) and the rewards become group-relative advantages. The batch is used
for `num_iterations` updates.

Per-token log-probabilities of a completion, one policy class per objective (`POLICIES`, chosen once):

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
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline_lib.core import dist
from pipeline_lib.core.checkpoints import code_digest
from pipeline_lib.core.config import flatten, params_hash
from pipeline_lib.core.grpo import GRPOTrainer, LogProbs, Policy, Rollout, unwrap
from pipeline_lib.core.outputs import staged_dir
from pipeline_lib.core.registry import model_uri
from pipeline_lib.core.tracking import Tracker, upstream_model, write_json_atomic, write_run_record
from pipeline_lib.core.trainer import Batch, Trainer, check_batch_size, step_seed
from pipeline_lib.text.config import TextParams, TextRLParams
from pipeline_lib.text.data.checkers import Checker
from pipeline_lib.text.data.task_data import copy_task_meta, read_task, task_digest
from pipeline_lib.text.data.tasks import Example
from pipeline_lib.text.data.tokenizer import SpecialTokens
from pipeline_lib.text.finetune import register_task_model, save_task_model, weights_digest
from pipeline_lib.text.models.moe import ExpertBalancer
from pipeline_lib.text.models.objectives import resolve_objective
from pipeline_lib.text.models.saved import CONFIG_FILE, load_lm
from pipeline_lib.text.models.transformer import TransformerLM
from pipeline_lib.text.rewards import REWARDS, accuracy_reward
from pipeline_lib.text.rollout import ROLE, complete, completion_mask, decode_completions, encode_prompts
from pipeline_lib.text.task_evaluate import completions_of

PROBE_PROMPTS = 64


class NoLearningSignal(ValueError):
    """Every group of the probe got equal rewards: GRPO's advantages would all be 0."""


def reward_of(cfg: TextRLParams, text: str, example: Example, checker: Checker) -> float:
    """The declared rule reward (`text_rl.reward`) of one completion."""
    return REWARDS[cfg.reward](text, example, checker, cfg.format_score)


def completion_log_probs(logits: Tensor, completions: Tensor, *, temperature: float) -> tuple[Tensor, Tensor]:
    """(n, A, V) logits at the completion positions -> the completion tokens' log-probs (n, A) under the
    distribution the sampler draws from, softmax(logits / temperature), and its entropy there (n, A)."""
    log_probs = F.log_softmax(logits.float() / temperature, dim=-1)  # (n, A, V)
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
    return log_probs.gather(-1, completions.unsqueeze(-1)).squeeze(-1), entropy


def ar_token_logps(model: nn.Module, prompt_ids: Tensor, real: Tensor, completions: Tensor, *,
                   temperature: float) -> tuple[Tensor, Tensor]:
    """Exact per-token log-probs (n, A) of `completions` after left-padded prompts (n, P) with key mask `real` at
    the sampling `temperature`, and the entropy at those positions: one teacher-forced pass over prompt +
    completion."""
    P = prompt_ids.shape[1]
    key_mask = torch.cat([real, torch.ones_like(completions, dtype=torch.bool)], dim=1)
    sequence = torch.cat([prompt_ids, completions], dim=1)  # (n, P + A)
    logits = model(sequence[:, :-1], key_mask=key_mask[:, :-1])[:, P - 1 :]  # predictions of the A tokens
    return completion_log_probs(logits, completions, temperature=temperature)


def mdm_token_logps(model: nn.Module, prompt_ids: Tensor, real: Tensor, completions: Tensor, *, mask_id: int,
                    prompt_mask_prob: float, mask_seed: int, temperature: float) -> tuple[Tensor, Tensor]:
    """d1's one-pass estimate of the per-token log-probs (n, A) of `completions` at the sampling `temperature`, and
    the entropy there: the whole completion masked, each real prompt token masked with `prompt_mask_prob` (the
    mask drawn from `mask_seed`)."""
    P = prompt_ids.shape[1]
    key_mask = torch.cat([real, torch.ones_like(completions, dtype=torch.bool)], dim=1)
    generator = torch.Generator().manual_seed(mask_seed)
    hidden = (torch.rand(prompt_ids.shape, generator=generator) < prompt_mask_prob).to(prompt_ids.device) & real
    sequence = torch.cat([prompt_ids.masked_fill(hidden, mask_id), torch.full_like(completions, mask_id)], dim=1)
    logits = model(sequence, key_mask=key_mask)[:, P:]
    return completion_log_probs(logits, completions, temperature=temperature)


class TextPolicy(Policy):
    """A task model completing prompts, rewarded by the declared rule; `Batch.inputs` holds prompt indexes.

    Samples: `completions` (b * G, A) ids, `mask` (b * G, A) their tokens (`rollout.completion_mask`), `right`
    (b * G,) whether each is right (the `accuracy` metric), and while the batch is sampled, `texts`. A subclass
    gives the per-token log-probs of its objective (`token_logps`).

    Args:
        cfg: the text_rl section.
        prompt_ids, real: (N, P) left-padded prompts of the rl split and their key mask (`encode_prompts`).
        examples: the N examples, for the rewards.
        tokenizer, checker, task: the task model's tokenizer, the task's checker, `config.json["task"]`.
        tracker: where the tables of sampled completions go (every `samples_every` batches).
    """

    objective: str

    def __init__(self, cfg: TextRLParams, prompt_ids: np.ndarray, real: np.ndarray, examples: Sequence[Example], *,
                 tokenizer: SpecialTokens, checker: Checker, task: dict[str, Any], tracker: Tracker) -> None:
        self.cfg, self.prompt_ids, self.real, self.examples = cfg, prompt_ids, real, list(examples)
        self.tokenizer, self.checker, self.task, self.tracker = tokenizer, checker, task, tracker
        self.aggregation = cfg.aggregation

    def token_logps(self, model: nn.Module, prompt_ids: Tensor, real: Tensor, completions: Tensor,
                    samples: dict[str, Any], iteration: int) -> tuple[Tensor, Tensor]:
        """Per-token log-probs (n, A) of the completions and the entropy there (n, A)."""
        raise NotImplementedError

    def prompts(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """The batch's prompts, each repeated `group_size` times: (b * G, P) ids and key mask, on the device."""
        G, index = self.cfg.group_size, batch.inputs.cpu().numpy()
        ids = torch.from_numpy(self.prompt_ids[index]).to(batch.inputs.device).repeat_interleave(G, dim=0)
        real = torch.from_numpy(self.real[index]).to(batch.inputs.device).repeat_interleave(G, dim=0)
        return ids, real

    def batch_examples(self, batch: Batch) -> list[Example]:
        """The examples of the batch's b * G completions."""
        return [self.examples[i] for i in batch.inputs.tolist() for _ in range(self.cfg.group_size)]

    def sample_seed(self, batch: Batch) -> int:
        """The seed of this process's draws for the batch: the batch's seed and its first row (reproducible for a
        given process count)."""
        return batch.generator.initial_seed() + batch.rows.start

    @torch.no_grad()
    def sample(self, model: nn.Module, batch: Batch) -> Rollout:
        """Complete each prompt G times (`rollout.complete`) and check each completion's answer."""
        prompt_ids, real = self.prompts(batch)
        generator = torch.Generator(device=prompt_ids.device).manual_seed(self.sample_seed(batch))
        completions = complete(unwrap(model), self.objective, prompt_ids, real,
                               answer_tokens=self.task["answer_tokens"], temperature=self.cfg.temperature,
                               block_length=self.cfg.block_length, eos_id=self.task["eos_id"], generator=generator)
        texts = decode_completions(completions, self.tokenizer, self.task["eos_id"])
        right = [accuracy_reward(t, e, self.checker) for t, e in zip(texts, self.batch_examples(batch), strict=True)]
        return Rollout({"completions": completions, "mask": completion_mask(completions, self.task["eos_id"]),
                        "right": torch.tensor(right).to(prompt_ids.device), "texts": texts})

    def rewards(self, batch: Batch, samples: dict[str, Any]) -> Tensor:
        pairs = zip(samples["texts"], self.batch_examples(batch), strict=True)
        rewards = torch.tensor([reward_of(self.cfg, text, example, self.checker) for text, example in pairs])
        return rewards.view(-1, self.cfg.group_size).to(samples["completions"].device)

    def log_probs(self, model: nn.Module, batch: Batch, samples: dict[str, Any], iteration: int) -> LogProbs:
        prompt_ids, real = self.prompts(batch)
        completions = samples["completions"]
        logp, entropy = self.token_logps(model, prompt_ids, real, completions, samples, iteration)
        shape = (-1, self.cfg.group_size, completions.shape[1])  # (b, G, A)
        return LogProbs(logp.view(shape), entropy=entropy.view(shape), mask=samples["mask"].view(shape))

    def metrics(self, batch: Batch, samples: dict[str, Any], scored: LogProbs) -> dict[str, Tensor]:
        lengths = samples["mask"].sum(dim=1).float()
        return {"accuracy": samples["right"].mean(), "completion_length": lengths.mean(),
                "completion_length_min": lengths.min(), "completion_length_max": lengths.max()}

    def after_rollout(self, batch: Batch, samples: dict[str, Any], rewards: Tensor) -> None:
        """Every `samples_every` batches, a text table of the first prompts' completions and rewards, as an MLflow
        artifact."""
        batch_index = batch.step // self.cfg.num_iterations
        if not (dist.is_main() and batch.rows.start == 0 and batch_index % self.cfg.samples_every == 0):
            return
        step, texts = batch_index * self.cfg.num_iterations, samples["texts"]
        lines = [f"step {step}: completions and rewards"]
        for row, i in enumerate(batch.inputs.tolist()[:4]):
            example = self.examples[i]
            lines.append(f"\nprompt {example.prompt!r} answer {example.answer!r}")
            G = self.cfg.group_size
            lines += [f"  {rewards[row, j].item():.2f}  {texts[row * G + j]!r}" for j in range(G)]
        self.tracker.log_text("\n".join(lines) + "\n", f"samples/step_{step:05d}.txt")


class ARPolicy(TextPolicy):
    """An autoregressive task model: exact teacher-forced log-probs, the same at every update of a batch."""

    objective = "ar"

    def token_logps(self, model: nn.Module, prompt_ids: Tensor, real: Tensor, completions: Tensor,
                    samples: dict[str, Any], iteration: int) -> tuple[Tensor, Tensor]:
        return ar_token_logps(model, prompt_ids, real, completions, temperature=self.cfg.temperature)


class MDMPolicy(TextPolicy):
    """A masked diffusion task model: d1's one-pass estimate, under a new prompt mask at each update of a batch
    (drawn from `mask_seeds`, so the old policy's and the reference's log-probs of that update use the same one);
    with `prompt_mask_prob` 0 the estimate is the same at every update."""

    objective = "mdm"

    def __init__(self, cfg: TextRLParams, *args: Any, **kwargs: Any) -> None:
        super().__init__(cfg, *args, **kwargs)
        self.varies_by_iteration = cfg.prompt_mask_prob > 0

    def sample(self, model: nn.Module, batch: Batch) -> Rollout:
        rollout = super().sample(model, batch)
        seed = self.sample_seed(batch)
        rollout.samples["mask_seeds"] = torch.tensor([step_seed(seed, i) for i in range(self.cfg.num_iterations)])
        return rollout

    def token_logps(self, model: nn.Module, prompt_ids: Tensor, real: Tensor, completions: Tensor,
                    samples: dict[str, Any], iteration: int) -> tuple[Tensor, Tensor]:
        return mdm_token_logps(model, prompt_ids, real, completions, mask_id=unwrap(model).mask_id,
                               prompt_mask_prob=self.cfg.prompt_mask_prob,
                               mask_seed=int(samples["mask_seeds"][iteration]), temperature=self.cfg.temperature)


POLICIES: dict[str, type[TextPolicy]] = {"ar": ARPolicy, "mdm": MDMPolicy}


class NoAcceptedCompletions(ValueError):
    """RFT was asked to train on a batch in which the checker accepted no completion."""


def completion_rows(prompt_ids: Tensor, real: Tensor, completions: Tensor, eos_id: int) -> tuple[Tensor, Tensor]:
    """Left-padded prompts (n, P) with key mask `real` and their completions (n, A) -> SFT rows (n, P + A) and their
    `ROLE`s: padding, prompt, the completion up to its first ``<eos>`` (answer) and the fill after it, as
    `rollout.encode_examples` lays out a labelled example."""
    prompt_roles = torch.where(real, ROLE.PROMPT, ROLE.PAD)
    completion_roles = torch.where(completion_mask(completions, eos_id), ROLE.ANSWER, ROLE.FILL)
    return torch.cat([prompt_ids, completions], dim=1), torch.cat([prompt_roles, completion_roles], dim=1)


class RFTTrainer(Trainer[TextRLParams]):
    """Rejection-sampling finetuning (RFT, expert iteration), GRPO's control at the same sample budget.

    Each step takes the same `batch_size` rl prompts as GRPO, samples `group_size` completions of each from the
    current model with the policy's sampler, keeps those the checker accepts and takes one step of the objective's
    SFT loss on them (`Objective.sft_loss`: the completion tokens for `ar`, LLaDA's SFT with the prompt never
    masked for `mdm`). References: Yuan et al. 2023, "Scaling Relationship on Learning Mathematical Reasoning with
    Large Language Models" (RFT, https://arxiv.org/abs/2308.01825); Anthony et al. 2017, expert iteration.

    Raises:
        NoAcceptedCompletions: a micro-batch with no accepted completion (nothing to finetune on), naming the step.
    """

    def __init__(self, model: TransformerLM, cfg: TextRLParams, inputs: np.ndarray, *, policy: TextPolicy,
                 mdm_eps: float, **kwargs: Any) -> None:
        super().__init__(model, cfg, inputs, hooks=[ExpertBalancer(model)], **kwargs)
        self.policy, self.stage, self.unit = policy, cfg.section, policy.unit
        self.strategy, self.mdm_eps = resolve_objective(policy.objective), mdm_eps

    def train_mode(self) -> None:
        self.model.eval()  # as GRPO: the model that samples is the model that is updated

    def compute_loss(self, batch: Batch) -> dict[str, Tensor]:
        samples = self.policy.sample(self.forward_model, batch).samples
        accepted = samples["right"].bool()  # (b * G,)
        if not accepted.any():
            raise NoAcceptedCompletions(
                f"{self.stage}: step {batch.step + 1}: the checker accepted none of the {accepted.numel()} "
                f"completions ({len(batch.inputs)} prompts x text_rl.group_size={self.cfg.group_size}), so RFT has "
                "nothing to finetune on; start from a model that solves some rl prompts, or raise "
                "text_rl.group_size or text_rl.batch_size")
        prompt_ids, real = self.policy.prompts(batch)
        ids, roles = completion_rows(prompt_ids[accepted], real[accepted], samples["completions"][accepted],
                                     self.policy.task["eos_id"])
        kept = int(accepted.sum())  # the SFT rows of this micro-batch: their mdm masks come from the step's seed
        rows = Batch(ids, None, slice(0, kept), kept, torch.Generator().manual_seed(batch.generator.initial_seed()),
                     batch.step)
        out = self.strategy.sft_loss(self.forward_model, rows, ids, key_mask=roles != ROLE.PAD,
                                     answer=roles == ROLE.ANSWER, response=roles >= ROLE.ANSWER,
                                     mask_id=unwrap(self.model).mask_id, eps=self.mdm_eps)
        rewards = self.policy.rewards(batch, samples)
        group_std = rewards.std(dim=1)
        return {**out, "reward": rewards.mean(), "reward_std": group_std.mean(),
                "frac_reward_zero_std": (group_std == 0).float().mean(),
                **self.policy.metrics(batch, samples, LogProbs(rewards))}


Method = Callable[..., Trainer[TextRLParams]]


def _grpo(shuffle: bool) -> Method:
    def build(model: TransformerLM, cfg: TextRLParams, policy: TextPolicy, *, reference: TransformerLM,
              mdm_eps: float, **kwargs: Any) -> Trainer[TextRLParams]:
        return GRPOTrainer(model, cfg, np.arange(len(policy.examples)), policy=policy, reference=reference,
                           shuffle_rewards=shuffle, hooks=[ExpertBalancer(model)], **kwargs)
    return build


def _rft(model: TransformerLM, cfg: TextRLParams, policy: TextPolicy, *, reference: TransformerLM,
         mdm_eps: float, **kwargs: Any) -> Trainer[TextRLParams]:
    return RFTTrainer(model, cfg, np.arange(len(policy.examples)), policy=policy, mdm_eps=mdm_eps, **kwargs)


# `text_rl.method` -> the trainer: GRPO, and its two controls at the same prompts, group size and steps.
METHODS: dict[str, Method] = {"grpo": _grpo(shuffle=False), "shuffled": _grpo(shuffle=True), "rft": _rft}
METHOD_NAMES = {"grpo": "GRPO", "shuffled": "GRPO on shuffled rewards", "rft": "RFT"}


def post_trainer(model: TransformerLM, cfg: TextRLParams, prompt_ids: np.ndarray, real: np.ndarray,
                 examples: Sequence[Example], *, reference: TransformerLM, objective: str, tokenizer: SpecialTokens,
                 checker: Checker, task: dict[str, Any], tracker: Tracker, mdm_eps: float = 1.0e-3,
                 **kwargs: Any) -> Trainer[TextRLParams]:
    """The trainer of `text_rl.method` (`METHODS`) for a task model on the rl prompts, with the policy of its
    objective (`POLICIES`); GRPO is anchored to `reference`, the frozen SFT model; RFT's `mdm` SFT loss masks with
    at least `mdm_eps` (`text_sft.mdm_eps`); `kwargs` are the base trainer's. The model's mixture-of-experts
    layers, if any, keep their balance (`ExpertBalancer`)."""
    if objective not in POLICIES:
        raise ValueError(f"objective={objective!r}: expected one of {sorted(POLICIES)}")
    policy = POLICIES[objective](cfg, prompt_ids, real, examples, tokenizer=tokenizer, checker=checker, task=task,
                                 tracker=tracker)
    return METHODS[cfg.method](model, cfg, policy, reference=reference, mdm_eps=mdm_eps, tracker=tracker, **kwargs)


@dataclass(frozen=True)
class TextRLPaths:
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


def fingerprint(params: TextParams, paths: TextRLPaths, objective: str) -> str:
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


def enough_signal(probe: dict[str, float], cfg: TextRLParams) -> bool:
    """Whether GRPO should train: at least `text_rl.min_signal` of the probe's groups got unequal rewards (with
    `min_signal` 0, always; `check_signal` then refuses a probe without any signal)."""
    signal = 1.0 - probe["frac_reward_zero_std"]
    return signal >= cfg.min_signal or math.isclose(signal, cfg.min_signal)  # a share is a float


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


def check_inputs(params: TextParams, paths: TextRLPaths, objective: str) -> None:
    """The params that only the task data decides, checked by the stage before its MLflow run from the task
    files and the SFT model's config.json: `text_rl.batch_size` against the rl prompts (and the processes).

    Raises:
        ConfigError: naming the key; FileNotFoundError, ValueError: missing or wrong inputs.
    """
    check_task_model(json.loads((Path(paths.sft) / CONFIG_FILE).read_text()), paths.sft, objective)
    check_batch_size(params.text_rl, len(read_task(paths.task).splits["rl"]), "rl prompts")


def run_text_rl(params: TextParams, paths: TextRLPaths, objective: str, tracker: Tracker,
                device: torch.device) -> dict[str, Any]:
    """Post-train the SFT model on the rl split with `text_rl.method` (resuming a matching checkpoint); rank 0 writes
    the model, the curves and the metrics, and registers the model."""
    cfg = params.text_rl
    data = read_task(paths.task)
    model, tokenizer, config = load_lm(paths.sft, device)
    check_task_model(config, paths.sft, objective)
    task = config["task"]
    examples = data.splits["rl"]
    probe = probe_signal(model, objective, tokenizer, examples, data.checker, task, cfg, params.seed)
    train = enough_signal(probe, cfg)
    if train:
        check_signal(probe, cfg)
    ids, real = encode_prompts([e.prompt for e in examples], tokenizer, task["prompt_len"])
    trainer = post_trainer(model, cfg, ids, real, examples, reference=copy.deepcopy(model), objective=objective,
                           tokenizer=tokenizer, checker=data.checker, task=task, tracker=tracker, device=device,
                           mdm_eps=params.text_sft.mdm_eps,
                           seed=params.seed, checkpoint_dir=paths.checkpoints,
                           fingerprint=fingerprint(params, paths, objective))
    signal = (f"probe pass rate {probe['pass_rate']:.3f}, {1 - probe['frac_reward_zero_std']:.0%} of "
              f"{probe['prompts']} groups with signal")
    if dist.is_main():
        print(f"text_rl: {METHOD_NAMES[cfg.method]} of {objective} on {len(examples)} rl prompts, G={cfg.group_size}, "
              f"reward {cfg.reward}, "
              + (f"{trainer.total_steps} steps, lr {trainer.lr:.2e}; {signal}" if train else
                 f"not trained: {signal}, below text_rl.min_signal={cfg.min_signal}; the SFT weights pass through"))
    started = time.perf_counter()
    steps, resumed_from, history = 0, 0, []
    if train:
        result = trainer.fit()
        steps, resumed_from, history = result.steps, result.resumed_from, result.history
    if not dist.is_main():
        return {}
    first, last = (history[0], history[-1]) if history else ({}, {})
    summary = {"rl_seconds": round(time.perf_counter() - started, 2), "steps": steps, "trained": train,
               "resumed_from_step": resumed_from, "probe": probe,
               "first": {k: first[k] for k in ("reward", "accuracy", "kl") if k in first},
               "last": {k: last[k] for k in ("reward", "accuracy", "kl", "entropy", "clip_ratio") if k in last}}
    write_outputs(params, paths, objective, trainer, tokenizer, config, summary, tracker)
    return summary


def write_outputs(params: TextParams, paths: TextRLPaths, objective: str, trainer: GRPOTrainer[TextRLParams],
                  tokenizer: SpecialTokens, config: dict[str, Any], summary: dict[str, Any], tracker: Tracker) -> None:
    """Model folder, curves and metrics, staged and renamed into place; the model is registered with lineage to
    the SFT version (and through it the pretrained one)."""
    from pipeline_lib.core.outputs import write_csv

    sft = upstream_model(paths.sft, weights_digest(paths.sft))
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
        headline=f"{METHOD_NAMES[params.text_rl.method]} reward on the rl batches "
                 f"{first.get('reward', float('nan')):.3f} -> {last.get('reward', float('nan')):.3f} in "
                 f"{summary['steps']} steps (text_rl@{objective}); "
                 "text_task_evaluate replaces this line with the test exact match",
        started_from=model_uri(sft["model_name"], sft["model_version"]))
    write_run_record(paths.out / "run.json", tracker, objective=objective,
                     model_name=params.tracking.task_name(objective), model_version=version)
    write_json_atomic(paths.metrics, summary)
