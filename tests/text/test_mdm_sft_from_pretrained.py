"""A pretrained masked-diffusion model reaches `text_sft@mdm` and the task evaluation intact (issue 21).

The path under test: the folder `text_pretrain@mdm` writes -> `finetune.start_model` (`load_lm`, the task
tokenizer, `grow_vocab`) -> the SFT trainer's masking -> `save_task_model` -> `load_lm` of the task model. Each
step must keep the pretrained weights, the bidirectional attention and a MASK id just outside the grown vocabulary
(the old MASK id is `<answer>`'s id in the task tokenizer). Each test runs for a model from fresh weights and for one
adapted from the AR model (`text_pretrain.mdm_init: ar`), which keeps the AR layout (`shift`) through every step.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor

from pipeline_lib.core.tracking import Tracker
from pipeline_lib.params import params_from_dict
from pipeline_lib.text.data.tasks import ANSWER_OPEN, Example
from pipeline_lib.text.data.tokenizer import CharTokenizer
from pipeline_lib.text.finetune import SFTPaths, SFTTrainer, save_task_model, start_model
from pipeline_lib.text.models.saved import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, lm_config, load_lm
from pipeline_lib.text.models.transformer import TransformerLM
from pipeline_lib.text.rollout import ROLE, SPECIALS, encode_examples

TINY = {"d_model": 16, "n_layer": 2, "n_head": 2, "max_len": 16}
EXAMPLES = [Example(f"{a}+{b}=", str(a + b)) for a, b in [(1, 2), (12, 3), (4, 56), (7, 8), (99, 1), (5, 5),
                                                           (23, 45), (6, 0)]]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(params=[False, True], ids=["scratch", "adapted-from-ar"])
def shift(request: pytest.FixtureRequest) -> bool:
    """Whether the pretrained masked model is one adapted from the AR model (shifted outputs)."""
    return request.param


def pretrained_folder(folder: Path, shift: bool = False) -> TransformerLM:
    """A masked model folder as `text_pretrain@mdm` writes it, with weights far from their initialisation (norm
    gains included), so that a weight rebuilt instead of loaded shows."""
    tokenizer = CharTokenizer.fit("0123456789+= ", vocab_size=0)
    torch.manual_seed(0)
    model = TransformerLM(tokenizer.vocab_size, causal=False, mask_token=True, shift=shift, **TINY)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.5 * torch.randn_like(parameter))
    folder.mkdir()
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, folder / WEIGHTS_FILE)
    (folder / CONFIG_FILE).write_text(json.dumps(lm_config(model, "mdm")))
    tokenizer.save(folder / TOKENIZER_FILE)
    return model.eval()


def sample_ids(vocab_size: int, mask_id: int) -> Tensor:
    """(2, 12) ids of the pretraining vocabulary with a third of them masked."""
    ids = torch.randint(0, vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    ids[:, ::3] = mask_id
    return ids


def test_start_model_keeps_the_pretrained_masked_model(tmp_path: Path, shift: bool) -> None:
    pretrained = pretrained_folder(tmp_path / "mdm", shift)
    V = pretrained.vocab_size
    paths = SFTPaths(tmp_path / "task", tmp_path / "data", tmp_path / "mdm", tmp_path / "out", tmp_path / "m.json",
                     tmp_path / "plots", tmp_path / "checkpoints")
    model, tokenizer = start_model(params_from_dict({}), paths, "mdm")

    # the task tokens follow the pretraining vocabulary, and the MASK id moves past them
    assert [tokenizer.token_id(s) for s in SPECIALS] == [V, V + 1, V + 2]
    assert tokenizer.token_id(ANSWER_OPEN) == pretrained.mask_id  # so the old MASK id must not stay the MASK id
    assert model.vocab_size == tokenizer.vocab_size == V + 3
    assert model.mask_id == V + 3
    # bidirectional and in the pretrained layout
    assert not model.causal and not any(block.attn.causal for block in model.blocks)
    assert model.shift == shift
    # every pretrained weight arrives: the blocks and norms as saved, the token rows, and the MASK row at its new id
    old, new = pretrained.state_dict(), model.state_dict()
    assert old.keys() == new.keys()
    for name in old:
        if name != "embed.weight":
            assert torch.equal(old[name], new[name]), name
    embed = new["embed.weight"]
    assert torch.equal(embed[:V], old["embed.weight"][:V])
    assert torch.equal(embed[model.mask_id], old["embed.weight"][pretrained.mask_id])
    assert torch.allclose(embed[V:V + 3], old["embed.weight"][:V].mean(dim=0).expand(3, -1), atol=1e-6)
    # so the model predicts the pretraining vocabulary exactly as before
    ids = sample_ids(V, pretrained.mask_id)
    with torch.no_grad():
        before = pretrained(ids)
        after = model.eval()(ids.masked_fill(ids == pretrained.mask_id, model.mask_id))
    assert torch.allclose(after[..., :V], before, atol=1e-5)


def test_sft_masks_with_the_moved_mask_id_and_the_task_model_reloads(tmp_path: Path, shift: bool) -> None:
    pretrained_folder(tmp_path / "mdm", shift)
    paths = SFTPaths(tmp_path / "task", tmp_path / "data", tmp_path / "mdm", tmp_path / "out", tmp_path / "m.json",
                     tmp_path / "plots", tmp_path / "checkpoints")
    model, tokenizer = start_model(params_from_dict({}), paths, "mdm")
    rows = encode_examples(EXAMPLES, tokenizer, prompt_len=6, answer_tokens=8, split="train")
    stacked = np.stack([rows.ids, rows.roles.astype(np.int64)], axis=1)  # (N, 2, T)
    cfg = params_from_dict({"text_sft": {"epochs": 1, "batch_size": 8, "warmup_epochs": 0.0}}).text_sft
    trainer = SFTTrainer(model, cfg, stacked, objective="mdm", mdm_eps=cfg.mdm_eps, device=torch.device("cpu"),
                         seed=0, checkpoint_dir=tmp_path / "checkpoints", tracker=Tracker(), fingerprint="test")
    assert trainer.mask_id == model.mask_id
    seen: list[Tensor] = []
    hook = model.register_forward_pre_hook(lambda _, args: seen.append(args[0].clone()))
    try:
        for step in range(3):
            for batch in trainer.micro_batches(step):
                trainer.compute_loss(batch)
                clean, roles = batch.inputs[:, 0], batch.inputs[:, 1]
                changed = seen[-1] != clean
                assert changed.any() and (seen[-1][changed] == model.mask_id).all()
                assert (roles[changed] >= ROLE.ANSWER).all()
    finally:
        hook.remove()

    # the finetuned model's folder loads back as the same bidirectional model with the same MASK id
    out = tmp_path / "sft"
    out.mkdir()
    task = {"eos_id": tokenizer.token_id("<eos>"), "prompt_len": 6, "answer_tokens": 8}
    save_task_model(model, tokenizer, "mdm", task, out)
    loaded, loaded_tokenizer, config = load_lm(out)
    assert (loaded.vocab_size, loaded.mask_id, loaded.causal, loaded.shift) == (model.vocab_size, model.mask_id,
                                                                                 False, shift)
    assert loaded_tokenizer.vocab_size == tokenizer.vocab_size and config["task"] == task
    ids = torch.from_numpy(rows.ids[:2]).masked_fill(torch.from_numpy(rows.roles[:2] >= ROLE.ANSWER), model.mask_id)
    with torch.no_grad():
        assert torch.allclose(loaded(ids), model.eval()(ids), atol=1e-5)
