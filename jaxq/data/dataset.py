"""The :class:`Dataset` container returned by every image loader."""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["Dataset", "SPLITS", "check_split"]

SPLITS = ("train", "test")


def check_split(split: str) -> str:
    """Return ``split`` if it is ``"train"`` or ``"test"``, else raise a ``ValueError``."""
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}: expected one of {SPLITS}.")
    return split


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """One split of an image classification dataset, held in memory.

    Attributes:
      images: float32 array of shape ``(N, H, W, 1)`` with values in ``[0, 1]`` (read-only).
      labels: int32 array of shape ``(N,)`` with values in ``[0, num_classes)`` (read-only).
      num_classes: number of classes.
      name: dataset name, e.g. ``"mnist"``.
      class_names: one human-readable name per class.
      split: ``"train"`` or ``"test"``.
    """

    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    name: str
    class_names: tuple[str, ...]
    split: str = "train"

    def __post_init__(self) -> None:
        images, labels = self.images, self.labels
        if images.dtype != np.float32 or images.ndim != 4 or images.shape[-1] != 1:
            raise ValueError(
                f"Dataset {self.name!r}: images must be float32 of shape (N, H, W, 1), "
                f"got {images.dtype} {images.shape}."
            )
        if labels.dtype != np.int32 or labels.shape != images.shape[:1]:
            raise ValueError(
                f"Dataset {self.name!r}: labels must be int32 of shape ({images.shape[0]},), "
                f"got {labels.dtype} {labels.shape}."
            )
        if len(self.class_names) != self.num_classes:
            raise ValueError(
                f"Dataset {self.name!r}: {len(self.class_names)} class names for "
                f"{self.num_classes} classes."
            )
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(
                f"Dataset {self.name!r}: labels must lie in [0, {self.num_classes}), "
                f"found range [{labels.min()}, {labels.max()}]."
            )
        # Store read-only views: the caller's arrays stay writable, ours do not.
        for field, arr in (("images", images), ("labels", labels)):
            view = arr.view()
            view.flags.writeable = False
            object.__setattr__(self, field, view)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Shape of one image, ``(H, W, 1)``."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, split={self.split!r}, n={len(self)}, "
            f"image_shape={self.image_shape}, num_classes={self.num_classes})"
        )

    @classmethod
    def from_uint8(
        cls,
        images: np.ndarray,
        labels: np.ndarray,
        *,
        name: str,
        class_names: tuple[str, ...],
        split: str,
        scale: float = 255.0,
    ) -> Dataset:
        """Build a Dataset from integer pixels ``(N, H, W)`` or ``(N, H, W, 1)``, dividing by ``scale``."""
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[..., None]
        x = images.astype(np.float32)
        x /= np.float32(scale)
        y = np.asarray(labels).astype(np.int32)
        return cls(x, y, len(class_names), name, tuple(class_names), split)
