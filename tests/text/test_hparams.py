"""DeepSeek LLM's hyperparameter scaling laws: the paper's 7B and 67B settings, the FLOP count and the cap policy."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from pipeline_lib.text.hparams import (
    FIT_RANGE,
    LR_COEF,
    LR_EXP,
    AutoHparams,
    ScalingLawRangeWarning,
    auto_hparams,
    flops_per_token,
    law_batch_tokens,
    law_lr,
)

ROOT = Path(__file__).resolve().parents[2]

# DeepSeek LLM (arXiv 2401.02954), Table 2: layers, d_model, context length, sequence batch size, learning rate,
# training tokens. The shapes agree with the released configs (deepseek-llm-7b-base: 30 layers, hidden 4096;
# deepseek-llm-67b-base: 95 layers, hidden 8192; max_position_embeddings 4096). 2304 × 4096 = 9.44M tokens.
# The 67B model uses grouped-query attention, but eq. 2 (and so this test) counts 4·d² attention parameters.
DEEPSEEK = {
    "7B": {"n_layer": 30, "d_model": 4096, "seq_len": 4096, "tokens": 2.0e12, "batch": 2304, "lr": 4.2e-4},
    "67B": {"n_layer": 95, "d_model": 8192, "seq_len": 4096, "tokens": 2.0e12, "batch": 4608, "lr": 3.2e-4},
}
TOLERANCE = 0.10  # the "within 10%"; the 67B batch is the tightest (law 5043 vs 4608, +9.4%)


def _shape(name: str) -> dict[str, int]:
    run = DEEPSEEK[name]
    return {"n_layer": run["n_layer"], "d_model": run["d_model"], "seq_len": run["seq_len"]}


@pytest.mark.parametrize("name", DEEPSEEK)
def test_laws_reproduce_deepseek_settings(name: str) -> None:
    run = DEEPSEEK[name]
    compute = flops_per_token(**_shape(name)) * run["tokens"]
    assert 1e22 < compute < 1e25  # far above FIT_RANGE: the paper's own extrapolation
    assert law_lr(compute) == pytest.approx(run["lr"], rel=TOLERANCE)
    assert law_batch_tokens(compute) / run["seq_len"] == pytest.approx(run["batch"], rel=TOLERANCE)


@pytest.mark.parametrize("name", DEEPSEEK)
def test_auto_hparams_reproduce_deepseek_settings_and_only_note_the_extrapolation(name: str) -> None:
    run = DEEPSEEK[name]
    with pytest.warns(ScalingLawRangeWarning, match="above the fitted range"):
        hp = auto_hparams(flops_per_token=flops_per_token(**_shape(name)), tokens=run["tokens"],
                          seq_len=run["seq_len"])
    assert hp.lr == hp.law_lr == pytest.approx(run["lr"], rel=TOLERANCE)
    assert hp.batch_size == pytest.approx(run["batch"], rel=TOLERANCE)
    assert hp.batch_size == round(hp.law_batch_tokens / run["seq_len"])
    assert hp.batch_tokens == hp.batch_size * run["seq_len"]
    assert hp.fit == "above" and hp.capped == ()
    assert len(hp.notes) == 1 and "extrapolated" in hp.notes[0]


def test_7b_matches_the_hand_computation() -> None:
    m = flops_per_token(**_shape("7B"))
    assert m == pytest.approx(4.228e10, rel=1e-3)
    assert m * 2e12 == pytest.approx(8.456e22, rel=1e-3)
    assert law_lr(m * 2e12) == pytest.approx(4.246e-4, rel=1e-3)
    assert law_batch_tokens(m * 2e12) == pytest.approx(9.223e6, rel=1e-3)


@pytest.mark.parametrize(("n_layer", "d_model", "seq_len"),
                         [(2, 96, 64), (30, 4096, 4096), (95, 8192, 4096), (1, 1, 1)])
def test_dense_flops_per_token_is_deepseek_eq2(n_layer: int, d_model: int, seq_len: int) -> None:
    expected = 72 * n_layer * d_model**2 + 12 * n_layer * d_model * seq_len
    assert flops_per_token(n_layer=n_layer, d_model=d_model, seq_len=seq_len) == expected
    dense = flops_per_token(n_layer=n_layer, d_model=d_model, seq_len=seq_len, mlp_active_params=8 * d_model**2)
    assert dense == expected


def test_mixture_of_experts_counts_only_active_expert_params() -> None:
    d = 64
    active = 2 * 3 * d * (d // 2)  # two activated SwiGLU experts of hidden width d/2
    moe = flops_per_token(n_layer=4, d_model=d, seq_len=32, mlp_active_params=active)
    assert moe == 6 * 4 * (4 * d * d + active) + 12 * 4 * d * 32
    assert moe < flops_per_token(n_layer=4, d_model=d, seq_len=32)


def test_in_range_gives_the_law_values_without_warning() -> None:
    compute = 1e18
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hp = auto_hparams(flops_per_token=1e8, tokens=1e10, seq_len=512)
    assert caught == []
    assert hp.compute == compute and hp.fit == "within"
    assert hp.lr == hp.law_lr == LR_COEF * compute**LR_EXP
    assert hp.law_batch_tokens == law_batch_tokens(compute)
    assert hp.batch_size == round(law_batch_tokens(compute) / 512)
    assert hp.capped == () and hp.notes == ()
    assert hp.as_params()["hparams.capped"] == "none"


@pytest.mark.parametrize("compute", FIT_RANGE)
def test_range_edges_are_within(compute: float) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hp = auto_hparams(flops_per_token=1e8, tokens=1.0, seq_len=64, compute=compute)
    assert hp.fit == "within" and hp.lr == law_lr(compute)


def test_below_range_caps_lr_at_the_bottom_of_the_fit_warns_and_notes() -> None:
    m = flops_per_token(n_layer=2, d_model=96, seq_len=64)  # the CPU default of params.yaml
    with pytest.warns(ScalingLawRangeWarning, match=r"below the fitted range") as record:
        hp = auto_hparams(flops_per_token=m, tokens=3.0e6, seq_len=64)
    assert hp.compute == pytest.approx(4.42e12, rel=1e-2) and hp.fit == "below"
    assert hp.law_lr == law_lr(hp.compute) > law_lr(FIT_RANGE[0])  # the raw law would be larger
    assert hp.lr == law_lr(FIT_RANGE[0]) == pytest.approx(2.338e-3, rel=1e-3)
    assert hp.batch_size == round(law_batch_tokens(hp.compute) / 64)  # the batch law is still used
    assert hp.capped == ("lr",)
    assert hp.notes == (str(record[0].message),)
    assert "4.42e+12" in hp.notes[0] and "1e+17" in hp.notes[0] and "lr capped" in hp.notes[0]


def test_multiple_of_rounds_to_a_positive_multiple_and_notes() -> None:
    law = round(law_batch_tokens(1e18) / 512)
    assert law == 440  # C = 1e18: the law's 2.26e5 tokens are 440 sequences of 512
    hp = auto_hparams(flops_per_token=1e8, tokens=1e10, seq_len=512, multiple_of=7)
    assert hp.batch_size == 441 and hp.batch_tokens == 441 * 512  # the nearest multiple of 7
    assert hp.capped == ("multiple_of",) and "multiple_of=7" in hp.notes[0]
    already = auto_hparams(flops_per_token=1e8, tokens=1e10, seq_len=512, multiple_of=8)
    assert already.batch_size == 440 and already.capped == () and already.notes == ()
    tiny = auto_hparams(flops_per_token=1e8, tokens=1e10, seq_len=512, multiple_of=4096)
    assert tiny.batch_size == 4096  # at least one multiple, never zero


def test_max_batch_caps_to_a_multiple_below_it_and_notes() -> None:
    hp = auto_hparams(flops_per_token=1e8, tokens=1e10, seq_len=512, max_batch=100, multiple_of=3)
    assert hp.batch_size == 99 and hp.batch_tokens == 99 * 512
    assert hp.capped == ("multiple_of", "max_batch")
    assert "max_batch=100" in hp.notes[-1]
    assert hp.as_params()["hparams.capped"] == "multiple_of,max_batch"
    unchanged = auto_hparams(flops_per_token=1e8, tokens=1e10, seq_len=512, max_batch=10**6)
    assert unchanged.capped == () and unchanged.batch_size == round(unchanged.law_batch_tokens / 512)


def test_max_batch_below_multiple_of_is_an_error() -> None:
    with pytest.raises(ValueError, match="max_batch=2 is smaller than multiple_of=4"):
        auto_hparams(flops_per_token=1e8, tokens=1e10, seq_len=512, max_batch=2, multiple_of=4)


def test_as_params_is_flat_and_loggable() -> None:
    with pytest.warns(ScalingLawRangeWarning):
        hp = auto_hparams(flops_per_token=1e6, tokens=1e6, seq_len=64, max_batch=10)
    params = hp.as_params()
    assert set(params) == {"hparams.compute", "hparams.flops_per_token", "hparams.tokens", "hparams.fit",
                           "hparams.law.lr", "hparams.law.batch_tokens", "hparams.used.lr",
                           "hparams.used.batch_size", "hparams.used.batch_tokens", "hparams.capped"}
    assert all(isinstance(value, float | int | str) for value in params.values())
    assert params["hparams.used.lr"] == hp.lr and params["hparams.law.lr"] == hp.law_lr
    assert params["hparams.capped"] == "lr,max_batch" and params["hparams.fit"] == "below"
    with pytest.raises(AttributeError):
        hp.lr = 1.0  # type: ignore[misc]  # frozen
    assert isinstance(hp, AutoHparams)


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"flops_per_token": 0.0}, "flops_per_token"),
    ({"tokens": -1.0}, "tokens"),
    ({"tokens": math.nan}, "tokens"),
    ({"seq_len": 0}, "seq_len"),
    ({"seq_len": 64.0}, "seq_len"),
    ({"compute": 0.0}, "compute"),
    ({"max_batch": 0}, "max_batch"),
    ({"multiple_of": 0}, "multiple_of"),
])
def test_invalid_auto_hparams_inputs_name_the_argument(kwargs: dict[str, float], name: str) -> None:
    good = {"flops_per_token": 1e8, "tokens": 1e10, "seq_len": 512}
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        auto_hparams(**{**good, **kwargs})


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"n_layer": 0}, "n_layer"), ({"d_model": -4}, "d_model"), ({"seq_len": 0}, "seq_len"),
    ({"mlp_active_params": -1}, "mlp_active_params"),
])
def test_invalid_shapes_name_the_argument(kwargs: dict[str, int], name: str) -> None:
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        flops_per_token(**{"n_layer": 2, "d_model": 96, "seq_len": 64, **kwargs})


@pytest.mark.parametrize("law", [law_lr, law_batch_tokens])
def test_laws_reject_non_positive_compute(law: object) -> None:
    with pytest.raises(ValueError, match=r"^compute must be"):
        law(0.0)  # type: ignore[operator]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline_lib.text.hparams", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_cli_prints_the_used_values() -> None:
    done = _cli("--n-layer", "30", "--d-model", "4096", "--seq-len", "4096", "--tokens", "2e12", "--multiple-of", "8")
    assert done.returncode == 0, done.stderr
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ScalingLawRangeWarning)
        hp = auto_hparams(flops_per_token=flops_per_token(**_shape("7B")), tokens=2e12, seq_len=4096, multiple_of=8)
    assert f"hparams.used.batch_size = {hp.batch_size}\n" in done.stdout
    assert f"hparams.used.lr = {hp.lr:.4g}\n" in done.stdout
    assert "hparams.capped = multiple_of" in done.stdout
    assert "note: compute budget C = 8.46e+22 FLOPs is above the fitted range" in done.stdout


def test_cli_reads_the_params_file_with_overrides(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("text_model:\n  n_layer: 2\n  d_model: 96\n  n_head: 3\n  seq_len: 64\n")
    done = _cli("--params", str(params), "-S", "text_model.n_layer=4", "--tokens", "3e6")
    assert done.returncode == 0, done.stderr
    m = flops_per_token(n_layer=4, d_model=96, seq_len=64)
    assert "model: n_layer=4 d_model=96 seq_len=64" in done.stdout
    assert f"hparams.flops_per_token = {m:.4g}" in done.stdout
    assert "hparams.used.lr = 0.002338" in done.stdout and "hparams.capped = lr" in done.stdout


def test_cli_rejects_missing_inputs() -> None:
    done = _cli("--n-layer", "2", "--d-model", "96", "--seq-len", "64")
    assert done.returncode == 2 and "--tokens or --compute" in done.stderr
    done = _cli("--n-layer", "2", "--compute", "1e18")
    assert done.returncode == 2 and "--d-model, --seq-len" in done.stderr
