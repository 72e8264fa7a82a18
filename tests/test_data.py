"""Tests for jaxq.data: IDX files, image loaders, download safety, batching, text.

No test touches the network: an autouse fixture replaces the downloader's opener and
fails any test that reaches it without installing its own fake first.
Tests on the real data need JAXQ_DATA_DIR (CI: ../shared/data, i.e. /work/shared/data).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import sys
import threading
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest

from jaxq.data import (
    CharTokenizer,
    Dataset,
    DatasetNotFoundError,
    DownloadError,
    IDXFormatError,
    batches,
    load_dataset,
    load_digits,
    load_fashion_mnist,
    load_mnist,
    load_tiny_shakespeare,
    num_batches,
    read_idx,
    read_idx_images,
    read_idx_labels,
    sample_windows,
    train_val_split,
    write_idx,
)
from jaxq.data import download, sources
from jaxq.data.digits import stratified_split
from jaxq.data.registry import IDX_DATASETS, IDXSpec

DATA_DIR = os.environ.get("JAXQ_DATA_DIR")
needs_data = pytest.mark.skipif(
    not DATA_DIR,
    reason="JAXQ_DATA_DIR is not set; point it at the folder holding mnist/, fashion_mnist/ "
    "and tinyshakespeare/ (e.g. JAXQ_DATA_DIR=/work/shared/data) to run the real-data tests",
)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    """Forbid real downloads and isolate the cache; fail the test if the opener was reached."""
    calls: list[str] = []

    def forbidden(url, timeout=None):
        calls.append(url)
        raise urllib.error.URLError("network access is forbidden in tests")

    monkeypatch.setattr(download, "_urlopen", forbidden)
    monkeypatch.setenv("JAXQ_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # a real TFDS must not answer
    yield
    assert not calls, f"a test reached the network opener: {calls}"


def _make_idx_folder(folder: Path, *, n_train=12, n_test=5, gz=True, seed=0) -> dict[str, np.ndarray]:
    """Write a tiny MNIST-like IDX dataset (4x5 images) into ``folder``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 4, 5), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 4, 5), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for stem, arr in arrays.items():
        write_idx(folder / (stem + (".gz" if gz else "")), arr)
    return arrays


@pytest.fixture(scope="module")
def mnist():
    if not DATA_DIR:
        pytest.skip("JAXQ_DATA_DIR is not set")
    d = Path(DATA_DIR) / "mnist"
    return {s: load_mnist(s, "local", data_dir=d, allow_download=False) for s in ("train", "test")}


@pytest.fixture(scope="module")
def fashion():
    if not DATA_DIR:
        pytest.skip("JAXQ_DATA_DIR is not set")
    d = Path(DATA_DIR) / "fashion_mnist"
    return {s: load_fashion_mnist(s, "local", data_dir=d, allow_download=False) for s in ("train", "test")}


@pytest.fixture(scope="module")
def shakespeare():
    if not DATA_DIR:
        pytest.skip("JAXQ_DATA_DIR is not set")
    return load_tiny_shakespeare(Path(DATA_DIR) / "tinyshakespeare")


# --------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("name", ["x.idx", "x.idx.gz"])
@pytest.mark.parametrize(
    "arr",
    [
        np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
        np.array([-3, 1, 70000, -(2**31)], dtype=np.int32),
        np.array([[1.5, -2.25], [3e30, 0.0]], dtype=np.float32),
        np.array([-1, 2, -300], dtype=np.int16),
    ],
    ids=["u8", "i32", "f32", "i16"],
)
def test_idx_round_trip(tmp_path, name, arr):
    path = write_idx(tmp_path / name, arr)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == name.endswith(".gz")
    out = read_idx(path)
    assert out.shape == arr.shape and out.dtype == arr.dtype.newbyteorder("=")
    np.testing.assert_array_equal(out, arr)


def test_idx_header_bytes_are_big_endian(tmp_path):
    path = write_idx(tmp_path / "img", np.zeros((3, 28, 28), np.uint8))
    raw = path.read_bytes()
    assert raw[:16] == bytes.fromhex("00000803 00000003 0000001c 0000001c")
    assert len(raw) == 16 + 3 * 28 * 28
    assert read_idx_images(path).shape == (3, 28, 28)


def test_idx_compression_detected_from_content(tmp_path):
    arr = np.arange(10, dtype=np.uint8)
    gz_without_suffix = write_idx(tmp_path / "labels", arr, compress=True)
    np.testing.assert_array_equal(read_idx_labels(gz_without_suffix), arr)


