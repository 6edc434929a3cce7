"""GRPO of text task models: per-token log-probs against hand recomputation, the shared GRPO objective on
per-token inputs, pass@k and the task evaluation, the learning-signal check, a fixed-seed run that raises the
expected reward, and resuming between a batch's updates."""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline_lib.core.errors import ConfigError
from pipeline_lib.core.grpo import GRPOTrainer, group_advantages, grpo_loss, k3_kl
from pipeline_lib.core.tracking import Tracker
from pipeline_lib.params import params_from_dict
from pipeline_lib.text.config import TextRLParams
from pipeline_lib.text.data.checkers import CHECKERS
from pipeline_lib.text.data.tasks import Example
from pipeline_lib.text.data.tokenizer import CharTokenizer
from pipeline_lib.text.losses import mdm_corrupt, sft_ar_loss, sft_mdm_loss
from pipeline_lib.text.models.transformer import TransformerLM, grow_vocab
from pipeline_lib.text.rewards import accuracy_reward, format_reward
from pipeline_lib.text.rl import (
    METHODS,
    POLICIES,
    ARPolicy,
    MDMPolicy,
    NoAcceptedCompletions,
    NoLearningSignal,
    RFTTrainer,
    ar_token_logps,
    check_signal,
    completion_rows,
    enough_signal,
    mdm_token_logps,
    post_trainer,
    probe_signal,
    reward_of,
)
from pipeline_lib.text.rollout import (
    EOS,
    ROLE,
    SPECIALS,
    complete,
    decode_completions,
    encode_examples,
    encode_prompts,
    task_tokenizer,
)
from pipeline_lib.text.task_evaluate import evaluate_task_model, maj_at_k, majority_right, pass_at_k, sample_ks

TOKENIZER = task_tokenizer(CharTokenizer.fit("0123456789+=", vocab_size=0))
EOS_ID = TOKENIZER.token_id(EOS)
NUMERIC = CHECKERS["numeric"]
# Every one-digit addition, in a fixed shuffled order: 81 prompts of 4 tokens, completions of at most 5 tokens.
ADDITIONS = [Example(f"{a}+{b}=", str(a + b)) for a in range(1, 10) for b in range(1, 10)]
np.random.default_rng(0).shuffle(ADDITIONS)
PROMPT_LEN, ANSWER_TOKENS = 4, 5
TASK = {"eos_id": EOS_ID, "prompt_len": PROMPT_LEN, "answer_tokens": ANSWER_TOKENS}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def task_model(objective: str, seed: int = 0, d_model: int = 16) -> TransformerLM:
    torch.manual_seed(seed)
    model = TransformerLM(TOKENIZER.base.vocab_size, d_model=d_model, n_layer=2, n_head=2, max_len=16,
                          causal=objective == "ar", mask_token=objective == "mdm")
    return grow_vocab(model, len(SPECIALS)).eval()


def rl_params(**text_rl: Any) -> TextRLParams:
    return params_from_dict({"text_rl": text_rl}).text_rl


def left_padded_batch(prompts: Sequence[str], completions_seed: int, answer_tokens: int = 5) -> tuple[Tensor, ...]:
    """Prompts of unequal length, left-padded to the longest, and random completions (some <eos> inside)."""
    ids, real = (torch.from_numpy(a) for a in encode_prompts(list(prompts), TOKENIZER, max(map(len, prompts))))
    generator = torch.Generator().manual_seed(completions_seed)
    completions = torch.randint(0, TOKENIZER.vocab_size, (len(prompts), answer_tokens), generator=generator)
    return ids, real, completions


PROMPTS = ["1+2=", "12+34=", "5=", "123+4=", "7+7="]


# --------------------------------------------------------------------------------------- per-token log-probs


