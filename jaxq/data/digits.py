"""The embedded default dataset: scikit-learn's bundled 8x8 handwritten digits (no download)."""

from __future__ import annotations

import numpy as np

from jaxq.data.dataset import Dataset, check_split

__all__ = ["load_digits", "stratified_split", "DIGITS_TEST_SIZE", "DIGITS_SEED"]

DIGITS_TEST_SIZE = 360  # of 1797 images: 1437 train / 360 test
DIGITS_SEED = 0


def stratified_split(labels: np.ndarray, test_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split of ``range(len(labels))`` into sorted (train, test) indices.

    Each class contributes to the test set in proportion to its size; the rounding
    remainders go to the classes with the largest fractional parts (ties: lower class id),
    so the test set has exactly ``test_size`` elements.
    """
    labels = np.asarray(labels)
    n = labels.shape[0]
    if not 0 < test_size < n:
        raise ValueError(f"test_size must be in (0, {n}), got {test_size}.")
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * test_size / n
    quota = np.floor(exact).astype(np.int64)
    order = np.lexsort((classes, -(exact - quota)))  # largest remainder first, then class id
    quota[order[: test_size - quota.sum()]] += 1
    rng = np.random.default_rng(seed)
    test = [rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota)]
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(n), test_idx)
    return train_idx, test_idx


def load_digits(split: str = "train", *, test_size: int = DIGITS_TEST_SIZE, seed: int = DIGITS_SEED) -> Dataset:
    """Load scikit-learn's 8x8 digits as a :class:`Dataset` of shape ``(N, 8, 8, 1)`` in ``[0, 1]``.

    The data ships inside scikit-learn (1797 images, pixels 0-16), so this never touches
    the network. The split is stratified and deterministic: with the defaults, 1437
    train and 360 test images.

    Args:
      split: ``"train"`` or ``"test"``.
      test_size: number of test images.
      seed: seed of the split.
    """
    check_split(split)
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:
        raise ImportError("The 'digits' dataset needs scikit-learn: pip install scikit-learn") from None
    bunch = sk_load_digits()
    images, labels = bunch.images, bunch.target
    train_idx, test_idx = stratified_split(labels, test_size, seed)
    idx = train_idx if split == "train" else test_idx
    return Dataset.from_uint8(
        images[idx],
        labels[idx],
        name="digits",
        class_names=tuple(str(d) for d in range(10)),
        split=split,
        scale=16.0,
    )
