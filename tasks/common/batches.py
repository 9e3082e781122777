"""Data-parallel batching over in-memory arrays: per-rank shards of a seeded permutation.

Every rank draws the same permutation for an epoch (from ``seed`` and ``epoch``) and takes a strided
slice of it, so shards are disjoint, cover the epoch, and a resumed run replays exactly the batches
an uninterrupted one would have seen.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch


def epoch_shard(n: int, epoch: int, seed: int, rank: int, world: int, micro_batch: int,
                steps: int) -> np.ndarray:
    """Indices this rank trains on in ``epoch``: ``steps`` micro-batches of ``micro_batch``."""
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[rank::world][: steps * micro_batch]


@dataclass(frozen=True)
class EvalShard:
    """This rank's slice of an evaluation set, padded so every rank runs the same number of batches
    (ZeRO-3 gathers parameters collectively in each forward); padding rows carry weight 0."""

    n: int
    rank: int
    world: int
    batch: int

    def batches(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        per_rank = -(-self.n // self.world)
        n_batches = max(1, -(-per_rank // self.batch))
        own = np.arange(self.rank, self.n, self.world)
        padded = np.resize(own if len(own) else np.arange(min(1, self.n)), n_batches * self.batch)
        weight = np.zeros(len(padded), np.float32)
        weight[: len(own)] = 1.0
        for i in range(n_batches):
            s = slice(i * self.batch, (i + 1) * self.batch)
            yield padded[s], weight[s]


def normalise(images: np.ndarray, mean: float, std: float, pixel_max: float = 255.0) -> torch.Tensor:
    """uint8 (or 0..pixel_max float) pixels -> the float tensor the model trains on."""
    x = torch.from_numpy(np.array(images, dtype=np.float32))  # a copy: sources may be read-only
    return (x / pixel_max - mean) / std


def predict_labels(model: torch.nn.Module, images: np.ndarray, mean: float, std: float,
                   batch: int = 500) -> np.ndarray:
    """Arg-max labels of ``model`` (in eval mode) over uint8 images, in batches."""
    with torch.no_grad():
        return np.concatenate([model(normalise(images[i:i + batch], mean, std)).argmax(1).numpy()
                               for i in range(0, len(images), batch)])