def test_ar_token_logps_equal_teacher_forcing_on_each_unpadded_sequence() -> None:
    model = task_model("ar", seed=1)
    ids, real = (torch.from_numpy(a) for a in encode_prompts(PROMPTS, TOKENIZER, 6))
    completions = complete(model, "ar", ids, real, answer_tokens=5, temperature=1.0, block_length=5, eos_id=EOS_ID,
                           generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logp, entropy = ar_token_logps(model, ids, real, completions, temperature=1.0)
    assert logp.shape == entropy.shape == completions.shape
    for row in range(len(PROMPTS)):
        prompt = ids[row][real[row]]  # (p,) without the padding
        sequence = torch.cat([prompt, completions[row]])[None]  # (1, p + A)
        with torch.no_grad():
            log_probs = F.log_softmax(model(sequence[:, :-1])[0].double(), dim=-1)[len(prompt) - 1 :]  # (A, V)
        expected = log_probs.gather(-1, completions[row][:, None]).squeeze(-1)
        assert torch.allclose(logp[row].double(), expected, atol=1e-5), PROMPTS[row]
        expected_entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
        assert torch.allclose(entropy[row].double(), expected_entropy, atol=1e-5)
    assert (logp <= 0).all() and (entropy >= 0).all()


def recorded_inputs(model: TransformerLM) -> tuple[list[Tensor], Any]:
    seen: list[Tensor] = []
    hook = model.register_forward_pre_hook(lambda _, args, kwargs: seen.append(args[0].clone()), with_kwargs=True)
    return seen, hook


def test_mdm_token_logps_mask_the_completion_and_follow_the_seed() -> None:
    model = task_model("mdm", seed=2)
    ids, real, completions = left_padded_batch(PROMPTS * 4, completions_seed=3)
    P = ids.shape[1]
    options = {"mask_id": model.mask_id, "temperature": 1.0}
    seen, hook = recorded_inputs(model)
    try:
        with torch.no_grad():
            a, _ = mdm_token_logps(model, ids, real, completions, prompt_mask_prob=0.5, mask_seed=7, **options)
            b, _ = mdm_token_logps(model, ids, real, completions, prompt_mask_prob=0.5, mask_seed=7, **options)
            c, _ = mdm_token_logps(model, ids, real, completions, prompt_mask_prob=0.5, mask_seed=8, **options)
            d, _ = mdm_token_logps(model, ids, real, completions, prompt_mask_prob=0.0, mask_seed=7, **options)
            e, _ = mdm_token_logps(model, ids, real, completions, prompt_mask_prob=0.0, mask_seed=8, **options)
    finally:
        hook.remove()
    assert torch.equal(a, b)  # the same seed: the same prompt mask, the same log-probs
    assert not torch.allclose(a, c)  # another seed masks other prompt tokens
    assert torch.equal(d, e)  # nothing of the prompt masked: the seed is not used
    for inputs in seen:
        assert (inputs[:, P:] == model.mask_id).all()  # the whole completion is masked
        assert torch.equal(inputs[:, :P][~real], ids[~real])  # padding is never masked
        hidden = inputs[:, :P] == model.mask_id
        assert torch.equal(inputs[:, :P][~hidden], ids[~hidden])  # prompt tokens are kept or masked, nothing else
    assert torch.equal(seen[0], seen[1]) and not torch.equal(seen[0], seen[2])
    share = (seen[0][:, :P] == model.mask_id)[real].float().mean().item()
    assert 0.3 < share < 0.7  # prompt_mask_prob 0.5 of the real prompt tokens
    assert torch.equal(seen[3][:, :P], ids)


# ------------------------------------------------------------- the shared GRPO objective on per-token inputs

# The reference values of tests/losses/test_grpo_objective.py: test_group_advantages_by_hand's rewards and advantages
REWARDS = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
STD0 = math.sqrt(((0.5**2) * 4) / 3)
ADVANTAGES = torch.tensor([[0.5 / STD0, -0.5 / STD0, -0.5 / STD0, 0.5 / STD0], [0.5, 0.5, 0.5, -1.5]])
UNSCALED = torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.25, 0.25, 0.25, -0.75]])
# and test_clipped_objective_by_hand's table at epsilon 0.2: (ratio, advantage, loss per token, clipped)
CLIP_TABLE = [(1.5, 2.0, -2.4, True), (0.5, 2.0, -1.0, False), (0.5, -2.0, 1.6, True), (1.5, -2.0, 3.0, False)]


def padded_mask(lengths: list[list[int]], width: int) -> Tensor:
    """(B, G) completion lengths -> (B, G, width) bool, the first `length` tokens of each completion."""
    return torch.arange(width) < torch.tensor(lengths)[..., None]


def test_group_advantages_per_token_weigh_by_length_and_ignore_padding() -> None:
    assert torch.allclose(group_advantages(REWARDS, eps=0.0), ADVANTAGES, atol=1e-6)
    assert torch.allclose(group_advantages(REWARDS, scale="none"), UNSCALED)
    lengths = [[1, 2, 3, 4], [4, 3, 2, 1]]
    mask = padded_mask(lengths, 5)  # (2, 4, 5)
    old = torch.log(torch.full((2, 4, 5), 0.3))
    # ratio 1 on the completion's tokens, 3 on padding (which would count -3 A per token if it were read)
    logp = torch.where(mask, old, old + math.log(3.0)).requires_grad_()
    n = torch.tensor(lengths, dtype=torch.float32)
    for advantages in (ADVANTAGES, UNSCALED):
        token = grpo_loss(logp, old, advantages, mask=mask, aggregation="token")
        assert token["loss"].item() == pytest.approx(float(-(advantages * n).sum() / n.sum()), rel=1e-5)
        assert token["ratio"].item() == pytest.approx(1.0)
        sample = grpo_loss(logp, old, advantages, mask=mask, aggregation="sample")["loss"]
        assert sample.item() == pytest.approx(float(-advantages.mean()), abs=1e-6)  # 0: each group is centred
        (grad,) = torch.autograd.grad(token["loss"], logp)
        assert (grad[~mask] == 0).all()
        expected = -(advantages / n.sum())[..., None].expand(2, 4, 5)  # d loss / d logp at ratio 1
        assert torch.allclose(grad[mask], expected[mask], atol=1e-6)


