"""Weighted kNN classification on frozen features (Wu et al. 2018, as used to monitor DINO/MAE encoders).

Cosine similarity to every bank feature; the k nearest vote for their class with weight exp(sim / T).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def knn_scores(
    bank: Tensor, bank_labels: Tensor, queries: Tensor, *, num_classes: int, k: int = 20, temperature: float = 0.07
) -> Tensor:
    """(N, D) bank, (N,) labels, (M, D) queries -> (M, num_classes) vote shares (rows sum to 1)."""
    bank, queries = F.normalize(bank.float(), dim=1), F.normalize(queries.float(), dim=1)
    similarity = queries @ bank.T  # (M, N)
    k = min(k, len(bank))
    top_similarity, top_index = similarity.topk(k, dim=1)  # (M, k)
    weights = (top_similarity / temperature).exp()
    votes = torch.zeros(len(queries), num_classes, dtype=weights.dtype, device=weights.device)
    votes.scatter_add_(1, bank_labels[top_index], weights)
    return votes / votes.sum(dim=1, keepdim=True)


@torch.no_grad()
def embed(encoder: nn.Module, images: np.ndarray, preprocess: nn.Module, *, device: torch.device,
          batch_size: int = 256) -> Tensor:
    """Pooled features (N, D) of uint8 N x H x W x C images, in eval mode, on the CPU."""
    was_training = encoder.training
    encoder.eval()
    features = []
    for start in range(0, len(images), batch_size):
        pixels = torch.from_numpy(np.array(images[start : start + batch_size])).to(device)  # a writable copy
        features.append(encoder(preprocess(pixels)).float().cpu())
    encoder.train(was_training)
    return torch.cat(features)
