"""Minibatch iteration over an in-memory :class:`~jaxq.data.dataset.Dataset`."""

from __future__ import annotations

from typing import Iterator

import numpy as np

from jaxq.data.dataset import Dataset

__all__ = ["batches", "num_batches"]


def num_batches(num_examples: int | Dataset, batch_size: int, *, drop_remainder: bool = False) -> int:
    """Number of batches :func:`batches` yields per epoch.

    Args:
      num_examples: an example count, or a :class:`Dataset`.
      batch_size: examples per batch (> 0).
      drop_remainder: whether the last, smaller batch is dropped.
    """
    n = len(num_examples) if isinstance(num_examples, Dataset) else int(num_examples)
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    return n // batch_size if drop_remainder else -(-n // batch_size)


def batches(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    drop_remainder: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield one epoch of ``(x, y)`` numpy batches.

    Every example appears exactly once per epoch (except the dropped remainder when
    ``drop_remainder``). With ``shuffle``, the order is a permutation drawn from
    ``numpy.random.default_rng(seed)``, so the same seed gives the same batches; pass
    a different seed per epoch (e.g. ``seed=base_seed + epoch``) to reshuffle.

    Args:
      dataset: the data.
      batch_size: examples per batch (> 0).
      shuffle: visit the examples in a random order.
      seed: seed of the permutation, used only when ``shuffle``.
      drop_remainder: skip the final batch if it has fewer than ``batch_size`` examples
        (keeps shapes static under ``jax.jit``).

    Yields:
      ``x`` float32 ``(B, H, W, 1)`` and ``y`` int32 ``(B,)``.
    """
    n = len(dataset)
    count = num_batches(n, batch_size, drop_remainder=drop_remainder)
    order = np.random.default_rng(seed).permutation(n) if shuffle else None
    for i in range(count):
        sl = slice(i * batch_size, min((i + 1) * batch_size, n))
        if order is None:
            yield dataset.images[sl], dataset.labels[sl]
        else:
            yield dataset.images[order[sl]], dataset.labels[order[sl]]