def test_clipping_per_token_reproduces_the_hand_table() -> None:
    lengths = [[2, 3, 1, 2]]
    mask = padded_mask(lengths, 4)  # (1, 4, 4)
    old = torch.log(torch.full((1, 4, 4), 0.2))
    ratio = torch.tensor([row[0] for row in CLIP_TABLE])[None, :, None].expand(1, 4, 4)
    # padding tokens: ratio 1.5 with the completion's advantage; counted, they would change loss and clip ratio
    ratio = torch.where(mask, ratio, torch.full_like(ratio, 1.5))
    logp = (old + ratio.log()).requires_grad_()
    advantages = torch.tensor([[row[1] for row in CLIP_TABLE]])
    out = grpo_loss(logp, old, advantages, epsilon=0.2, mask=mask, aggregation="token")
    n = torch.tensor(lengths[0], dtype=torch.float32)
    per_token = torch.tensor([row[2] for row in CLIP_TABLE])
    clipped = torch.tensor([float(row[3]) for row in CLIP_TABLE])
    assert out["loss"].item() == pytest.approx(float((per_token * n).sum() / n.sum()), rel=1e-5)
    assert out["clip_ratio"].item() == pytest.approx(float((clipped * n).sum() / n.sum()), rel=1e-6)
    sample = grpo_loss(logp, old, advantages, epsilon=0.2, mask=mask, aggregation="sample")
    assert sample["loss"].item() == pytest.approx(float(per_token.mean()), rel=1e-5)
    (grad,) = torch.autograd.grad(out["loss"], logp)
    for j, (_, _, _, was_clipped) in enumerate(CLIP_TABLE):
        real = grad[0, j][mask[0, j]]
        assert ((real == 0) if was_clipped else (real != 0)).all(), j  # the clipped branch carries no gradient
    assert (grad[~mask] == 0).all()
    # clip-higher: epsilon_high 0.28 leaves ratio 1.25 inside the range (-2.5 per token, unclipped)
    high_old = torch.log(torch.full((1, 1, 3), 0.2))
    high = grpo_loss(high_old + math.log(1.25), high_old, torch.tensor([[2.0]]), epsilon=0.2, epsilon_high=0.28,
                     mask=torch.tensor([[[True, True, False]]]))
    assert high["loss"].item() == pytest.approx(-2.5, rel=1e-5) and high["clip_ratio"].item() == 0.0


def test_kl_per_token_is_beta_times_k3_over_the_completion() -> None:
    # test_kl_penalty_adds_beta_times_k3's tokens: policy 0.5 and 0.25 against a reference at 0.25, 0.25
    logp = torch.log(torch.tensor([[[0.5, 0.25, 0.9]]]))
    ref = torch.log(torch.tensor([[[0.25, 0.25, 0.01]]]))  # the third token is padding, far from the reference
    mask = torch.tensor([[[True, True, False]]])
    kl = k3_kl(logp, ref)
    k3 = (0.5 - math.log(0.5) - 1) / 2  # the mean over the two real tokens (the second is 0)
    out = grpo_loss(logp, logp, torch.zeros(1, 1), kl=kl, beta=0.5, mask=mask)
    assert out["kl"].item() == pytest.approx(k3, rel=1e-5)
    assert out["loss"].item() == pytest.approx(0.5 * k3, rel=1e-5)
    assert grpo_loss(logp, logp, torch.zeros(1, 1), kl=kl, beta=0.0, mask=mask)["loss"].item() == 0.0


# ----------------------------------------------------------------------------------------------- pass@k


