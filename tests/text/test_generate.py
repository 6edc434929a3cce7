"""Generating text from a model folder: the library call, the pyfunc wrapper and the command line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline_lib.config import params_from_dict
from pipeline_lib.text.corpus import prepare_text
from pipeline_lib.text.generate import LanguageModel, SamplerSettings, generate_text, main
from pipeline_lib.text.lm import LMPaths, run_text_pretrain
from pipeline_lib.tracking import Tracker

CORPUS = "the cat sat on the mat.\n" * 40 + "a dog ran.\n" * 10


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny trained model folder per objective (seq_len 16)."""
    root = tmp_path_factory.mktemp("lm")
    (root / "corpus").mkdir()
    (root / "corpus" / "a.txt").write_text(CORPUS)
    prepare_text("folder", path=root / "corpus", val_fraction=0.2, out_dir=root / "data", cache_dir=root / "c")
    params = params_from_dict({"device": "cpu", "text_model": {"d_model": 16, "n_layer": 1, "n_head": 2, "seq_len": 16},
                               "text_pretrain": {"epochs": 1, "batch_size": 8, "warmup_epochs": 0.0}})
    out = {}
    for objective in ("ar", "mdm"):
        paths = LMPaths(root / "data", root / objective, root / f"{objective}.json", root / f"p{objective}",
                        root / f"c{objective}")
        run_text_pretrain(params, paths, objective, Tracker(), torch.device("cpu"))
        out[objective] = paths.out
    return out


def test_ar_samples_are_reproducible_and_greedy_ignores_the_seed(folders: dict[str, Path]) -> None:
    lm = LanguageModel.from_folder(folders["ar"])
    settings = SamplerSettings(max_new_tokens=20, num_samples=3, seed=1)
    first = lm.generate("the cat", settings)
    assert len(first) == 3 and all(len(text) == 20 for text in first)  # char tokenizer: one token, one character
    assert lm.generate("the cat", settings) == first
    greedy = [lm.generate("the cat", SamplerSettings(max_new_tokens=20, temperature=0.0, seed=s))[0] for s in (0, 1)]
    assert greedy[0] == greedy[1]


def test_mdm_fills_exactly_the_requested_tokens_and_cuts_a_long_prompt(folders: dict[str, Path]) -> None:
    lm = LanguageModel.from_folder(folders["mdm"])
    settings = SamplerSettings(max_new_tokens=8, steps=4, block_length=4, num_samples=2)
    texts = lm.generate("the cat sat on the mat. a dog", settings)  # 29 characters > 16 - 8
    assert len(texts) == 2 and all(len(text) == 8 for text in texts)  # decoding refuses the mask id: none left
    with pytest.raises(ValueError, match="multiple of block_length=3"):
        lm.generate("the", SamplerSettings(max_new_tokens=8, block_length=3))
    with pytest.raises(ValueError, match="max_new_tokens=16 leaves no room for a prompt"):
        lm.generate("the", SamplerSettings(max_new_tokens=16, block_length=16))


def test_empty_prompt_and_unknown_objective_are_refused(folders: dict[str, Path]) -> None:
    lm = LanguageModel.from_folder(folders["ar"])
    with pytest.raises(ValueError, match="prompt is empty"):
        lm.generate("", SamplerSettings())
    with pytest.raises(ValueError, match="objective='gpt'"):
        generate_text(lm.model, lm.tokenizer, "gpt", "the", SamplerSettings())


def test_pyfunc_predict_takes_prompts_and_sampler_params(folders: dict[str, Path]) -> None:
    lm = LanguageModel.from_folder(folders["mdm"])
    assert LanguageModel.default_params(16)["max_new_tokens"] == 8  # defaults fit the model's window
    out = lm.predict(None, ["the cat", "a dog"], {"max_new_tokens": 4, "block_length": 2, "steps": 2, "seed": 3})
    assert len(out) == 2 and all(len(text) == 4 for text in out)
    assert lm.predict(None, ["the cat"]) == lm.predict(None, ["the cat"])  # defaults, seed 0


def test_command_line_prints_each_sample_after_the_prompt(folders: dict[str, Path],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    main([str(folders["ar"]), "--prompt", "the ", "--max-new-tokens", "5", "--num-samples", "2", "--top-k", "3"])
    samples = LanguageModel.from_folder(folders["ar"]).generate(
        "the ", SamplerSettings(max_new_tokens=5, top_k=3, num_samples=2))
    assert capsys.readouterr().out == "".join(f"--- sample {i} ---\nthe {text}\n" for i, text in enumerate(samples))
    with pytest.raises(SystemExit, match="generate: steps=3 must be a positive multiple"):
        main([str(folders["mdm"]), "--prompt", "the", "--max-new-tokens", "8", "--block-length", "4",
              "--steps", "3"])
    with pytest.raises(SystemExit, match="not a language model folder"):
        main([str(folders["ar"].parent / "nowhere"), "--prompt", "the"])


def test_unknown_registered_model_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    with pytest.raises(SystemExit, match=r"generate: .*nope"):
        main(["models:/nope/1", "--prompt", "the"])
