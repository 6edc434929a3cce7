"""The masked model adapted from the AR model (`text_pretrain.mdm_init: ar`, DiffuGPT): the annealed attention, the
shift, the AR weights as the start, and the refusals of an AR folder that does not fit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline_lib.core.errors import ConfigError
from pipeline_lib.core.tracking import Tracker
from pipeline_lib.params import params_from_dict
from pipeline_lib.text.data.corpus import prepare_text, read_text_meta, read_tokens
from pipeline_lib.text.models.objectives import OBJECTIVES, annealed_attention
from pipeline_lib.text.models.sampling import generate_mdm
from pipeline_lib.text.models.saved import CONFIG_FILE, WEIGHTS_FILE, load_lm
from pipeline_lib.text.models.transformer import TransformerLM
from pipeline_lib.text.pretrain import (
    LMPaths,
    LMTrainer,
    adapt_from_ar,
    anneal_fraction,
    build_lm,
    check_inputs,
    pretrain_model,
    run_text_pretrain,
    token_windows,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TINY = {"d_model": 16, "n_layer": 1, "n_head": 2, "max_len": 8}


def _params(**pretrain: object):
    return params_from_dict({"device": "cpu", "text_model": {"d_model": 16, "n_layer": 1, "n_head": 2, "seq_len": 8},
                             "text_pretrain": {"epochs": 4, "batch_size": 8, "base_lr": 1.0, "warmup_epochs": 0.0,
                                               "log_every": 1, "checkpoint_every": 1000, "mdm_init": "ar",
                                               "mdm_anneal_epochs": 1.0, **pretrain}})


@pytest.fixture(scope="module")
def trained_ar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared character corpus and an AR model trained on it by the text_pretrain entry point: the root."""
    root = tmp_path_factory.mktemp("mdm_from_ar")
    (root / "corpus").mkdir()
    (root / "corpus" / "a.txt").write_text("the cat sat on the mat.\n" * 40 + "a dog ran to the park.\n" * 20)
    prepare_text("folder", path=root / "corpus", val_fraction=0.2, out_dir=root / "data", cache_dir=root / "c")
    paths = LMPaths(root / "data", root / "ar", root / "ar.json", root / "ar_plots", root / "ar_ck")
    run_text_pretrain(_params(), paths, "ar", Tracker(), torch.device("cpu"))
    return root


def _mdm_paths(root: Path, name: str, init: Path | None) -> LMPaths:
    return LMPaths(root / "data", root / name, root / f"{name}.json", root / f"{name}_plots", root / f"{name}_ck", init)


# ------------------------------------------------------------------------------------------ annealing


def test_the_attention_anneals_from_causal_through_a_bernoulli_mix_to_bidirectional() -> None:
    steps, length = 10, 64
    fractions = [anneal_fraction(step, steps) for step in range(steps + 2)]
    assert fractions[0] == 0.0 and fractions[5] == 0.5 and fractions[steps:] == [None, None]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    assert torch.equal(annealed_attention(length, 0.0, torch.Generator().manual_seed(0)), causal)  # step 0: the AR's
    mix = annealed_attention(length, 0.5, torch.Generator().manual_seed(0))
    assert mix[causal].all()  # every earlier key (and itself) is always read
    later = mix[~causal].float().mean().item()
    assert 0.45 < later < 0.55  # 2,016 later keys, each read with probability 0.5
    assert torch.equal(annealed_attention(length, 1.0, None), torch.ones(length, length, dtype=torch.bool))