def brute_pass_at_k(n: int, c: int, k: int) -> float:
    """The share of the k-subsets of n samples (the first c right) holding a right one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in subset) for subset in subsets) / len(subsets)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_ar_scores_completions_under_the_distribution_the_sampler_draws_from(temperature: float) -> None:
    """The sampler draws each token from softmax(logits / T) of the prefix; the log-probs GRPO's ratio, KL and
    gradient use are those of that distribution, not of softmax(logits)."""
    model = task_model("ar", seed=5)
    ids, real = (torch.from_numpy(a) for a in encode_prompts(PROMPTS, TOKENIZER, 6))
    completions = complete(model, "ar", ids, real, answer_tokens=5, temperature=temperature, block_length=5,
                           eos_id=EOS_ID, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logp, entropy = ar_token_logps(model, ids, real, completions, temperature=temperature)
        sequence, key_mask = torch.cat([ids, completions], dim=1), torch.cat([real, torch.ones_like(real[:, :5])], 1)
        for t in range(5):  # the sampler's own step: the last position's logits of the prefix, over T
            prefix = ids.shape[1] + t
            logits = model(sequence[:, :prefix], key_mask=key_mask[:, :prefix])[:, -1].double()
            drawn_from = F.log_softmax(logits / temperature, dim=-1)  # (B, V)
            expected = drawn_from.gather(1, completions[:, t : t + 1]).squeeze(1)
            assert torch.allclose(logp[:, t].double(), expected, atol=1e-5), t
            assert torch.allclose(entropy[:, t].double(), -(drawn_from.exp() * drawn_from).sum(-1), atol=1e-5), t
            if temperature != 1.0:  # the untempered log-probs belong to another policy
                assert not torch.allclose(logp[:, t].double(), F.log_softmax(logits, dim=-1).gather(
                    1, completions[:, t : t + 1]).squeeze(1), atol=1e-3)


def test_mdm_scores_the_masked_completion_at_the_sampling_temperature() -> None:
    model = task_model("mdm", seed=6)
    ids, real, completions = left_padded_batch(PROMPTS, completions_seed=4)
    options = {"mask_id": model.mask_id, "prompt_mask_prob": 0.0, "mask_seed": 0}
    with torch.no_grad():
        cold, _ = mdm_token_logps(model, ids, real, completions, temperature=0.5, **options)
        sequence = torch.cat([ids, torch.full_like(completions, model.mask_id)], dim=1)
        key_mask = torch.cat([real, torch.ones_like(completions, dtype=torch.bool)], dim=1)
        logits = model(sequence, key_mask=key_mask)[:, ids.shape[1] :].double()  # the sampler's first step
    expected = F.log_softmax(logits / 0.5, dim=-1).gather(-1, completions[..., None]).squeeze(-1)
    assert torch.allclose(cold.double(), expected, atol=1e-5)


def test_majority_vote_and_the_k_of_the_sample_metrics() -> None:
    example = Example("7+8=", "15")
    right, wrong, other, malformed = "<answer>15</answer>", "<answer>14</answer>", "<answer>16</answer>", "15"
    assert majority_right([wrong, right, right], example, NUMERIC)
    assert not majority_right([wrong, right, other, wrong], example, NUMERIC)
    assert majority_right([right, wrong], example, NUMERIC)  # a tie goes to the answer seen first
    assert not majority_right([wrong, right], example, NUMERIC)
    assert majority_right([malformed, malformed, right], example, NUMERIC)  # a malformed sample does not vote
    assert not majority_right([malformed], example, NUMERIC)
    samples = [right, wrong, wrong, wrong, right, right, malformed, wrong]
    assert maj_at_k(samples, example, NUMERIC, 1) == pytest.approx(3 / 8)  # maj@1 is the share right
    assert maj_at_k(samples, example, NUMERIC, 2) == pytest.approx(2 / 4)  # runs (r,w) (w,w) (r,r) (m,w)
    assert maj_at_k(samples, example, NUMERIC, 4) == pytest.approx(1 / 2)  # (r,w,w,w) wrong, (r,r,m,w) right
    assert maj_at_k(samples, example, NUMERIC, 8) == 0.0  # wrong 4 times, right 3
    with pytest.raises(ValueError, match="k=9"):
        maj_at_k(samples, example, NUMERIC, 9)
    assert sample_ks(16) == [1, 2, 4, 8, 16] and sample_ks(12) == [1, 2, 4, 8, 12] and sample_ks(1) == [1]


def test_pass_at_k_by_hand() -> None:
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3, 2) / C(5, 2) = 1 - 3 / 10
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the share right
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 1, 4) == 1.0  # k = n: any right sample
    assert pass_at_k(4, 3, 2) == 1.0  # fewer than k wrong samples: always a right one
    for n in range(1, 7):
        for c, k in itertools.product(range(n + 1), range(1, n + 1)):
            assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k)), (n, c, k)
    for n, c, k in [(4, 5, 1), (4, -1, 1), (4, 1, 0), (4, 1, 5)]:
        with pytest.raises(ValueError, match="need 0 <= c"):
            pass_at_k(n, c, k)


@pytest.mark.parametrize("objective", ["ar", "mdm"])
def test_evaluate_task_model_scores_greedy_completions_and_samples(objective: str) -> None:
    model = sft(task_model(objective, seed=4), ADDITIONS[:40], steps=20 if objective == "ar" else 40)
    examples = ADDITIONS[40:52]
    metrics, rows = evaluate_task_model(model, objective, TOKENIZER, examples, NUMERIC, TASK, pass_k=4,
                                        temperature=1.0, block_length=ANSWER_TOKENS, seed=0)
    ids, real = (torch.from_numpy(a) for a in encode_prompts([e.prompt for e in examples], TOKENIZER, PROMPT_LEN))
    greedy = decode_completions(complete(model, objective, ids, real, answer_tokens=ANSWER_TOKENS, temperature=0.0,
                                         block_length=ANSWER_TOKENS, eos_id=EOS_ID, generator=None), TOKENIZER, EOS_ID)
    assert [row["greedy"] for row in rows] == greedy  # one batch of greedy completions
    right = [accuracy_reward(text, e, NUMERIC) for text, e in zip(greedy, examples, strict=True)]
    assert [row["right"] for row in rows] == [bool(r) for r in right]
    assert metrics["accuracy"] == pytest.approx(np.mean(right))
    assert metrics["format_rate"] == pytest.approx(np.mean([format_reward(text) for text in greedy]))
    counts = [row["right_samples"] for row in rows]
    assert metrics["pass_at_1"] == pytest.approx(np.mean(counts) / 4)
    assert metrics["pass_at_4"] == pytest.approx(np.mean([c > 0 for c in counts]))
    assert set(metrics) >= {"pass_at_2", "maj_at_1", "maj_at_2", "maj_at_4", "sampled_format_rate"}
    assert metrics["maj_at_1"] == pytest.approx(metrics["pass_at_1"])  # one sample's vote is the sample
    assert metrics["pass_at_1"] <= metrics["pass_at_2"] <= metrics["pass_at_4"]
    assert 0 < metrics["sampled_format_rate"] <= 1
    assert metrics["format_rate"] > 0  # the short SFT taught the format: the comparisons above are not all empty


# -------------------------------------------------------------------------------------- rewards and signal


def test_reward_of_follows_the_declared_rule() -> None:
    example = Example("7+8=", "15")
    right, wrong, malformed = "<answer>15</answer>", "<answer>14</answer>", "15"
    for reward, expected in [("accuracy", (1.0, 0.0, 0.0)), ("format", (1.0, 1.0, 0.0)),
                             ("combined", (1.0, 0.25, 0.0))]:
        cfg = rl_params(reward=reward, format_score=0.25)
        assert tuple(reward_of(cfg, text, example, NUMERIC) for text in (right, wrong, malformed)) == expected, reward


def test_enough_signal_is_the_share_of_groups_with_unequal_rewards() -> None:
    probe = {"reward": 0.1, "pass_rate": 0.05, "prompts": 64}
    at = {share: {**probe, "frac_reward_zero_std": 1 - share} for share in (0.0, 0.05, 0.1, 0.5)}
    assert [enough_signal(at[s], rl_params(min_signal=0.1)) for s in (0.0, 0.05, 0.1, 0.5)] == [
        False, False, True, True]
    assert all(enough_signal(p, rl_params(min_signal=0.0)) for p in at.values())  # 0: always train
    assert not enough_signal(at[0.5], rl_params(min_signal=1.0))


def test_check_signal_refuses_a_probe_without_signal(capsys: pytest.CaptureFixture[str]) -> None:
    cfg = rl_params(group_size=8)
    probe = {"reward": 0.0, "pass_rate": 0.0, "prompts": 64}
    with pytest.raises(NoLearningSignal, match=r"text_rl\.group_size=8") as caught:
        check_signal({**probe, "frac_reward_zero_std": 1.0}, cfg)
    assert isinstance(caught.value, ValueError)
    check_signal({**probe, "frac_reward_zero_std": 0.5}, cfg)
    assert capsys.readouterr().out == ""
    check_signal({**probe, "frac_reward_zero_std": 0.95}, cfg)
    assert "warning" in capsys.readouterr().out


# ------------------------------------------------------------------------------------- the GRPO trainer


def sft(model: TransformerLM, examples: Sequence[Example], steps: int) -> TransformerLM:
    """A few full-batch Adam steps of SFT (answer tokens for AR, LLaDA's SFT for MDM), so the model sometimes
    writes a well-formed answer."""
    rows = encode_examples(examples, TOKENIZER, prompt_len=PROMPT_LEN, answer_tokens=ANSWER_TOKENS, split="train")
    ids, roles = torch.from_numpy(rows.ids), torch.from_numpy(rows.roles)
    real, response = roles != ROLE.PAD, roles >= ROLE.ANSWER
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        if model.causal:
            loss = sft_ar_loss(model(ids[:, :-1], key_mask=real[:, :-1]), ids, roles == ROLE.ANSWER)
        else:
            _, masked, p = mdm_corrupt(torch.zeros_like(ids), mask_id=model.mask_id, generator=generator)
            masked &= response
            logits = model(ids.masked_fill(masked, model.mask_id), key_mask=real)
            loss = sft_mdm_loss(logits, ids, masked, p, response)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def text_trainer(model: TransformerLM, objective: str, cfg: TextRLParams, examples: Sequence[Example],
                 checkpoints: Path) -> GRPOTrainer[TextRLParams]:
    """Constructed as `run_text_rl` does, with a no-op tracker."""
    ids, real = encode_prompts([e.prompt for e in examples], TOKENIZER, PROMPT_LEN)
    return post_trainer(model, cfg, ids, real, examples, reference=copy.deepcopy(model), objective=objective,
                        tokenizer=TOKENIZER, checker=NUMERIC, task=TASK, tracker=Tracker(), device=torch.device("cpu"),
                        seed=0, checkpoint_dir=checkpoints, fingerprint="test")


@torch.no_grad()
def expected_format_reward(model: TransformerLM, examples: Sequence[Example], samples: int) -> float:
    """Monte Carlo estimate of the expected format reward at temperature 1, with a fixed generator."""
    model.eval()
    ids, real = (torch.from_numpy(a).repeat_interleave(samples, dim=0)
                 for a in encode_prompts([e.prompt for e in examples], TOKENIZER, PROMPT_LEN))
    out = complete(model, "ar", ids, real, answer_tokens=ANSWER_TOKENS, temperature=1.0, block_length=ANSWER_TOKENS,
                   eos_id=EOS_ID, generator=torch.Generator().manual_seed(123))
    return float(np.mean([format_reward(text) for text in decode_completions(out, TOKENIZER, EOS_ID)]))


def test_grpo_raises_the_expected_reward_in_a_fixed_seed_run(tmp_path: Path) -> None:
    sft_examples, rl_examples = ADDITIONS[:40], ADDITIONS[40:72]
    model = sft(task_model("ar", d_model=32), sft_examples, steps=20)
    cfg = rl_params(epochs=4, batch_size=8, group_size=8, lr=3.125e-3, beta=0.0, reward="format", temperature=1.0,
                    log_every=1, checkpoint_every=1000)
    probe = probe_signal(model, "ar", TOKENIZER, rl_examples, NUMERIC, TASK, cfg, seed=0)
    assert 0.0 < probe["frac_reward_zero_std"] < 1.0 and probe["prompts"] == len(rl_examples)
    check_signal(probe, cfg)
    before = expected_format_reward(model, rl_examples, samples=64)
    assert 0.2 < before < 0.8  # room to improve
    trainer = text_trainer(model, "ar", cfg, rl_examples, tmp_path)
    result = trainer.fit()
    assert result.steps == 16 and len(result.history) == 16
    after = expected_format_reward(model, rl_examples, samples=64)
    assert after > before + 0.1, (before, after)  # 2048 samples: the estimate's std error is about 0.01
    rewards = [h["reward"] for h in result.history]
    assert np.mean(rewards[-4:]) > np.mean(rewards[:4]), rewards
    # the KL to the reference is still measured (beta 0 only drops the penalty): 0 at first, then it grows
    assert result.history[0]["kl"] == pytest.approx(0.0, abs=1e-6) and result.history[-1]["kl"] > 1e-4


def test_probe_finds_no_signal_where_every_completion_fails() -> None:
    model = task_model("ar")  # random weights: never a right sum
    cfg = rl_params(reward="accuracy", group_size=4)
    probe = probe_signal(model, "ar", TOKENIZER, ADDITIONS[:8], NUMERIC, TASK, cfg, seed=0)
    assert probe["frac_reward_zero_std"] == 1.0 and probe["reward"] == 0.0
    with pytest.raises(NoLearningSignal, match=r"text_rl\.group_size=4"):
        check_signal(probe, cfg)


@pytest.mark.parametrize("objective", ["ar", "mdm"])
def test_two_updates_per_batch_change_the_parameters_and_start_at_ratio_one(objective: str, tmp_path: Path) -> None:
    start = sft(task_model(objective, seed=3), ADDITIONS[:40], steps=20 if objective == "ar" else 40)
    cfg = rl_params(epochs=1, batch_size=4, group_size=8, lr=1.5625e-3, beta=0.04, reward="format", temperature=1.0,
                    num_iterations=2, block_length=ANSWER_TOKENS, prompt_mask_prob=0.5, log_every=1,
                    checkpoint_every=1000)
    model = copy.deepcopy(start)
    trainer = text_trainer(model, objective, cfg, ADDITIONS[:4], tmp_path)
    assert type(trainer.policy) is POLICIES[objective] and trainer.stage == "text_rl"
    trainer.train_step(0)
    first = trainer.sampled["0:0"]
    assert first["completions"].shape == (4 * 8, ANSWER_TOKENS)
    assert (first["advantages"] != 0).any()  # some group got unequal rewards: there is a gradient
    # old and reference log-probs per update where the prompt mask changes (MDM), once where nothing does (AR)
    updates = 2 if objective == "mdm" else 1
    assert first["ref_logp"].shape == first["old_logp"].shape == (updates, 4, 8, ANSWER_TOKENS)
    trainer.train_step(1)
    assert trainer.sampled["0:0"] is first  # the second update reuses the batch's completions
    after = model.state_dict()
    for name, value in start.state_dict().items():
        assert not torch.equal(value, after[name]), f"{name} did not change in two steps"
    # the first update's old log-probs are the policy's own, under the same prompt mask (MDM): ratio 1, KL 0
    with torch.no_grad():
        fresh = text_trainer(copy.deepcopy(start), objective, cfg, ADDITIONS[:4], tmp_path / "again")
        out = fresh.compute_loss(next(iter(fresh.micro_batches(0))))
        assert out["ratio"].item() == pytest.approx(1.0, abs=1e-6)
        assert out["kl"].item() == pytest.approx(0.0, abs=1e-6)  # the policy is the reference at the start
        second = fresh.compute_loss(next(iter(fresh.micro_batches(1))))  # iteration 1, the policy unchanged
        assert second["ratio"].item() == pytest.approx(1.0, abs=1e-6)  # old log-probs under the same mask


def test_policies_by_objective_and_the_metrics_each_step_logs(tmp_path: Path) -> None:
    assert POLICIES["ar"] is ARPolicy and POLICIES["mdm"] is MDMPolicy and len(POLICIES) == 2
    assert not ARPolicy.varies_by_iteration

    def mdm(cfg: TextRLParams) -> MDMPolicy:
        return MDMPolicy(cfg, np.zeros((1, PROMPT_LEN), np.int64), np.ones((1, PROMPT_LEN), bool), ADDITIONS[:1],
                         tokenizer=TOKENIZER, checker=NUMERIC, task=TASK, tracker=Tracker())

    # the masked model's estimate changes between a batch's updates only where its prompt mask does
    assert mdm(rl_params(num_iterations=2, prompt_mask_prob=0.5)).varies_by_iteration
    assert not mdm(rl_params(num_iterations=2)).varies_by_iteration
    cfg = rl_params(epochs=1, batch_size=4, group_size=4, reward="combined", log_every=1, checkpoint_every=1000)
    with pytest.raises(ValueError, match="objective='gpt'"):
        text_trainer(task_model("ar"), "gpt", cfg, ADDITIONS[:4], tmp_path)
    history = text_trainer(task_model("ar"), "ar", cfg, ADDITIONS[:4], tmp_path).fit().history
    assert set(history[0]) >= {"loss", "kl", "clip_ratio", "ratio", "reward", "reward_std", "frac_reward_zero_std",
                               "accuracy", "entropy", "completion_length", "completion_length_min",
                               "completion_length_max", "grad_norm", "lr", "samples_per_second", "step_time"}


@pytest.mark.parametrize("objective", ["ar", "mdm"])
def test_resuming_between_two_updates_of_a_batch_matches_an_unbroken_run(objective: str, tmp_path: Path) -> None:
    """A checkpoint taken between a batch's updates carries its completions and old log-probs (`extra_state`)."""
    start = sft(task_model(objective, seed=3), ADDITIONS[:40], steps=20 if objective == "ar" else 40)
    cfg = rl_params(epochs=1, batch_size=4, group_size=8, lr=1.5625e-3, beta=0.04, reward="format", temperature=1.0,
                    num_iterations=2, block_length=ANSWER_TOKENS, prompt_mask_prob=0.5, log_every=1,
                    checkpoint_every=1)
    unbroken = text_trainer(copy.deepcopy(start), objective, cfg, ADDITIONS[:8], tmp_path / "unbroken")
    unbroken.fit()
    broken = text_trainer(copy.deepcopy(start), objective, cfg, ADDITIONS[:8], tmp_path / "broken")
    for step in range(3):  # batch 0's two updates and batch 1's first
        broken.train_step(step)
    broken.save_checkpoint(3)
    resumed = text_trainer(copy.deepcopy(start), objective, cfg, ADDITIONS[:8], tmp_path / "broken")
    assert resumed.fit().resumed_from == 3
    expected = unbroken.model.state_dict()
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, expected[name]), name


