"""The SFT objectives against naive references: answer tokens only (AR), LLaDA's SFT loss (MDM), and the SFT
trainer's MDM branch never masking the prompt."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from pipeline_lib.core.tracking import Tracker
from pipeline_lib.params import params_from_dict
from pipeline_lib.text.data.tasks import Example
from pipeline_lib.text.data.tokenizer import CharTokenizer
from pipeline_lib.text.finetune import SFTTrainer
from pipeline_lib.text.losses import sft_ar_loss, sft_mdm_loss
from pipeline_lib.text.models.transformer import TransformerLM, grow_vocab
from pipeline_lib.text.rollout import ROLE, encode_examples, task_tokenizer

V = 7
# Two rows of T = 8: padding (P), prompt (Q), answer (A), fill (F).
#   row 0: P P Q Q Q A A F      row 1: Q Q Q Q A A A A
ROLES = torch.tensor([[0, 0, 1, 1, 1, 2, 2, 3], [1, 1, 1, 1, 2, 2, 2, 2]])


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def random_case(seed: int = 0) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, 8, V, generator=generator), torch.randint(0, V, (2, 8), generator=generator)


def naive_sft_ar(logits: Tensor, ids: Tensor, answer: Tensor) -> float:
    """Mean over answer positions t of -log softmax(logits[b, t - 1])[ids[b, t]], one term at a time."""
    terms = []
    for b in range(ids.shape[0]):
        for t in range(1, ids.shape[1]):
            if answer[b, t]:
                terms.append(-float(torch.log_softmax(logits[b, t - 1].double(), dim=-1)[ids[b, t]]))
    return sum(terms) / len(terms)


def test_sft_ar_loss_is_the_mean_answer_token_ce() -> None:
    logits, ids = random_case()
    answer = ROLES == ROLE.ANSWER
    loss = sft_ar_loss(logits[:, :-1], ids, answer)
    assert loss.item() == pytest.approx(naive_sft_ar(logits, ids, answer), rel=1e-5)
    # uniform logits: log V per answer token
    assert sft_ar_loss(torch.zeros(2, 7, V), ids, answer).item() == pytest.approx(math.log(V), rel=1e-6)


def test_sft_ar_loss_never_counts_prompt_or_padding() -> None:
    logits, ids = random_case(1)
    answer = ROLES == ROLE.ANSWER
    loss = sft_ar_loss(logits[:, :-1], ids, answer)
    predicts_answer = answer[:, 1:]  # logits[:, t] predict ids[:, t + 1]
    changed = logits[:, :-1].clone()
    changed[~predicts_answer] = 100.0 * torch.randn(int((~predicts_answer).sum()), V)
    assert sft_ar_loss(changed, ids, answer).item() == pytest.approx(loss.item(), rel=1e-6)
    other_ids = ids.clone()
    other_ids[~answer] = (ids[~answer] + 3) % V  # every prompt, padding and fill target changed
    assert sft_ar_loss(logits[:, :-1], other_ids, answer).item() == pytest.approx(loss.item(), rel=1e-6)
    # and an answer position does count
    moved = logits[:, :-1].clone()
    moved[0, 4] += 5.0 * torch.nn.functional.one_hot(ids[0, 5], V)
    assert sft_ar_loss(moved, ids, answer).item() < loss.item()


def test_sft_ar_loss_gradient_only_reaches_answer_predictions() -> None:
    logits, ids = random_case(2)
    logits = logits[:, :-1].clone().requires_grad_()
    answer = ROLES == ROLE.ANSWER
    sft_ar_loss(logits, ids, answer).backward()
    touched = logits.grad.abs().sum(dim=-1) > 0  # (B, T - 1)
    assert torch.equal(touched, answer[:, 1:])


def test_sft_ar_loss_refuses_bad_answers() -> None:
    logits, ids = random_case()
    answer = ROLES == ROLE.ANSWER
    with pytest.raises(ValueError, match="answer must be a bool"):
        sft_ar_loss(logits[:, :-1], ids, answer.long())
    first = answer.clone()
    first[0, 0] = True
    with pytest.raises(ValueError, match="first position"):
        sft_ar_loss(logits[:, :-1], ids, first)


def naive_sft_mdm(logits: Tensor, ids: Tensor, masked: Tensor, p: Tensor, response: Tensor) -> float:
    """1/B Σ_b (1/|response_b|) Σ_{i masked in b} CE_i / p_b, one term at a time."""
    total = 0.0
    for b in range(ids.shape[0]):
        row = 0.0
        for i in range(ids.shape[1]):
            if masked[b, i]:
                row -= float(torch.log_softmax(logits[b, i].double(), dim=-1)[ids[b, i]]) / float(p[b])
        total += row / int(response[b].sum())
    return total / ids.shape[0]


def test_sft_mdm_loss_matches_the_hand_formula() -> None:
    logits, ids = random_case(3)
    response = ROLES >= ROLE.ANSWER  # 3 and 4 positions
    masked = torch.tensor([[0, 0, 0, 0, 0, 1, 0, 1], [0, 0, 0, 0, 1, 1, 1, 0]], dtype=torch.bool)
    p = torch.tensor([0.25, 0.8])
    loss = sft_mdm_loss(logits, ids, masked, p, response)
    assert loss.item() == pytest.approx(naive_sft_mdm(logits, ids, masked, p, response), rel=1e-5)
    # uniform logits: row 0 has 2 masked of 3 response tokens at p 0.25, row 1 3 of 4 at p 0.8
    uniform = sft_mdm_loss(torch.zeros(2, 8, V), ids, masked, p, response).item()
    assert uniform == pytest.approx(math.log(V) * (2 / 0.25 / 3 + 3 / 0.8 / 4) / 2, rel=1e-6)
    # unmasked positions contribute nothing, whatever their logits
    changed = logits.clone()
    changed[~masked] = 100.0
    assert sft_mdm_loss(changed, ids, masked, p, response).item() == pytest.approx(loss.item(), rel=1e-6)


def test_sft_mdm_loss_refuses_masks_outside_the_response() -> None:
    logits, ids = random_case()
    response = ROLES >= ROLE.ANSWER
    masked = response.clone()
    masked[1, 0] = True  # a prompt token
    with pytest.raises(ValueError, match="outside the response"):
        sft_mdm_loss(logits, ids, masked, torch.tensor([0.5, 0.5]), response)
    empty = response.clone()
    empty[0] = False
    with pytest.raises(ValueError, match="response of at least one token"):
        sft_mdm_loss(logits, ids, masked & empty, torch.tensor([0.5, 0.5]), empty)
    with pytest.raises(ValueError, match="response must be a bool"):
        sft_mdm_loss(logits, ids, masked & response, torch.tensor([0.5, 0.5]), response.long())


# ------------------------------------------------------------------------------ the SFT trainer's MDM branch

EXAMPLES = [Example(f"{a}+{b}=", str(a + b)) for a, b in [(1, 2), (12, 3), (4, 56), (7, 8), (99, 1), (5, 5),
                                                           (23, 45), (6, 0)]]


def sft_trainer(tmp_path: Path, objective: str) -> tuple[SFTTrainer, np.ndarray]:
    tokenizer = task_tokenizer(CharTokenizer.fit("0123456789+=", vocab_size=0))
    rows = encode_examples(EXAMPLES, tokenizer, prompt_len=6, answer_tokens=6, split="train")
    stacked = np.stack([rows.ids, rows.roles.astype(np.int64)], axis=1)  # (N, 2, T)
    torch.manual_seed(0)
    model = TransformerLM(tokenizer.base.vocab_size, d_model=16, n_layer=2, n_head=2, max_len=16,
                          causal=objective == "ar", mask_token=objective == "mdm")
    grow_vocab(model, tokenizer.vocab_size - model.vocab_size)
    cfg = params_from_dict({"text_sft": {"epochs": 1, "batch_size": 8, "warmup_epochs": 0.0}}).text_sft
    trainer = SFTTrainer(model, cfg, stacked, objective=objective, mdm_eps=cfg.mdm_eps,
                         device=torch.device("cpu"), seed=0, checkpoint_dir=tmp_path, tracker=Tracker(),
                         fingerprint="test")
    return trainer, stacked


def test_sft_trainer_mdm_never_masks_the_prompt(tmp_path: Path) -> None:
    trainer, _ = sft_trainer(tmp_path, "mdm")
    model, mask_id = trainer.model, trainer.model.mask_id
    seen: list[tuple[Tensor, Tensor]] = []
    hook = model.register_forward_pre_hook(lambda _, args, kwargs: seen.append((args[0].clone(),
                                                                                kwargs["key_mask"].clone())),
                                           with_kwargs=True)
    masked_response = 0
    try:
        for step in range(4):  # four draws of t, so some sequences are masked heavily
            for batch in trainer.micro_batches(step):
                out = trainer.compute_loss(batch)
                assert torch.isfinite(out["loss"])
                clean, roles = batch.inputs[:, 0], batch.inputs[:, 1]
                noisy, key_mask = seen[-1]
                prompt = roles <= ROLE.PROMPT  # padding and prompt
                assert not (noisy[prompt] == mask_id).any()
                assert torch.equal(noisy[prompt], clean[prompt])
                assert torch.equal(key_mask, roles != ROLE.PAD)
                changed = noisy != clean
                assert (noisy[changed] == mask_id).all()  # the response is only ever masked, not altered
                masked_response += int(changed.sum())
    finally:
        hook.remove()
    assert len(seen) == 4
    assert masked_response > 0  # the branch does mask: the check above could fail


def test_sft_trainer_ar_reads_the_padding_mask_and_changes_parameters(tmp_path: Path) -> None:
    trainer, _ = sft_trainer(tmp_path, "ar")
    seen: list[Tensor] = []
    hook = trainer.model.register_forward_pre_hook(lambda _, args, kwargs: seen.append(kwargs["key_mask"].clone()),
                                                   with_kwargs=True)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    try:
        trainer.train_step(0)
    finally:
        hook.remove()
    batch = next(iter(trainer.micro_batches(0)))
    assert torch.equal(seen[0], batch.inputs[:, 1, :-1] != ROLE.PAD)
    after = trainer.model.state_dict()
    for name in before:
        assert not torch.equal(before[name], after[name]), f"{name} did not change"