def test_the_trainer_gives_the_model_the_annealed_attention_then_its_own(trained_ar: Path) -> None:
    """Step 0 reads causally, a middle step a mix, and from the end of the anneal the model's bidirectional
    attention (no pattern passed); the first position is never masked."""
    params = _params(mdm_anneal_epochs=1.0)
    windows = token_windows(read_tokens(trained_ar / "data", "train"), 8)
    model = pretrain_model(read_text_meta(trained_ar / "data")["vocab_size"], params, "mdm")
    trainer = LMTrainer(model, params.text_pretrain, windows, objective="mdm", mdm_eps=1e-3, anneal_epochs=1.0,
                        device=torch.device("cpu"), seed=0, checkpoint_dir=trained_ar / "anneal_ck", tracker=Tracker(),
                        fingerprint="f")
    seen: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    hook = model.register_forward_pre_hook(lambda _, args, kwargs: seen.append((args[0], kwargs.get("attention"))),
                                           with_kwargs=True)
    try:
        for step in (0, trainer.anneal_steps // 2, trainer.anneal_steps, trainer.anneal_steps + 1):
            trainer.compute_loss(next(trainer.micro_batches(step)))
    finally:
        hook.remove()
    causal = torch.ones(8, 8, dtype=torch.bool).tril()
    assert trainer.anneal_steps == trainer.steps_per_epoch >= 4
    assert torch.equal(seen[0][1], causal)
    assert seen[1][1][causal].all() and 0 < seen[1][1][~causal].sum() < (~causal).sum()
    assert seen[2][1] is None and seen[3][1] is None
    assert all((ids[:, 0] != model.mask_id).all() and (ids == model.mask_id).any() for ids, _ in seen)


# ---------------------------------------------------------------------------------------------- shift


def test_a_shifted_model_scores_token_i_plus_1_at_position_i() -> None:
    torch.manual_seed(0)
    model = TransformerLM(12, causal=False, mask_token=True, shift=True, **TINY).eval()
    ids = torch.randint(0, 12, (2, 8))
    with torch.no_grad():
        raw = model.head(model.trunk(ids))  # position i's hidden state
        logits = model(ids)
    assert torch.equal(logits[:, 1:], raw[:, :-1])  # the logits of token i + 1 come from position i
    assert torch.equal(logits[:, 0], torch.zeros_like(logits[:, 0]))  # nothing precedes the first: context
    assert model.context == 1 and model.architecture()["shift"] is True
    with pytest.raises(ValueError, match="shift=True is for a bidirectional model"):
        TransformerLM(12, causal=True, shift=True, **TINY)


def test_the_shifted_models_bound_scores_each_token_once_and_its_sampler_fills_every_mask() -> None:
    torch.manual_seed(0)
    model = TransformerLM(12, causal=False, mask_token=True, shift=True, **TINY).eval()
    tokens = np.arange(50) % 12
    nats, scored = OBJECTIVES["mdm"].validation_nats(model, tokens, num_samples=2, seed=0)
    assert scored == 49 and nats > 0  # windows of 8 overlapping by the one context token: 7 x 7 tokens
    # a block as long as the window is cut to leave the context position in it
    out = generate_mdm(model, torch.randint(0, 12, (2, 6)), gen_length=8, steps=None, block_length=8,
                       temperature=0.0, mask_id=model.mask_id, generator=None)
    assert out.shape == (2, 14) and not (out == model.mask_id).any()


# ------------------------------------------------------------------------------------- the AR weights


def test_an_ar_initialised_masked_model_starts_below_a_fresh_one(trained_ar: Path) -> None:
    params = _params()
    meta = read_text_meta(trained_ar / "data")
    windows = token_windows(read_tokens(trained_ar / "data", "train"), 8)
    adapted = adapt_from_ar(pretrain_model(meta["vocab_size"], params, "mdm"),
                            load_file(trained_ar / "ar" / WEIGHTS_FILE))
    torch.manual_seed(0)
    fresh = build_lm(meta["vocab_size"], params, "mdm")
    losses = {}
    for name, model, anneal in (("adapted", adapted, 1.0), ("fresh", fresh, 0.0)):
        trainer = LMTrainer(model, params.text_pretrain, windows, objective="mdm", mdm_eps=1e-3, anneal_epochs=anneal,
                            device=torch.device("cpu"), seed=0, checkpoint_dir=trained_ar / f"{name}_ck",
                            tracker=Tracker(), fingerprint="f")
        with torch.no_grad():
            losses[name] = trainer.compute_loss(next(trainer.micro_batches(0)))["loss"].item()
    assert losses["adapted"] < losses["fresh"], losses
    ar = load_file(trained_ar / "ar" / WEIGHTS_FILE)
    weights = adapted.state_dict()
    assert all(torch.equal(weights[name], value) for name, value in ar.items() if name != "embed.weight")
    assert torch.allclose(weights["embed.weight"][-1], ar["embed.weight"].mean(dim=0))  # the MASK row


def test_the_stage_entry_adapts_the_ar_folder_and_writes_a_shifted_model(trained_ar: Path) -> None:
    params = _params(mdm_epochs=2)
    paths = _mdm_paths(trained_ar, "mdm", trained_ar / "ar")
    check_inputs(params, paths, "mdm")
    summary = run_text_pretrain(params, paths, "mdm", Tracker(), torch.device("cpu"))
    assert summary["steps"] == 2 * (len(token_windows(read_tokens(trained_ar / "data", "train"), 8)) // 8)  # mdm_epochs
    config = json.loads((paths.out / CONFIG_FILE).read_text())
    assert config["objective"] == "mdm" and config["shift"] is True
    model, _, _ = load_lm(paths.out)
    assert model.shift and model.mask_id == model.vocab_size and not model.causal


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ("missing", r"text_pretrain\.mdm_init='ar': mdm continues from the trained ar model, and .* holds none"),
        ("objective", r"text_pretrain\.mdm_init='ar': .* holds a 'mdm' model, not an ar one"),
        ("d_model", r"text_pretrain\.mdm_init='ar': the ar model in .* has another architecture: d_model 32"),
        ("data", r"text_pretrain\.mdm_init='ar': the ar model in .* was trained on other tokens"),
    ],
)
def test_an_ar_folder_that_does_not_fit_is_refused_naming_the_key(trained_ar: Path, tmp_path: Path, change: str,
                                                                 match: str) -> None:
    folder = tmp_path / "ar"
    if change != "missing":
        folder.mkdir()
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            (folder / name).write_bytes((trained_ar / "ar" / name).read_bytes())
        config = json.loads((folder / CONFIG_FILE).read_text())
        config.update({"objective": {"objective": "mdm"}, "d_model": {"d_model": 32},
                       "data": {"data": "0" * 64}}[change])
        (folder / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=match):
        check_inputs(_params(), _mdm_paths(trained_ar, "refused", folder), "mdm")
    assert not (trained_ar / "refused").exists()


def test_an_anneal_longer_than_the_masked_models_training_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"text_pretrain\.mdm_anneal_epochs=4\.0: must be at most the masked "
                                          r"model's 3 epochs"):
        params_from_dict({"text_pretrain": {"mdm_epochs": 3, "mdm_anneal_epochs": 4.0}})
    params_from_dict({"text_pretrain": {"mdm_init": "scratch", "mdm_epochs": 3, "mdm_anneal_epochs": 4.0}})  # unread
