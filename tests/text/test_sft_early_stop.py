"""SFT's stop at the edge of competence (`text_sft.stop_at_accuracy`): the held-out train examples are never trained
on, each check scores them greedily, and training ends at the first check that reaches the target."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline_lib.core.tracking import Tracker
from pipeline_lib.params import Params, params_from_dict
from pipeline_lib.text.data.task_data import TaskData
from pipeline_lib.text.data.tasks import Example
from pipeline_lib.text.data.tokenizer import CharTokenizer
from pipeline_lib.text.finetune import holdout_split, sft_trainer
from pipeline_lib.text.models.transformer import TransformerLM, grow_vocab
from pipeline_lib.text.rollout import SPECIALS, task_tokenizer
from pipeline_lib.text.task_evaluate import greedy_accuracy

TOKENIZER = task_tokenizer(CharTokenizer.fit("0123456789+=", vocab_size=0))
ADDITIONS = [Example(f"{a}+{b}=", str(a + b)) for a in range(1, 10) for b in range(1, 10)]
np.random.default_rng(1).shuffle(ADDITIONS)
# 16 additions four times over: the held-out last 16 rows are also trained on earlier, so SFT reaches them by
# memorising (a toy model does not generalise addition), and the stop is reached in a few dozen steps.
DATA = TaskData({"train": ADDITIONS[:16] * 4, "rl": ADDITIONS[64:72], "test": ADDITIONS[72:]}, "numeric", {})

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def params(**text_sft: object) -> Params:
    return params_from_dict({"text_task": {"answer_tokens": 5},
                             "text_sft": {"epochs": 30, "batch_size": 8, "base_lr": 0.5, "min_lr": 0.5,
                                          "warmup_epochs": 0.0, **text_sft}})


def model() -> TransformerLM:
    torch.manual_seed(0)
    lm = TransformerLM(TOKENIZER.base.vocab_size, d_model=32, n_layer=2, n_head=2, max_len=16, causal=True)
    return grow_vocab(lm, len(SPECIALS))


def test_the_held_out_examples_are_the_last_ones_and_only_with_a_target() -> None:
    assert holdout_split(ADDITIONS[:64], params(stop_at_accuracy=None, holdout=16).text_sft) == (ADDITIONS[:64], [])
    trained, held_out = holdout_split(ADDITIONS[:64], params(stop_at_accuracy=0.5, holdout=16).text_sft)
    assert trained == ADDITIONS[:48] and held_out == ADDITIONS[48:64]


def test_sft_stops_at_the_first_check_that_reaches_the_target(tmp_path: Path) -> None:
    settings = params(stop_at_accuracy=0.5, holdout=16, check_every=10)
    trainer, task = sft_trainer(settings, model(), TOKENIZER, DATA, "ar", device=torch.device("cpu"), seed=0,
                                checkpoint_dir=tmp_path, tracker=Tracker(), fingerprint="stop")
    assert len(trainer.inputs) == 48  # the 16 held-out examples are not trained on
    result = trainer.fit()
    steps, scores = zip(*trainer.checks, strict=True)
    assert list(steps) == list(range(10, result.steps + 1, 10))  # every check_every steps, up to the stop
    assert scores[-1] >= 0.5 > max(scores[:-1], default=0.0)  # the first check at the target ends training
    assert result.steps == trainer.stopped_at < trainer.total_steps
    again = greedy_accuracy(trainer.model, "ar", TOKENIZER, ADDITIONS[:16], DATA.checker, task, block_length=4)
    assert again == pytest.approx(scores[-1])  # a check is the greedy exact match of the held-out examples

