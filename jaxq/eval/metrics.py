"""Classification quality: predictions over a dataset, accuracy and macro precision/recall/F1."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxq.data import Dataset

__all__ = ["classification_metrics", "confusion_matrix", "make_predict_fn", "predict"]

ApplyFn = Callable[[Any, jax.Array], jax.Array]


def make_predict_fn(apply_fn: ApplyFn) -> ApplyFn:
    """``jax.jit`` of ``argmax(apply_fn(params, x), -1)``: predicted classes of a batch."""
    return jax.jit(lambda p, x: jnp.argmax(apply_fn(p, x), axis=-1))


def predict(
    predict_fn: ApplyFn,
    params: Any,
    dataset: Dataset,
    batch_size: int,
    *,
    progress: bool = False,
    desc: str = "eval",
) -> np.ndarray:
    """Predicted class of every example of ``dataset``.

    The last batch is padded to ``batch_size`` so that every call has the same
    shape (one compilation).

    Args:
      predict_fn: jitted ``(params, x) -> classes``, from :func:`make_predict_fn`.
      params: its parameters (float, quantized, ...).
      dataset: examples to classify.
      batch_size: examples per call.
      progress: show a tqdm bar.
      desc: the bar's label.

    Returns:
      int32 array of shape ``(len(dataset),)``.
    """
    n = len(dataset)
    out = np.empty((n,), np.int32)
    starts = range(0, n, batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, leave=False, unit="batch"):
        x = dataset.images[start : start + batch_size]
        m = x.shape[0]
        if m < batch_size:
            x = np.concatenate([x, np.zeros((batch_size - m, *x.shape[1:]), x.dtype)])
        out[start : start + m] = np.asarray(predict_fn(params, x))[:m]
    return out


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """``C[i, j]`` = number of examples of class ``i`` predicted as ``j``."""
    y_true = np.asarray(y_true, np.int64)
    y_pred = np.asarray(y_pred, np.int64)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has shape {y_true.shape} but y_pred has shape {y_pred.shape}")
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> dict[str, float]:
    """Accuracy and macro-averaged precision, recall and F1.

    Per class ``c``: precision = TP / (TP + FP), recall = TP / (TP + FN),
    F1 = 2 P R / (P + R); a ratio with a zero denominator counts as 0 (the
    convention of scikit-learn's ``zero_division=0``). Macro averages weight every
    class equally.

    Returns:
      ``{"accuracy", "precision", "recall", "f1"}`` as fractions in ``[0, 1]``.
    """
    cm = confusion_matrix(y_true, y_pred, num_classes).astype(np.float64)
    tp = np.diag(cm)
    predicted = cm.sum(axis=0)
    actual = cm.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(actual > 0, tp / actual, 0.0)
        denom = precision + recall
        f1 = np.where(denom > 0, 2 * precision * recall / denom, 0.0)
    total = cm.sum()
    return {
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "precision": float(precision.mean()),
        "recall": float(recall.mean()),
        "f1": float(f1.mean()),
    }
