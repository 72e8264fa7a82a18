"""Storage size, save/load round trip, atomic writes, integrity checks."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxq


@pytest.fixture(scope="module")
def big_int4():
    w = jax.random.normal(jax.random.key(0), (4096, 4096), jnp.float32)
    return w, jaxq.quantize({"kernel": w}, "int4-g128")


def test_int4_g128_storage_ratio(big_int4):
    w, q = big_int4
    k = q["kernel"]
    assert k.values.dtype == jnp.int8 and k.values.shape == (2048, 4096)  # really packed
    assert k.nbytes <= 0.135 * w.nbytes


def test_saved_file_size_matches_nbytes(big_int4, tmp_path):
    _, q = big_int4
    path = tmp_path / "model.jaxq"
    jaxq.save(path, q)
    size = os.path.getsize(path)
    header_allowance = 4096  # JSON header: metadata and checksums
    assert q["kernel"].nbytes <= size <= 1.01 * q["kernel"].nbytes + header_allowance


def test_round_trip_every_format(tmp_path):
    w = jax.random.normal(jax.random.key(1), (64, 32))
    tree = {
        "int8": jaxq.quantize_array(w, jaxq.QuantSpec("int8")),
        "int4": jaxq.quantize_array(w, jaxq.QuantSpec("int4", "per_group", 32, symmetric=False)),
        "nf4": jaxq.quantize_array(w, jaxq.QuantSpec("nf4", "per_group", 32)),
        "fp8": jaxq.quantize_array(w, jaxq.QuantSpec("fp8_e5m2")),
        "bf16": jaxq.quantize_array(w, jaxq.QuantSpec("bf16")),
        "w8a8": jaxq.quantize({"k": w}, "w8a8")["k"],
        "bias": jnp.arange(3.0),
        "nested": [1, (2.5, None), "name"],
    }
    jaxq.save(tmp_path / "c", tree)
    back = jaxq.load(tmp_path / "c")
    for name in ["int8", "int4", "nf4", "fp8", "bf16", "w8a8"]:
        assert back[name].meta == tree[name].meta
        np.testing.assert_array_equal(np.asarray(back[name].dequantize()), np.asarray(tree[name].dequantize()))
    np.testing.assert_array_equal(back["bias"], np.arange(3.0))
    assert back["nested"] == [1, (2.5, None), "name"]


def test_failed_save_keeps_previous_checkpoint(tmp_path):
    path = tmp_path / "c"
    good = {"w": jaxq.quantize_array(jnp.ones((4, 4)), jaxq.QuantSpec("int8"))}
    jaxq.save(path, good)
    before = path.read_bytes()

    class Boom:
        shape = (2,)
        dtype = np.float32

        def __array__(self, *a, **k):
            raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        jaxq.save(path, {"w": good["w"], "bad": Boom()})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c"]  # no temporary left behind


def test_truncated_file_is_rejected(tmp_path):
    path = tmp_path / "c"
    jaxq.save(path, {"w": jnp.ones((16, 16))})
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(jaxq.CheckpointError, match="truncated"):
        jaxq.load(path)
    path.write_bytes(data[:5])
    with pytest.raises(jaxq.CheckpointError, match="too short"):
        jaxq.load(path)


def test_corrupted_payload_is_rejected(tmp_path):
    path = tmp_path / "c"
    jaxq.save(path, {"layer": {"w": jaxq.quantize_array(jnp.ones((16, 16)), jaxq.QuantSpec("int8"))}})
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(jaxq.CheckpointError, match="checksum mismatch in /layer/w/scale"):
        jaxq.load(path)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "c"
    path.write_bytes(b"hello world, this is not a checkpoint at all")
    with pytest.raises(jaxq.CheckpointError, match="bad magic"):
        jaxq.load(path)
