"""Validation scoring of the language models: sliding windows for the AR model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline_lib.text.models.likelihood import ar_nats, sliding_windows
from pipeline_lib.text.models.transformer import TransformerLM


@pytest.mark.parametrize(("num_tokens", "length", "stride"), [(11, 4, 2), (50, 8, 3), (9, 8, 8), (40, 8, 8)])
def test_sliding_windows_score_every_target_once_with_context(num_tokens: int, length: int, stride: int) -> None:
    starts, first = sliding_windows(num_tokens, length, stride)
    targets = [start + j + 1 for start, skip in zip(starts, first, strict=True) for j in range(skip, length)]
    assert sorted(targets) == list(range(1, num_tokens))  # every id but the first, once
    assert starts[-1] + length == num_tokens - 1  # the last window ends at the last id
    assert all(skip >= length - stride for skip in first[1:])  # later windows: at least length - stride context


def test_sliding_windows_refuse_a_stream_shorter_than_one_window() -> None:
    with pytest.raises(ValueError, match="stride=2 <= length=8 < num_tokens=8"):
        sliding_windows(8, 8, 2)


def test_ar_nats_with_full_stride_is_the_sum_over_consecutive_windows() -> None:
    torch.manual_seed(0)
    model = TransformerLM(7, d_model=16, n_layer=1, n_head=2, max_len=8, causal=True).eval()
    tokens = np.random.default_rng(0).integers(0, 7, size=3 * 8 + 1).astype(np.uint16)
    ids = torch.from_numpy(tokens.astype(np.int64))
    reference = sum(torch.nn.functional.cross_entropy(model(ids[i : i + 8][None])[0], ids[i + 1 : i + 9],
                                                      reduction="sum").item() for i in (0, 8, 16))
    assert ar_nats(model, tokens, stride=8) == pytest.approx(reference, rel=1e-5)
    # Overlapping windows give the later targets more context, so the total changes, but it stays a sum over the
    # same 24 targets: here, each target's NLL from its own recomputation.
    starts, first = sliding_windows(len(tokens), 8, 3)
    expected = 0.0
    for start, skip in zip(starts, first, strict=True):
        nll = torch.nn.functional.cross_entropy(model(ids[start : start + 8][None])[0], ids[start + 1 : start + 9],
                                                reduction="none")
        expected += nll[skip:].sum().item()
    assert ar_nats(model, tokens, stride=3) == pytest.approx(expected, rel=1e-5)