# ------------------------------------------------------------------------------- the controls: shuffled, RFT


def method_trainer(model: TransformerLM, objective: str, method: str, examples: Sequence[Example], root: Path,
                   **cfg: Any) -> Any:
    settings = {"epochs": 1, "batch_size": 4, "group_size": 8, "lr": 1.0e-3, "reward": "accuracy",
                "block_length": ANSWER_TOKENS, "log_every": 1, "checkpoint_every": 1000, **cfg}
    return text_trainer(model, objective, rl_params(method=method, **settings), examples, root)


def test_the_methods_are_grpo_and_its_two_controls() -> None:
    assert list(METHODS) == ["grpo", "shuffled", "rft"]
    with pytest.raises(ConfigError, match=r"text_rl\.method='sft'.*'grpo', 'shuffled', 'rft'"):
        rl_params(method="sft")


@pytest.mark.parametrize("objective", ["ar", "mdm"])
def test_the_shuffled_control_trains_on_a_permutation_of_the_batch_rewards(objective: str, tmp_path: Path) -> None:
    start = sft(task_model(objective, seed=3), ADDITIONS[:40], steps=20 if objective == "ar" else 40)
    real = method_trainer(copy.deepcopy(start), objective, "grpo", ADDITIONS[:8], tmp_path / "real", reward="format")
    shuffled = method_trainer(copy.deepcopy(start), objective, "shuffled", ADDITIONS[:8], tmp_path / "shuffled",
                              reward="format")
    real.train_step(0)
    assert torch.equal(real.sampled["0:0"]["completions"], shuffled.train_step(0) and
                       shuffled.sampled["0:0"]["completions"])  # the same samples at the same start
    for step in (0, 1):
        if step:
            shuffled.train_step(step)
        control, batch = shuffled.sampled[f"{step}:0"], next(iter(shuffled.micro_batches(step)))
        earned = shuffled.policy.rewards(batch, control)  # what the control's own samples earned
        assert torch.equal(torch.sort(earned.flatten()).values, torch.sort(control["rewards"].flatten()).values)
        assert not torch.equal(earned, control["rewards"]), step  # permuted across the batch
        assert torch.equal(control["advantages"], group_advantages(control["rewards"]))
    assert torch.equal(real.sampled["0:0"]["rewards"], shuffled.policy.rewards(
        next(iter(shuffled.micro_batches(0))), real.sampled["0:0"]))


