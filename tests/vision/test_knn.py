"""kNN probe against a naive loop."""

from __future__ import annotations

import math

import torch

from pipeline_lib.vision.knn import knn_scores


def _naive(bank: torch.Tensor, labels: torch.Tensor, query: torch.Tensor, k: int, temperature: float,
           num_classes: int) -> list[float]:
    sims = [float(torch.dot(query / query.norm(), row / row.norm())) for row in bank]
    nearest = sorted(range(len(bank)), key=lambda i: -sims[i])[:k]
    votes = [0.0] * num_classes
    for i in nearest:
        votes[int(labels[i])] += math.exp(sims[i] / temperature)
    return [v / sum(votes) for v in votes]


def test_knn_scores_match_naive_votes() -> None:
    generator = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(30, 5, generator=generator), torch.randn(4, 5, generator=generator)
    labels = torch.randint(0, 3, (30,), generator=generator)
    scores = knn_scores(bank, labels, queries, num_classes=3, k=7, temperature=0.5)
    for query, row in zip(queries, scores, strict=True):
        expected = _naive(bank, labels, query, 7, 0.5, 3)
        torch.testing.assert_close(row, torch.tensor(expected), rtol=1e-5, atol=1e-6)


def test_separable_clusters_are_classified() -> None:
    centres = torch.eye(4) * 10
    bank = centres.repeat_interleave(5, dim=0) + torch.randn(20, 4) * 0.1
    labels = torch.arange(4).repeat_interleave(5)
    scores = knn_scores(bank, labels, centres + 0.05, num_classes=4, k=5)
    assert scores.argmax(dim=1).tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(scores.sum(dim=1), torch.ones(4))
