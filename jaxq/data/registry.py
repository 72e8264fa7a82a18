"""Static facts about the IDX datasets: file names, mirrors, checksums, class names."""

from __future__ import annotations

import dataclasses

__all__ = ["IDXSpec", "IDX_DATASETS", "idx_file_names"]


@dataclasses.dataclass(frozen=True)
class IDXSpec:
    """Where to find an IDX dataset and how to check it.

    Attributes:
      name: the dataset name used by :func:`jaxq.data.load_dataset` and as folder name.
      class_names: one name per class.
      mirrors: base URLs, tried in order; each must serve ``<base><file>.gz``.
      sha256: sha256 of each *decompressed* file, keyed by file stem
        (e.g. ``"train-images-idx3-ubyte"``).
      homepage: where users can read about and fetch the data by hand.
      tfds_name: the name of the same dataset in ``tensorflow_datasets``.
    """

    name: str
    class_names: tuple[str, ...]
    mirrors: tuple[str, ...]
    sha256: dict[str, str]
    homepage: str
    tfds_name: str


def idx_file_names(split: str) -> tuple[str, str]:
    """Stems of the (images, labels) IDX files of a split, without ``.gz``."""
    prefix = "train" if split == "train" else "t10k"
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


# Decompressed sha256 sums. They match the canonical files (LeCun's MNIST, Zalando's
# Fashion-MNIST) and the copies documented in /work/shared/data/*/README.md.
IDX_DATASETS: dict[str, IDXSpec] = {
    "mnist": IDXSpec(
        name="mnist",
        class_names=tuple(str(d) for d in range(10)),
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ),
        sha256={
            "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        },
        homepage="https://ossci-datasets.s3.amazonaws.com/mnist/",
        tfds_name="mnist",
    ),
    "fashion_mnist": IDXSpec(
        name="fashion_mnist",
        class_names=(
            "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
            "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
        ),
        mirrors=(
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/",
        ),
        sha256={
            "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        },
        homepage="https://github.com/zalandoresearch/fashion-mnist",
        tfds_name="fashion_mnist",
    ),
}