def test_idx_wrong_magic_names_file_expected_found(tmp_path):
    labels = write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(7, np.uint8))
    with pytest.raises(IDXFormatError) as e:
        read_idx_images(labels)
    msg = str(e.value)
    assert str(labels) in msg and "expected 2051" in msg and "found 2049" in msg


def test_idx_truncated_data(tmp_path):
    good = write_idx(tmp_path / "img", np.ones((4, 28, 28), np.uint8)).read_bytes()
    bad = tmp_path / "truncated"
    bad.write_bytes(good[:-100])
    with pytest.raises(IDXFormatError) as e:
        read_idx_images(bad)
    msg = str(e.value)
    assert str(bad) in msg and "truncated" in msg
    assert f"{4 * 28 * 28} data bytes" in msg and f"found {4 * 28 * 28 - 100}" in msg


def test_idx_truncated_gzip_stream(tmp_path):
    good = write_idx(tmp_path / "img.gz", np.arange(5000, dtype=np.int32)).read_bytes()
    bad = tmp_path / "cut.gz"
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(IDXFormatError, match="gzip stream is truncated or corrupt") as e:
        read_idx(bad)
    assert str(bad) in str(e.value)


def test_idx_truncated_header_and_trailing_bytes(tmp_path):
    short = tmp_path / "short"
    short.write_bytes(bytes.fromhex("00000803 0000"))
    with pytest.raises(IDXFormatError, match="truncated IDX header"):
        read_idx_images(short)
    tiny = tmp_path / "tiny"
    tiny.write_bytes(b"\x00\x00")
    with pytest.raises(IDXFormatError, match="too short"):
        read_idx(tiny)
    extra = tmp_path / "extra"
    extra.write_bytes(write_idx(tmp_path / "ok", np.zeros(3, np.uint8)).read_bytes() + b"\x00")
    with pytest.raises(IDXFormatError, match="trailing bytes"):
        read_idx_labels(extra)


def test_idx_not_an_idx_file(tmp_path):
    junk = tmp_path / "readme.txt"
    junk.write_text("hello, this is not IDX")
    with pytest.raises(IDXFormatError, match="not an IDX file"):
        read_idx(junk)


def test_idx_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gz"):
        read_idx(tmp_path / "nope.gz")


# --------------------------------------------------------------------------- local IDX loading


@pytest.mark.parametrize("gz", [True, False])
def test_load_local_synthetic(tmp_path, gz):
    arrays = _make_idx_folder(tmp_path / "mnist", gz=gz)
    for split, prefix, n in (("train", "train", 12), ("test", "t10k", 5)):
        ds = load_dataset("mnist", split, data_dir=tmp_path / "mnist", source="local")
        assert isinstance(ds, Dataset) and ds.split == split and len(ds) == n
        assert ds.images.shape == (n, 4, 5, 1) and ds.images.dtype == np.float32
        assert ds.labels.dtype == np.int32 and ds.num_classes == 10 and len(ds.class_names) == 10
        np.testing.assert_allclose(ds.images[..., 0] * 255, arrays[f"{prefix}-images-idx3-ubyte"], atol=1e-4)
        np.testing.assert_array_equal(ds.labels, arrays[f"{prefix}-labels-idx1-ubyte"])


def test_load_local_parent_folder_and_env(tmp_path, monkeypatch):
    _make_idx_folder(tmp_path / "fashion_mnist")
    a = load_fashion_mnist("test", "local", data_dir=tmp_path)  # parent with <name>/ inside
    monkeypatch.setenv("JAXQ_DATA_DIR", str(tmp_path))
    b = load_fashion_mnist("test", allow_download=False)  # auto -> $JAXQ_DATA_DIR/fashion_mnist
    np.testing.assert_array_equal(a.images, b.images)
    assert b.class_names[9] == "Ankle boot"


