"""Multi-token prediction: causal by construction, its loss added with weight lambda, every part trained."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline_lib.core.tracking import Tracker
from pipeline_lib.core.trainer import Batch
from pipeline_lib.params import params_from_dict
from pipeline_lib.text.config import TextMoEParams
from pipeline_lib.text.losses import ar_loss
from pipeline_lib.text.models.mtp import MultiTokenPrediction, mtp_losses
from pipeline_lib.text.models.saved import exported
from pipeline_lib.text.models.transformer import TransformerLM
from pipeline_lib.text.pretrain import LMTrainer

pytestmark = pytest.mark.usefixtures("one_thread")

V, T = 11, 10


def _model(depth: int = 1, moe: TextMoEParams | None = None) -> MultiTokenPrediction:
    torch.manual_seed(0)
    lm = TransformerLM(V, d_model=16, n_layer=2, n_head=2, max_len=T, causal=True, moe=moe)
    return MultiTokenPrediction(lm, depth).eval()


@torch.no_grad()
@pytest.mark.parametrize("depth", [1, 2])
def test_module_k_at_position_i_reads_tokens_up_to_i_plus_k_only(depth: int) -> None:
    model = _model(depth)
    ids = torch.randint(0, V, (1, T), generator=torch.Generator().manual_seed(1))
    outputs = model(ids)
    assert [tuple(o.shape) for o in outputs] == [(1, T - k, V) for k in range(depth + 1)]
    for i in range(T - depth - 1):
        changed = ids.clone()
        changed[0, i + depth + 1 :] = (changed[0, i + depth + 1 :] + 1) % V  # every token after i + depth
        for k in range(1, depth + 1):
            torch.testing.assert_close(model(changed)[k][0, : i + 1], outputs[k][0, : i + 1])
    # ... and it does read token i + k: changing it changes the logits at i.
    changed = ids.clone()
    changed[0, 1] = (changed[0, 1] + 1) % V
    assert not torch.allclose(model(changed)[1][0, 0], outputs[1][0, 0])


@torch.no_grad()
def test_main_logits_are_the_language_models() -> None:
    model = _model(2)
    ids = torch.randint(0, V, (2, T))
    torch.testing.assert_close(model(ids)[0], model.lm(ids))


def test_losses_and_accuracies_match_shifted_targets() -> None:
    model = _model(2)
    window = torch.randint(0, V, (3, T + 1), generator=torch.Generator().manual_seed(2))
    logits = model(window[:, :-1])
    out = mtp_losses(logits, window)
    for k in (1, 2):
        targets = window[:, k + 1 :]  # module k's position i predicts token i + k + 1
        torch.testing.assert_close(out[f"mtp{k}_loss"], F.cross_entropy(logits[k].transpose(1, 2), targets))
        assert out[f"mtp{k}_accuracy"] == (logits[k].argmax(-1) == targets).float().mean()
    torch.testing.assert_close(out["mtp_loss"], (out["mtp1_loss"] + out["mtp2_loss"]) / 2)
    assert out["accuracy"] == (logits[0].argmax(-1) == window[:, 1:]).float().mean()


def test_trainer_adds_the_loss_with_weight_lambda(tmp_path: Path) -> None:
    params = params_from_dict({"text_pretrain": {"epochs": 1, "batch_size": 4, "mtp_depth": 1, "mtp_weight": 0.3}})
    model = _model(1)
    windows = np.random.default_rng(0).integers(0, V, size=(8, T + 1))
    trainer = LMTrainer(model, params.text_pretrain, windows, objective="ar", mdm_eps=1e-3,
                        mtp_weight=0.3, device=torch.device("cpu"), seed=0, checkpoint_dir=tmp_path,
                        tracker=Tracker(), fingerprint="f")
    ids = torch.from_numpy(windows[:4])
    out = trainer.compute_loss(Batch(ids, None, slice(0, 4), 4, torch.Generator(), 0))
    logits = model(ids[:, :-1])
    next_token = ar_loss(logits[0], ids[:, 1:])
    extra = F.cross_entropy(logits[1].transpose(1, 2), ids[:, 2:])
    torch.testing.assert_close(out["next_token_loss"], next_token)
    torch.testing.assert_close(out["loss"], next_token + 0.3 * extra)
    assert exported(trainer.model) is model.lm


@pytest.mark.parametrize("moe", [None, TextMoEParams(enabled=True, routed_experts=4, top_k=2)])
def test_every_parameter_gets_a_gradient(moe: TextMoEParams | None) -> None:
    model = _model(1, moe).train()
    window = torch.randint(0, V, (2, T + 1))
    logits = model(window[:, :-1])
    (ar_loss(logits[0], window[:, 1:]) + mtp_losses(logits, window)["mtp_loss"]).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
    assert model.depths[0].proj.weight.grad.abs().sum() > 0
    assert model.lm.embed.weight.grad.abs().sum() > 0


def test_needs_a_causal_model() -> None:
    lm = TransformerLM(V, d_model=16, n_layer=1, n_head=2, max_len=T, causal=False, mask_token=True)
    with pytest.raises(ValueError, match="causal"):
        MultiTokenPrediction(lm, 1)
