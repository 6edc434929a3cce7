"""Generating text from a model folder or a registered version: the library call, the pyfunc wrapper and the
command line, with any max_new_tokens up to the context and every bad knob refused in one line."""

from __future__ import annotations

import re
from pathlib import Path

import mlflow
import pytest
import torch

from pipeline_lib.core.registry import register_model
from pipeline_lib.core.tracking import Tracker
from pipeline_lib.params import params_from_dict
from pipeline_lib.text.data.corpus import prepare_text
from pipeline_lib.text.pretrain import LMPaths, language_model_description, language_model_kind, run_text_pretrain
from pipeline_lib.text.serving import LanguageModel, SamplerSettings, generate_text, main

CORPUS = "the cat sat on the mat.\n" * 40 + "a dog ran.\n" * 10


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny trained model folder per objective (seq_len 16); mdm adapted from the ar model, as by default."""
    root = tmp_path_factory.mktemp("lm")
    (root / "corpus").mkdir()
    (root / "corpus" / "a.txt").write_text(CORPUS)
    prepare_text("folder", path=root / "corpus", val_fraction=0.2, out_dir=root / "data", cache_dir=root / "c")
    params = params_from_dict({"device": "cpu", "text_model": {"d_model": 16, "n_layer": 1, "n_head": 2, "seq_len": 16},
                               "text_pretrain": {"epochs": 1, "mdm_epochs": 1, "batch_size": 8,
                                                 "warmup_epochs": 0.0}})
    assert params.text_pretrain.mdm_init == "ar"
    out = {}
    for objective in ("ar", "mdm"):
        paths = LMPaths(root / "data", root / objective, root / f"{objective}.json", root / f"p{objective}",
                        root / f"c{objective}", root / "ar")
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


def test_mdm_fills_exactly_the_requested_tokens_whatever_the_prompt_and_blocks(folders: dict[str, Path]) -> None:
    lm = LanguageModel.from_folder(folders["mdm"])
    settings = SamplerSettings(max_new_tokens=8, steps=4, block_length=4, num_samples=2)
    texts = lm.generate("the cat sat on the mat. a dog", settings)  # 29 characters > max_len 16: the window slides
    assert len(texts) == 2 and all(len(text) == 8 for text in texts)  # decoding refuses the mask id: none left
    for max_new_tokens, block_length in [(8, 3), (16, 16), (16, 32), (40, 8), (5, 32)]:  # cut blocks, whole window
        text = lm.generate("the", SamplerSettings(max_new_tokens=max_new_tokens, block_length=block_length))[0]
        assert len(text) == max_new_tokens
    with pytest.raises(ValueError, match=r"steps=4: must be a positive multiple of the number of blocks .* = 3"):
        lm.generate("the", SamplerSettings(max_new_tokens=8, block_length=3, steps=4))


@pytest.mark.parametrize("knob, value, message", [
    ("max_new_tokens", 0, "max_new_tokens=0: must be >= 1"),
    ("max_new_tokens", 2.5, "max_new_tokens=2.5: must be >= 1 (an integer)"),
    ("temperature", -0.1, "temperature=-0.1: must be >= 0 (0 is greedy)"),
    ("temperature", float("nan"), "temperature=nan: must be >= 0"),
    ("top_k", 0, "top_k=0: must be >= 1 (an integer), or None for all tokens"),
    ("steps", 0, "steps=0: must be >= 1 (an integer), or None for one model call per new token"),
    ("block_length", 0, "block_length=0: must be >= 1"),
    ("num_samples", 0, "num_samples=0: must be >= 1"),
    ("seed", "1", "seed='1': must be an integer"),
])
def test_sampler_settings_refuse_a_bad_knob_in_one_line(knob: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)) as refused:
        SamplerSettings(**{knob: value})
    assert "\n" not in str(refused.value)


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


@pytest.mark.parametrize("params, message", [
    ({"max_new_tokens": 0}, "max_new_tokens=0: must be >= 1"),
    ({"max_new_tokens": 2.5}, "max_new_tokens=2.5: must be an integer"),
    ({"max_new_tokens": "many"}, "max_new_tokens='many': must be an integer"),
    ({"temperature": "hot"}, "temperature='hot': must be a number"),
    ({"temperature": -1.0}, "temperature=-1.0: must be >= 0"),
    ({"top_k": -1}, "top_k=-1: must be >= 0 (0: all tokens)"),
    ({"steps": -2}, "steps=-2: must be >= 0 (0: one model call per new token)"),
    ({"steps": 3, "max_new_tokens": 8, "block_length": 4}, "steps=3: must be a positive multiple of the number of "
                                                            "blocks"),
    ({"block_length": None}, "block_length=None: must be an integer"),
    ({"seed": 1.5}, "seed=1.5: must be an integer"),
])
def test_pyfunc_predict_refuses_a_bad_param_in_one_line(folders: dict[str, Path], params: dict, message: str) -> None:
    lm = LanguageModel.from_folder(folders["mdm"])
    with pytest.raises(ValueError, match=re.escape(message)) as refused:
        lm.predict(None, ["12+34="], params)
    assert "\n" not in str(refused.value)
    assert lm.predict(None, ["12+34="], {"max_new_tokens": 3.0, "seed": "2"}) == lm.predict(
        None, ["12+34="], {"max_new_tokens": 3, "seed": 2})  # whole numbers of another type are taken


def test_command_line_prints_each_sample_after_the_prompt(folders: dict[str, Path],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    main([str(folders["ar"]), "--prompt", "the ", "--max-new-tokens", "5", "--num-samples", "2", "--top-k", "3"])
    samples = LanguageModel.from_folder(folders["ar"]).generate(
        "the ", SamplerSettings(max_new_tokens=5, top_k=3, num_samples=2))
    assert capsys.readouterr().out == "".join(f"--- sample {i} ---\nthe {text}\n" for i, text in enumerate(samples))
    with pytest.raises(SystemExit, match="generate: steps=3: must be a positive multiple"):
        main([str(folders["mdm"]), "--prompt", "the", "--max-new-tokens", "8", "--block-length", "4",
              "--steps", "3"])
    with pytest.raises(SystemExit, match="not a language model folder"):
        main([str(folders["ar"].parent / "nowhere"), "--prompt", "the"])


def test_unknown_registered_model_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    with pytest.raises(SystemExit, match=r"generate: .*nope"):
        main(["models:/nope/1", "--prompt", "the"])


@pytest.mark.parametrize("objective", ["mdm", "ar"])
def test_registered_model_answers_any_max_new_tokens_up_to_its_context(
    folders: dict[str, Path], objective: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Issue 18: `predict(["12+34="], params={"max_new_tokens": 12})` of the masked model refused 12 new tokens in
    blocks of 8; every registered model answers with its defaults and with 1 .. max_len new tokens, through
    MLflow and the command line, and refuses a bad knob in one line."""
    lm = LanguageModel.from_folder(folders[objective])
    max_len, prompts = lm.model.max_len, ["12+34="]
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # restored after the test, as the global below is
    mlflow.set_tracking_uri(uri)
    try:
        experiment = mlflow.create_experiment("generate", artifact_location=(tmp_path / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            version = register_model(LanguageModel(), folders[objective], name=f"tiny-{objective}",
                                     kind=language_model_kind(objective), artifact_name="lm", input_example=prompts,
                                     inference_params=LanguageModel.default_params(max_len), tags={},
                                     description=language_model_description(f"tiny-{objective}", objective),
                                     headline="a tiny model of the generate tests")
        registered = mlflow.pyfunc.load_model(f"models:/tiny-{objective}/{version}")
        defaults = registered.predict(prompts)
        assert len(defaults) == 1 and len(defaults[0]) == LanguageModel.default_params(max_len)["max_new_tokens"]
        for max_new_tokens in (1, 7, 12, max_len):
            params = {"max_new_tokens": max_new_tokens}
            texts = registered.predict(prompts, params=params)
            assert len(texts) == 1 and len(texts[0]) == max_new_tokens  # char tokenizer: a token, a character
            assert texts == lm.predict(None, prompts, params)  # the registered version is the folder's model
            main([f"models:/tiny-{objective}/{version}", "--prompt", prompts[0], "--max-new-tokens",
                  str(max_new_tokens)])
            text = lm.generate(prompts[0], SamplerSettings(max_new_tokens=max_new_tokens))[0]
            assert len(text) == max_new_tokens and capsys.readouterr().out == f"--- sample 0 ---\n{prompts[0]}{text}\n"
        with pytest.raises(ValueError, match=re.escape("max_new_tokens=0: must be >= 1")) as refused:
            registered.predict(prompts, params={"max_new_tokens": 0})
        assert "\n" not in str(refused.value)
    finally:
        mlflow.set_tracking_uri(None)


@pytest.mark.parametrize("objective", ["mdm", "ar"])
def test_command_line_takes_any_max_new_tokens_and_refuses_a_bad_knob_in_one_line(
    folders: dict[str, Path], objective: str, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = str(folders[objective])
    lm = LanguageModel.from_folder(folders[objective])
    for max_new_tokens in (1, 7, 12, 16, 40):  # 16: the whole context; 40: beyond it
        main([folder, "--prompt", "12+34=", "--max-new-tokens", str(max_new_tokens), "--block-length", "8"])
        text = lm.generate("12+34=", SamplerSettings(max_new_tokens=max_new_tokens, block_length=8))[0]
        assert len(text) == max_new_tokens and capsys.readouterr().out == f"--- sample 0 ---\n12+34={text}\n"
    for knob, value, message in [("--max-new-tokens", "0", "max_new_tokens=0: must be >= 1"),
                                 ("--temperature", "-1", "temperature=-1.0: must be >= 0"),
                                 ("--top-k", "0", "top_k=0: must be >= 1"),
                                 ("--steps", "0", "steps=0: must be >= 1"),
                                 ("--block-length", "0", "block_length=0: must be >= 1"),
                                 ("--num-samples", "0", "num_samples=0: must be >= 1")]:
        with pytest.raises(SystemExit) as refused:
            main([folder, "--prompt", "12+34=", knob, value])
        assert str(refused.value.code).startswith(f"generate: {message}") and "\n" not in str(refused.value.code)