def test_corrupt_local_file_is_not_skipped(tmp_path):
    _make_idx_folder(tmp_path / "mnist")
    (tmp_path / "mnist" / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(IDXFormatError, match="train-images-idx3-ubyte.gz"):
        load_dataset("mnist", "train", data_dir=tmp_path / "mnist", allow_download=False)


def test_image_label_count_mismatch(tmp_path):
    _make_idx_folder(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(4, np.uint8))
    with pytest.raises(IDXFormatError, match="5 images but .* 4 labels"):
        load_mnist("test", "local", data_dir=tmp_path)


def test_label_out_of_range(tmp_path):
    _make_idx_folder(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.full(5, 10, np.uint8))
    with pytest.raises(IDXFormatError, match=r"labels in \[0, 10\), found 10"):
        load_mnist("test", "local", data_dir=tmp_path)


def test_bad_arguments():
    with pytest.raises(ValueError, match="Unknown dataset 'cifar10'"):
        load_dataset("cifar10", "train")
    with pytest.raises(ValueError, match="Unknown split 'validation'"):
        load_dataset("mnist", "validation")
    with pytest.raises(ValueError, match="Unknown source 'ftp'"):
        load_dataset("mnist", "train", source="ftp")


def test_local_missing_lists_places(tmp_path, monkeypatch):
    monkeypatch.delenv("JAXQ_DATA_DIR", raising=False)
    with pytest.raises(DatasetNotFoundError) as e:
        load_mnist("train", "local")
    assert "JAXQ_DATA_DIR is not set" in str(e.value)
    with pytest.raises(DatasetNotFoundError) as e:
        load_mnist("train", "local", data_dir=tmp_path)
    assert str(tmp_path) in str(e.value) and "train-images-idx3-ubyte" in str(e.value)


# --------------------------------------------------------------------------- real data


@needs_data
def test_mnist_real(mnist):
    train, test = mnist["train"], mnist["test"]
    assert train.images.shape == (60000, 28, 28, 1) and test.images.shape == (10000, 28, 28, 1)
    assert train.labels.shape == (60000,) and test.labels.shape == (10000,)
    assert train.images.dtype == np.float32 and train.labels.dtype == np.int32
    assert train.labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert test.labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert train.images.min() == 0.0 and train.images.max() == 1.0
    assert abs(float(train.images.mean()) - 0.1307) < 5e-4
    assert abs(float(train.images.std()) - 0.3081) < 5e-4
    assert np.bincount(train.labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


@needs_data
def test_fashion_mnist_real(fashion):
    train, test = fashion["train"], fashion["test"]
    assert train.images.shape == (60000, 28, 28, 1) and test.images.shape == (10000, 28, 28, 1)
    assert train.labels[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert np.bincount(train.labels).tolist() == [6000] * 10
    assert np.bincount(test.labels).tolist() == [1000] * 10
    assert abs(float(train.images.mean()) - 0.2860) < 5e-4
    assert train.class_names[0] == "T-shirt/top" and train.name == "fashion_mnist"


@needs_data
@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_registry_checksums_match_real_files(name):
    """The sha256 constants used to verify downloads agree with the real files."""
    folder = Path(DATA_DIR) / name
    for stem, expected in IDX_DATASETS[name].sha256.items():
        assert download.sha256_decompressed(folder / f"{stem}.gz") == expected, stem


@needs_data
def test_env_var_auto_source(monkeypatch):
    monkeypatch.setenv("JAXQ_DATA_DIR", DATA_DIR)
    ds = load_dataset("mnist", "test", allow_download=False)
    assert ds.images.shape == (10000, 28, 28, 1) and ds.labels[0] == 7


# --------------------------------------------------------------------------- digits


def test_digits_splits():
    train, test = load_digits("train"), load_dataset("digits", "test")
    assert train.images.shape == (1437, 8, 8, 1) and test.images.shape == (360, 8, 8, 1)
    assert train.images.dtype == np.float32 and train.labels.dtype == np.int32
    assert 0.0 == train.images.min() and train.images.max() == 1.0
    # Stratified: each class's test share is within one example of 360/1797 of its size.
    all_counts = np.bincount(train.labels, minlength=10) + np.bincount(test.labels, minlength=10)
    assert all_counts.sum() == 1797
    assert np.all(np.abs(np.bincount(test.labels, minlength=10) - all_counts * 360 / 1797) < 1)


def test_digits_deterministic_and_disjoint():
    a, b = load_digits("test"), load_digits("test")
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    from sklearn.datasets import load_digits as sk

    labels = sk().target
    tr, te = stratified_split(labels, 360, 0)
    assert len(np.intersect1d(tr, te)) == 0 and len(tr) + len(te) == 1797
    tr2, te2 = stratified_split(labels, 360, 1)
    assert not np.array_equal(te, te2)


# --------------------------------------------------------------------------- download


def _simulate_offline(monkeypatch):
    calls = []

    def offline(url, timeout=None):
        calls.append((url, timeout))
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution (simulated)")

    monkeypatch.setattr(download, "_urlopen", offline)
    return calls


def test_offline_download_fails_fast_with_instructions(tmp_path, monkeypatch):
    monkeypatch.delenv("JAXQ_DATA_DIR", raising=False)
    calls = _simulate_offline(monkeypatch)
    start = time.monotonic()
    with pytest.raises(DatasetNotFoundError) as e:
        load_mnist("train", cache_dir=tmp_path / "cache")  # auto: local, tfds, then download
    elapsed = time.monotonic() - start
    assert elapsed < 3.0, f"offline failure took {elapsed:.1f} s"
    msg = str(e.value)
    for needle in ("JAXQ_DATA_DIR", "<DATA>/mnist/", "train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz",
                   "simulated", "tfds: tensorflow_datasets is not installed", "digits"):
        assert needle in msg, needle
    assert [u for u, _ in calls] == [m + "train-images-idx3-ubyte.gz" for m in IDX_DATASETS["mnist"].mirrors]
    assert all(t is not None for _, t in calls), "urlopen must get a timeout"
    assert not any((tmp_path / "cache" / "mnist").iterdir()), "no partial files may stay in the cache"


def test_offline_explicit_download_source(tmp_path, monkeypatch):
    _simulate_offline(monkeypatch)
    with pytest.raises(DownloadError) as e:
        load_fashion_mnist("test", "download", cache_dir=tmp_path)
    msg = str(e.value)
    assert "fashion-mnist.s3-website" in msg and "JAXQ_DATA_DIR" in msg and "<DATA>/fashion_mnist/" in msg


def test_allow_download_false_never_opens(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="allow_download=False"):
        load_mnist("test", "download", allow_download=False, cache_dir=tmp_path)
    # The autouse fixture asserts that the opener was never called.


def test_hanging_connection_times_out(tmp_path, monkeypatch):
    release = threading.Event()

    def hang(url, timeout=None):  # like a DNS lookup that never returns
        release.wait(10)
        raise urllib.error.URLError("late")

    monkeypatch.setattr(download, "_urlopen", hang)
    start = time.monotonic()
    try:
        with pytest.raises(DownloadError, match="no answer within 0.2 s"):
            download.fetch_file("f.gz", ["http://a/", "http://b/"], tmp_path, connect_timeout=0.2)
    finally:
        release.set()
    assert time.monotonic() - start < 2.0


def _serve(files: dict[str, bytes], calls: list[str]):
    def fake(url, timeout=None):
        calls.append(url)
        if url not in files:
            raise urllib.error.HTTPError(url, 404, "Not Found", None, None)
        return io.BytesIO(files[url])

    return fake


def test_download_verifies_and_writes_atomically(tmp_path, monkeypatch):
    arrays = _make_idx_folder(tmp_path / "src")
    spec = IDXSpec(
        name="tiny",
        class_names=tuple("0123456789"),
        mirrors=("http://dead.invalid/", "http://mirror.invalid/"),
        sha256={s: hashlib.sha256(gzip.decompress((tmp_path / "src" / f"{s}.gz").read_bytes())).hexdigest()
                for s in arrays},
        homepage="http://mirror.invalid/",
        tfds_name="tiny",
    )
    files = {f"http://mirror.invalid/{s}.gz": (tmp_path / "src" / f"{s}.gz").read_bytes() for s in arrays}
    calls: list[str] = []
    monkeypatch.setattr(download, "_urlopen", _serve(files, calls))
    images, labels = sources.from_download(spec, "train", tmp_path / "cache", allow_download=True)
    np.testing.assert_array_equal(images, arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(labels, arrays["train-labels-idx1-ubyte"])
    assert calls[0].startswith("http://dead.invalid/")  # first mirror 404s, second serves
    cached = sorted(p.name for p in (tmp_path / "cache" / "tiny").iterdir())
    assert cached == ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]  # no .part left over
    n = len(calls)
    sources.from_download(spec, "train", tmp_path / "cache", allow_download=False)  # served from cache
    assert len(calls) == n


def test_download_checksum_mismatch_keeps_nothing(tmp_path, monkeypatch):
    payload = gzip.compress(b"not what we expected")
    calls: list[str] = []
    monkeypatch.setattr(download, "_urlopen", _serve({"http://m/f.gz": payload}, calls))
    with pytest.raises(DownloadError, match="checksum mismatch") as e:
        download.fetch_file("f.gz", ["http://m/"], tmp_path, sha256="0" * 64)
    assert "expected sha256 " + "0" * 64 in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_download_not_gzip(tmp_path, monkeypatch):
    monkeypatch.setattr(download, "_urlopen", _serve({"http://m/f.gz": b"\x1f\x8b<html>"}, []))
    with pytest.raises(DownloadError, match="not a valid gzip file"):
        download.fetch_file("f.gz", ["http://m/"], tmp_path, sha256="0" * 64)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- TFDS (faked)


def test_tfds_source_conversion(monkeypatch, tmp_path):
    import types

    seen = {}
    fake = types.ModuleType("tensorflow_datasets")

    def load(name, *, split, batch_size, as_supervised, download):
        seen.update(name=name, split=split, batch_size=batch_size, download=download)
        return np.full((3, 28, 28, 1), 255, np.uint8), np.array([1, 2, 3], np.int64)

    fake.load, fake.as_numpy = load, lambda x: x
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
    monkeypatch.delenv("JAXQ_DATA_DIR", raising=False)
    ds = load_fashion_mnist("test")  # auto: no local files, so TFDS answers
    assert seen == dict(name="fashion_mnist", split="test", batch_size=-1, download=False)
    assert ds.images.shape == (3, 28, 28, 1) and ds.images.dtype == np.float32 and ds.images.max() == 1.0
    assert ds.labels.tolist() == [1, 2, 3] and ds.labels.dtype == np.int32


def test_tfds_not_prepared_falls_through(monkeypatch, tmp_path):
    import types

    fake = types.ModuleType("tensorflow_datasets")

    def load(*a, **k):
        raise AssertionError("Dataset mnist: could not find data in ~/tensorflow_datasets")

    fake.load, fake.as_numpy = load, lambda x: x
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
    with pytest.raises(DatasetNotFoundError, match="tfds: 'mnist' is not prepared"):
        load_mnist("train", "tfds")


# --------------------------------------------------------------------------- Dataset


def test_dataset_validation_and_read_only():
    x = np.zeros((4, 2, 2, 1), np.float32)
    y = np.array([0, 1, 2, 1], np.int32)
    ds = Dataset(x, y, 3, "toy", ("a", "b", "c"))
    assert len(ds) == 4 and ds.image_shape == (2, 2, 1)
    with pytest.raises(ValueError, match="read-only"):
        ds.images[0] = 1.0
    x[0] = 1.0  # the caller's array stays writable
    with pytest.raises(ValueError, match="float32"):
        Dataset(x.astype(np.float64), y, 3, "toy", ("a", "b", "c"))
    with pytest.raises(ValueError, match="labels must lie in"):
        Dataset(x, np.array([0, 1, 2, 3], np.int32), 3, "toy", ("a", "b", "c"))
    with pytest.raises(ValueError, match="class names"):
        Dataset(x, y, 3, "toy", ("a", "b"))


# --------------------------------------------------------------------------- batching


def _toy(n: int) -> Dataset:
    x = np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1)
    return Dataset(x, (np.arange(n) % 3).astype(np.int32), 3, "toy", ("a", "b", "c"))


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("n,bs", [(10, 3), (12, 4), (1, 5), (0, 2)])
def test_batches_cover_each_example_once(shuffle, n, bs):
    ds = _toy(n)
    got = list(batches(ds, bs, shuffle=shuffle, seed=7, drop_remainder=False))
    assert len(got) == num_batches(ds, bs)
    ids = np.concatenate([x.reshape(-1) for x, _ in got]) if got else np.array([])
    assert sorted(ids.astype(int).tolist()) == list(range(n))
    for x, y in got:
        np.testing.assert_array_equal(y, x.reshape(-1).astype(int) % 3)  # pairs stay aligned
        assert x.dtype == np.float32 and y.dtype == np.int32


def test_batches_drop_remainder_and_seed():
    ds = _toy(10)
    got = list(batches(ds, 3, shuffle=True, seed=1, drop_remainder=True))
    assert len(got) == num_batches(10, 3, drop_remainder=True) == 3
    assert all(x.shape == (3, 1, 1, 1) for x, _ in got)
    ids = np.concatenate([x.reshape(-1) for x, _ in got]).astype(int)
    assert len(set(ids.tolist())) == 9
    again = np.concatenate([x.reshape(-1) for x, _ in batches(ds, 3, shuffle=True, seed=1, drop_remainder=True)])
    np.testing.assert_array_equal(ids, again)
    other = np.concatenate([x.reshape(-1) for x, _ in batches(ds, 10, shuffle=True, seed=2)])
    first = np.concatenate([x.reshape(-1) for x, _ in batches(ds, 10, shuffle=True, seed=1)])
    assert not np.array_equal(first, other)
    with pytest.raises(ValueError, match="batch_size must be positive"):
        num_batches(10, 0)


@needs_data
def test_batches_on_mnist_epoch(mnist):
    train = mnist["train"]
    got = list(batches(train, 1024, shuffle=True, seed=0))
    assert len(got) == num_batches(train, 1024) == 59
    ys = np.concatenate([y for _, y in got])
    assert len(ys) == 60000
    assert np.bincount(ys).tolist() == np.bincount(train.labels).tolist()
    # Same multiset of images: the pixel sums agree up to float rounding.
    total = sum(float(x.sum(dtype=np.float64)) for x, _ in got)
    assert abs(total - float(train.images.sum(dtype=np.float64))) < 1e-3


# --------------------------------------------------------------------------- text


@needs_data
def test_tiny_shakespeare(shakespeare):
    text = shakespeare
    assert len(text) == 1_115_394
    assert text.startswith("First Citizen:\nBefore we proceed any further, hear me speak.")
    tok = CharTokenizer.from_text(text)
    assert tok.vocab_size == 65 == len(set(text))
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.shape == (1_115_394,) and ids.max() == 64
    assert tok.decode(ids[:5000]) == text[:5000]
    train, val = train_val_split(ids, 0.1)
    assert len(val) == 111_539 and len(train) + len(val) == len(ids)
    np.testing.assert_array_equal(np.concatenate([train, val]), ids)


@needs_data
def test_tiny_shakespeare_from_env(monkeypatch):
    monkeypatch.setenv("JAXQ_DATA_DIR", DATA_DIR)
    assert len(load_tiny_shakespeare()) == 1_115_394


def test_tiny_shakespeare_missing(tmp_path, monkeypatch):
    monkeypatch.delenv("JAXQ_DATA_DIR", raising=False)
    with pytest.raises(DatasetNotFoundError, match="JAXQ_DATA_DIR is not set"):
        load_tiny_shakespeare()
    with pytest.raises(DatasetNotFoundError) as e:
        load_tiny_shakespeare(tmp_path)
    assert str(tmp_path / "input.txt") in str(e.value) and "tinyshakespeare/" in str(e.value)


def test_char_tokenizer():
    tok = CharTokenizer.from_text("hello world")
    assert tok.chars == tuple(sorted(set("hello world"))) and tok.vocab_size == 8
    ids = tok.encode("hold")
    assert tok.decode(ids) == "hold" and ids.dtype == np.int32
    with pytest.raises(ValueError, match="'z' is not in the tokenizer's vocabulary"):
        tok.encode("zoo")
    uni = CharTokenizer("αβγ ab")  # non-latin-1 characters use the dict path
    assert uni.decode(uni.encode("γα b")) == "γα b"
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        uni.encode("δ")


def test_sample_windows():
    tokens = np.arange(100, dtype=np.int32)
    x, y = sample_windows(tokens, batch=8, seq_len=16, rng=np.random.default_rng(0))
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == np.int32
    np.testing.assert_array_equal(y, x + 1)  # next-token targets
    assert x.min() >= 0 and y.max() <= 99
    x2, _ = sample_windows(tokens, 8, 16, rng=0)
    x3, _ = sample_windows(tokens, 8, 16, rng=0)
    np.testing.assert_array_equal(x2, x3)
    x4, y4 = sample_windows(np.arange(5), 3, 4, rng=1)  # only one possible window
    assert x4.tolist() == [[0, 1, 2, 3]] * 3 and y4.tolist() == [[1, 2, 3, 4]] * 3
    with pytest.raises(ValueError, match="at least seq_len"):
        sample_windows(np.arange(4), 1, 4, rng=0)


def test_train_val_split_edges():
    t = np.arange(10)
    tr, va = train_val_split(t, 0.0)
    assert len(tr) == 10 and len(va) == 0
    tr, va = train_val_split(t, 0.25)
    assert tr.tolist() == list(range(8)) and va.tolist() == [8, 9]
    with pytest.raises(ValueError):
        train_val_split(t, 1.0)
