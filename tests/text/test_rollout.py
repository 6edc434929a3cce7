"""Task rows and completions: the task data and the row layout, the <eos> rule, and batched (left-padded)
completion equal to completing each prompt alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline_lib.core.errors import ConfigError
from pipeline_lib.params import params_from_dict
from pipeline_lib.text.data.task_data import SPLITS, build_splits, prepare_task, read_task
from pipeline_lib.text.data.tasks import Example, format_answer, write_jsonl
from pipeline_lib.text.data.tokenizer import CharTokenizer, SpecialTokens
from pipeline_lib.text.models.sampling import generate_ar, generate_mdm
from pipeline_lib.text.models.transformer import TransformerLM, grow_vocab
from pipeline_lib.text.rollout import (
    EOS,
    ROLE,
    SPECIALS,
    check_fits,
    complete,
    completion_mask,
    decode_completions,
    encode_examples,
    encode_prompts,
    prompt_length,
    task_tokenizer,
)

TOKENIZER = task_tokenizer(CharTokenizer.fit("0123456789+=", vocab_size=0))
EOS_ID = TOKENIZER.token_id(EOS)
OPEN, CLOSE = TOKENIZER.token_id("<answer>"), TOKENIZER.token_id("</answer>")
OBJECTIVES = pytest.mark.parametrize("objective", ["ar", "mdm"])


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_task_tokenizer_adds_the_three_specials() -> None:
    assert isinstance(TOKENIZER, SpecialTokens) and TOKENIZER.specials == list(SPECIALS)
    assert [TOKENIZER.token_id(s) for s in SPECIALS] == [13, 14, 15]  # 12 characters, <unk>, then the specials
    assert TOKENIZER.decode(TOKENIZER.encode("7+8=<answer>15</answer><eos>")) == "7+8=<answer>15</answer><eos>"


def test_encode_examples_layout_by_hand() -> None:
    examples = [Example("1+2=", "3"), Example("12+34=", "46")]
    rows = encode_examples(examples, TOKENIZER, prompt_len=7, answer_tokens=6, split="train")
    enc = TOKENIZER.base.encode
    E = EOS_ID
    expected_ids = [
        [E, E, E, *enc("1+2="), OPEN, *enc("3"), CLOSE, E, E, E],
        [E, *enc("12+34="), OPEN, *enc("46"), CLOSE, E, E],
    ]
    P, Q, A, F = ROLE.PAD, ROLE.PROMPT, ROLE.ANSWER, ROLE.FILL
    expected_roles = [
        [P, P, P, Q, Q, Q, Q, A, A, A, A, F, F],  # completion (3 tokens) and its first <eos> are the answer
        [P, Q, Q, Q, Q, Q, Q, A, A, A, A, A, F],
    ]
    assert rows.ids.tolist() == expected_ids
    assert rows.roles.tolist() == expected_roles
    assert rows.ids.dtype.name == "int64" and rows.roles.dtype.name == "int8"


def test_a_completion_over_answer_tokens_names_the_key_and_the_example() -> None:
    examples = [Example("1+2=", "3"), Example("12+34=", "46")]
    encode_examples(examples, TOKENIZER, prompt_len=6, answer_tokens=5, split="rl")  # "46" just fits
    with pytest.raises(ConfigError, match=r"text_task\.answer_tokens=4: the longest rl completion, example 1 "
                                          r"\('12\+34=' -> '46'\), takes 5 tokens .*\(accepted: >= 5\)"):
        encode_examples(examples, TOKENIZER, prompt_len=6, answer_tokens=4, split="rl")


def test_encode_prompts_pads_on_the_left_and_refuses_long_prompts() -> None:
    ids, real = encode_prompts(["1=", "123="], TOKENIZER, 5)
    assert ids.tolist() == [[EOS_ID] * 3 + TOKENIZER.encode("1="), [EOS_ID, *TOKENIZER.encode("123=")]]
    assert real.tolist() == [[False] * 3 + [True] * 2, [False] + [True] * 4]
    with pytest.raises(ValueError, match=r"takes 4 tokens; need 1\.\.3"):
        encode_prompts(["123="], TOKENIZER, 3)
    with pytest.raises(ValueError, match="takes 0 tokens"):
        encode_prompts([""], TOKENIZER, 3)


def test_check_fits_names_the_keys() -> None:
    check_fits(6, 10, 16)
    with pytest.raises(ConfigError, match=r"text_task\.answer_tokens=11: .*seq_len=16 \(accepted: at most 10\)"):
        check_fits(6, 11, 16)


def test_task_data_round_trips_into_rows(tmp_path: Path) -> None:
    params = params_from_dict({"seed": 3, "text_task": {"digits": 1, "train_size": 20, "rl_size": 10, "test_size": 5,
                                                        "answer_tokens": 5}})
    meta = prepare_task(params, tmp_path / "task")
    data = read_task(tmp_path / "task")
    assert meta["sizes"] == {"train": 20, "rl": 10, "test": 5} and data.checker_name == "numeric"
    assert data.splits == build_splits(params.text_task, params.seed)  # the files hold the seeded splits
    prompts = [e.prompt for split in SPLITS for e in data.splits[split]]
    assert len(set(prompts)) == len(prompts)  # no prompt in two splits
    prompt_len = prompt_length(prompts, TOKENIZER)
    rows = encode_examples(data.splits["train"], TOKENIZER, prompt_len=prompt_len, answer_tokens=5, split="train")
    for ids, roles, example in zip(rows.ids, rows.roles, data.splits["train"], strict=True):
        assert TOKENIZER.decode(ids[(roles == ROLE.PROMPT)]) == example.prompt
        assert TOKENIZER.decode(ids[(roles == ROLE.ANSWER)]) == format_answer(example.answer) + EOS
        assert data.checker(example.answer, example)


def test_jsonl_splits_sharing_a_prompt_are_refused(tmp_path: Path) -> None:
    paths = {name: tmp_path / f"{name}.jsonl" for name in SPLITS}
    write_jsonl(paths["train"], [Example("1+1=", "2"), Example("2+2=", "4")])
    write_jsonl(paths["rl"], [Example("3+3=", "6")])
    write_jsonl(paths["test"], [Example("2+2=", "4")])
    params = params_from_dict({"text_task": {"source": "jsonl", "checker": "numeric",
                                             **{f"{name}_path": str(path) for name, path in paths.items()}}})
    with pytest.raises(ValueError, match=r"text_task\.test_path: prompt '2\+2=' is also in the train split"):
        build_splits(params.text_task, 0)
    paths["rl"].unlink()
    with pytest.raises(ConfigError, match=r"text_task\.rl_path='.*rl\.jsonl': no such file"):
        build_splits(params.text_task, 0)


def test_completion_mask_and_decode_by_hand() -> None:
    E, one, two = EOS_ID, *TOKENIZER.encode("12")
    completions = torch.tensor([[OPEN, one, CLOSE, E, one, E], [one, two, one, two, one, two], [E, E, one, E, E, E]])
    assert completion_mask(completions, E).tolist() == [
        [True, True, True, True, False, False],
        [True] * 6,  # no <eos>: the whole region
        [True, False, False, False, False, False],
    ]
    assert decode_completions(completions, TOKENIZER, E) == ["<answer>1</answer>", "121212", ""]


# --------------------------------------------------------------------------------------------- completing


def task_model(objective: str, seed: int = 0) -> TransformerLM:
    """A tiny random task model with large weights, so greedy choices have clear margins."""
    torch.manual_seed(seed)
    model = TransformerLM(TOKENIZER.base.vocab_size, d_model=16, n_layer=2, n_head=2, max_len=16,
                          causal=objective == "ar", mask_token=objective == "mdm")
    grow_vocab(model, len(SPECIALS))
    with torch.no_grad():
        for parameter in model.parameters():
            nn.init.normal_(parameter, std=0.5)
    return model.eval()


PROMPTS = ["1+2=", "12+34=", "5=", "9+87=", "3+3=", "12+3="]


@pytest.mark.parametrize(("objective", "block_length"), [("ar", 6), ("mdm", 6), ("mdm", 3)],
                         ids=["ar", "mdm-one-block", "mdm-two-blocks"])
def test_batched_greedy_completion_equals_each_prompt_alone(objective: str, block_length: int) -> None:
    model = task_model(objective)
    ids, real = (torch.from_numpy(a) for a in encode_prompts(PROMPTS, TOKENIZER, 6))
    options = {"answer_tokens": 6, "temperature": 0.0, "block_length": block_length, "eos_id": EOS_ID,
               "generator": None}
    batched = complete(model, objective, ids, real, **options)
    assert batched.shape == (len(PROMPTS), 6)
    for row, prompt in enumerate(PROMPTS):
        alone_ids = torch.tensor([TOKENIZER.encode(prompt)])
        alone = complete(model, objective, alone_ids, torch.ones_like(alone_ids, dtype=torch.bool), **options)
        assert torch.equal(batched[row], alone[0]), prompt
    # the padding matters: read as real tokens it changes some completion, so the comparison above can fail
    unmasked = complete(model, objective, ids, torch.ones_like(real), **options)
    assert not torch.equal(unmasked, batched)


@OBJECTIVES
def test_complete_sets_everything_after_the_first_eos_to_eos(objective: str) -> None:
    model = task_model(objective, seed=1)
    ids, real = (torch.from_numpy(a).repeat(8, 1) for a in encode_prompts(PROMPTS, TOKENIZER, 6))
    P, A = ids.shape[1], 6
    if objective == "ar":
        raw = generate_ar(model, ids, max_new_tokens=A, temperature=1.0, key_mask=real,
                          generator=torch.Generator().manual_seed(0))[:, P:]
    else:
        raw = generate_mdm(model, ids, gen_length=A, steps=A, block_length=3, temperature=1.0, mask_id=model.mask_id,
                           key_mask=real, generator=torch.Generator().manual_seed(0))[:, P:]
    out = complete(model, objective, ids, real, answer_tokens=A, temperature=1.0, block_length=3, eos_id=EOS_ID,
                   generator=torch.Generator().manual_seed(0))
    keep = completion_mask(raw, EOS_ID)
    assert torch.equal(out[keep], raw[keep])  # up to and including the first <eos>: what the sampler drew
    assert (out[~keep] == EOS_ID).all()  # after it: <eos>
    assert (raw[~keep] != EOS_ID).any()  # the sampler did draw something else there: the rule was applied
    assert torch.equal(completion_mask(out, EOS_ID), keep)


def test_complete_refuses_an_unknown_objective() -> None:
    model = task_model("ar")
    ids = torch.tensor([TOKENIZER.encode("1=")])
    with pytest.raises(ValueError, match="objective='gpt'"):
        complete(model, "gpt", ids, torch.ones_like(ids, dtype=torch.bool), answer_tokens=2, temperature=0.0,
                 block_length=2, eos_id=EOS_ID, generator=None)