def accepted_rows_seen(trainer: RFTTrainer, step: int) -> tuple[Tensor, dict[str, Any], dict[str, Tensor]]:
    """The rows of the one forward pass with gradients (the SFT loss) of `compute_loss` at `step`, the samples the
    policy drew for that step, and the loss."""
    batch = next(iter(trainer.micro_batches(step)))
    samples = trainer.policy.sample(trainer.model, batch).samples  # drawn from the step's seed: the same again
    seen: list[Tensor] = []
    hook = trainer.model.register_forward_pre_hook(
        lambda _, args, kwargs: seen.append(args[0].clone()) if torch.is_grad_enabled() else None, with_kwargs=True)
    try:
        out = trainer.compute_loss(batch)
    finally:
        hook.remove()
    assert len(seen) == 1
    return seen[0], samples, out


@pytest.mark.parametrize("objective", ["ar", "mdm"])
def test_rft_finetunes_on_the_completions_the_checker_accepts(objective: str, tmp_path: Path) -> None:
    start = sft(task_model(objective, seed=3, d_model=32), ADDITIONS, steps=60 if objective == "ar" else 200)
    trainer = method_trainer(copy.deepcopy(start), objective, "rft", ADDITIONS[:16], tmp_path, batch_size=8)
    assert isinstance(trainer, RFTTrainer) and trainer.stage == "text_rl"
    rows, samples, out = accepted_rows_seen(trainer, 0)
    right = samples["right"].bool()
    assert 0 < int(right.sum()) < right.numel()  # some completions right, some not: the filter is tested
    assert rows.shape[0] == int(right.sum())  # one SFT row per accepted completion
    completions = rows[:, PROMPT_LEN:] if objective == "mdm" else None
    ids, roles = completion_rows(*trainer.policy.prompts(next(iter(trainer.micro_batches(0)))),
                                 samples["completions"], EOS_ID)
    if objective == "ar":  # the causal model reads the row but its last token
        assert torch.equal(rows, ids[right][:, :-1])
    else:  # the masked model reads the prompt as it is and some completion positions masked
        assert torch.equal(rows[:, :PROMPT_LEN], ids[right][:, :PROMPT_LEN])
        kept = completions != start.mask_id
        assert torch.equal(completions[kept], ids[right][:, PROMPT_LEN:][kept]) and (~kept).any()
    texts = decode_completions(samples["completions"][right], TOKENIZER, EOS_ID)
    examples = [e for e, ok in zip(trainer.policy.batch_examples(next(iter(trainer.micro_batches(0)))),
                                   right.tolist(), strict=True) if ok]
    assert all(accuracy_reward(t, e, NUMERIC) == 1.0 for t, e in zip(texts, examples, strict=True))
    assert set(out) >= {"loss", "reward", "accuracy", "frac_reward_zero_std"}
    assert out["accuracy"].item() == pytest.approx(right.float().mean().item())
    # the roles of a completion: up to and with its first <eos> it is the answer, then the fill
    assert torch.equal(roles[:, PROMPT_LEN:] == ROLE.ANSWER, samples["mask"])
    before = copy.deepcopy(trainer.model.state_dict())
    trainer.train_step(0)
    assert any(not torch.equal(v, trainer.model.state_dict()[k]) for k, v in before.items())


def test_rft_refuses_a_batch_without_an_accepted_completion(tmp_path: Path) -> None:
    trainer = method_trainer(task_model("ar"), "ar", "rft", ADDITIONS[:8], tmp_path / "ck", checkpoint_every=1)
    with pytest.raises(NoAcceptedCompletions, match=r"step 1: the checker accepted none of the 32 completions "
                                                     r"\(4 prompts x text_rl\.group_size=8\)"):
        trainer.fit()  # random weights: never a right sum
    assert not (tmp_path / "ck").exists() or not any((tmp_path / "ck").iterdir())  # no checkpoint written


def test_prompt_masking_needs_several_updates_per_batch() -> None:
    assert rl_params().prompt_mask_prob == 0.0
    with pytest.raises(ConfigError, match=r"text_rl\.prompt_mask_prob=0\.15: must be 0 with "
                                          r"text_rl\.num_iterations=1"):
        rl_params(prompt_mask_prob=0.15)
    assert rl_params(prompt_mask_prob=0.15, num_iterations=2).prompt_mask_prob == 0.15
