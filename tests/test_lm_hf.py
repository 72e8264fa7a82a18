"""HF safetensors loader (:mod:`jaxq.lm.hf`) + :class:`Decoder` against an independent numpy
reference (:mod:`lm_reference`) on random-init checkpoints of every family, plus the real
TinyStories-656K folder (needs $JAXQ_DATA_DIR) and the loader's error messages."""

from __future__ import annotations

import json
import os
import shutil
import weakref
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxq
from jaxq.lm import hf as hfmod
from jaxq.lm.hf import config_from_hf, config_to_hf, load_hf, write_hf
from jaxq.models.decoder import Decoder
from jaxq.models.decoder_config import DecoderConfig, RopeScaling

import lm_reference as ref

IDS = np.random.default_rng(0).integers(0, ref.VOCAB, 12)  # longer than the sliding windows (4)
FAMILIES = list(ref.FAMILIES)
TOL = {"float32": 1e-4, "bfloat16": 1e-3, "float16": 1e-3}  # times max |logit|


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """``ckpt(family, dtype="float32", **kw)``: a cached random-init HF folder."""
    root = tmp_path_factory.mktemp("hf")
    made: dict = {}

    def get(family: str, dtype: str = "float32", **kw) -> Path:
        key = (family, dtype, tuple(sorted(kw.items())))
        if key not in made:
            name = "_".join([family, dtype] + [f"{k}{v}" for k, v in sorted(kw.items())])
            made[key] = ref.make_checkpoint(root / name, family, dtype=dtype, **kw)
        return made[key]

    return get


def _logits(cfg: DecoderConfig, params, ids=IDS) -> np.ndarray:
    return np.asarray(jax.jit(Decoder(cfg).apply)({"params": params}, jnp.asarray(ids)[None]))[0]


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --- every family against the numpy reference -------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_matches_numpy_reference(ckpt, family, dtype):
    folder = ckpt(family, dtype)
    cfg, params, tok = load_hf(folder)
    want = ref.forward(folder, IDS)  # from the stored (bf16) values, upcast to float64
    got = _logits(cfg, params)
    assert got.shape == (len(IDS), ref.VOCAB)
    leaf = params["lm_head"]["kernel"]
    assert leaf.dtype == jnp.dtype(dtype)
    err = np.abs(got - want).max()
    assert err <= TOL[dtype] * np.abs(want).max(), (family, dtype, err, np.abs(want).max())
    assert tok.encode("w5 w7").ids == [5, 7]


def test_fp16_checkpoint(ckpt):
    folder = ckpt("qwen2", "float16")
    cfg, params, _ = load_hf(folder)
    want = ref.forward(folder, IDS)
    assert params["layers_0"]["attn"]["q_proj"]["bias"].dtype == jnp.float16
    assert np.abs(_logits(cfg, params) - want).max() <= TOL["float16"] * np.abs(want).max()


# Each fixture's special features change the reference logits at this prompt, so matching the
# reference above means the loader and the model really implement them.
FEATURE_MUTATIONS = {
    "llama3": [("rope_scaling", None)],
    "mistral": [("rope_scaling", None)],
    "gemma2": [("attn_logit_softcapping", None), ("final_logit_softcapping", None),
               ("sliding_window", 100), ("query_pre_attn_scalar", 16)],
    "gemma3": [("rope_local_base_freq", 1_000_000.0), ("sliding_window", 100),
               ("rope_scaling", None), ("sliding_window_pattern", 3)],
    "gemma3_mm": [("layer_types", ["sliding_attention"] * 7)],
}


@pytest.mark.parametrize("family,key,value", [(f, k, v) for f, ms in FEATURE_MUTATIONS.items() for k, v in ms])
def test_fixture_features_matter(ckpt, tmp_path, family, key, value):
    folder = ckpt(family)
    base = ref.forward(folder, IDS)
    mutated = tmp_path / "m"
    shutil.copytree(folder, mutated)
    hf = json.loads((mutated / "config.json").read_text())
    ref.text_config(hf)[key] = value
    (mutated / "config.json").write_text(json.dumps(hf))
    other = ref.forward(mutated, IDS)
    assert np.abs(other - base).max() > 100 * TOL["float32"] * np.abs(base).max(), (family, key)


def test_configs(ckpt):
    cfg = load_hf(ckpt("gemma3"), tokenizer=False)[0]
    assert cfg.arch == "gemma3" and cfg.qk_norm and cfg.norm_plus_one and cfg.post_norms and cfg.embed_scale
    assert cfg.layer_kinds == ("sliding",) * 5 + ("global", "sliding")
    assert (cfg.rope_theta, cfg.rope_local_theta, cfg.sliding_window) == (1e6, 1e4, 4)
    assert cfg.rope_scaling == RopeScaling("linear", 2.0) and cfg.scaling("sliding") is None and cfg.scaling("global").factor == 2.0
    assert cfg.tie_word_embeddings and cfg.final_softcap is None and cfg.add_bos
    cfg = load_hf(ckpt("gemma2"), tokenizer=False)[0]
    assert cfg.layer_kinds == ("sliding", "global", "sliding", "global")
    assert (cfg.attn_softcap, cfg.final_softcap) == (2.0, 3.0)
    assert cfg.query_scale == pytest.approx(24 ** -0.5)
    cfg = load_hf(ckpt("llama3"), tokenizer=False)[0]
    assert cfg.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 64) and not cfg.tie_word_embeddings
    assert cfg.eos_token_ids == (2,) and cfg.bos_token_id == 1
    cfg = load_hf(ckpt("mistral"), tokenizer=False)[0]
    assert cfg.arch == "llama" and cfg.head_dim == 16
    params = load_hf(ckpt("llama"), tokenizer=False)[1]
    assert "embed_tokens" not in params and params["lm_head"]["kernel"].shape == (ref.HIDDEN, ref.VOCAB)
    assert "embed_tokens" in load_hf(ckpt("qwen3"), tokenizer=False)[1]
    # HF defaults and real-config quirks
    c = config_from_hf({"model_type": "gemma3", "text_config": {
        "model_type": "gemma3_text", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 12}})
    assert c.vocab_size == 262208 and c.num_heads == 8 and c.head_dim == 256
    assert [i for i in range(12) if c.layer_kind(i) == "global"] == [5, 11] and c.sliding_window == 4096
    c = config_from_hf(dict(ref._BASE, model_type="qwen3", num_hidden_layers=1, head_dim=None,
                            rope_parameters={"rope_theta": 5e5, "rope_type": "default"}))
    assert c.head_dim == 8 and c.rope_theta == 5e5 and c.qk_norm
    c = config_from_hf(dict(ref._BASE, model_type="llama", num_hidden_layers=1, eos_token_id=[2, 5],
                            rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}))
    assert c.eos_token_ids == (2, 5) and c.rope_scaling.factor == 32.0


# --- storage variants ------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama3", "gemma3_mm"])
def test_sharded_equals_single_file(ckpt, family):
    one = load_hf(ckpt(family), tokenizer=False)
    three = load_hf(ckpt(family, shards=3), tokenizer=False)
    assert (ckpt(family, shards=3) / "model.safetensors.index.json").is_file()
    assert one[0] == three[0]
    _assert_trees_equal(one[1], three[1])


@pytest.mark.parametrize("tied_as", ["embed", "lm_head", "both"])
def test_tied_storage_forms(ckpt, tied_as):
    cfg, params, _ = load_hf(ckpt("qwen2", tied_as=tied_as), tokenizer=False)
    assert list(params) == [f"layers_{i}" for i in range(2)] + ["norm", "lm_head"]
    _assert_trees_equal(params, load_hf(ckpt("qwen2"), tokenizer=False)[1])


def test_dtype_cast_at_load(ckpt):
    cast = load_hf(ckpt("gemma2"), dtype=jnp.bfloat16, tokenizer=False)[1]
    _assert_trees_equal(cast, load_hf(ckpt("gemma2", "bfloat16"), tokenizer=False)[1])
    up = load_hf(ckpt("gemma2", "bfloat16"), dtype="float32", tokenizer=False)[1]
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(up))


POLICIES = ["int8", "int4-g32", jaxq.Policy((jaxq.Rule(r"attn/(q|k)_proj/kernel", "int4-g32"),
                                             jaxq.Rule(r"mlp/", "fp8_e4m3"),
                                             jaxq.Rule(r"lm_head", "int8")))]


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
@pytest.mark.parametrize("policy", POLICIES, ids=["int8", "int4-g32", "rules"])
def test_quantize_at_load_equals_quantize_after(ckpt, family, policy):
    folder = ckpt(family)
    at_load = load_hf(folder, quantize=policy, tokenizer=False)[1]
    after = jaxq.quantize(load_hf(folder, tokenizer=False)[1], policy)
    assert any(jaxq.is_qarray(x) for x in jax.tree.leaves(at_load, is_leaf=jaxq.is_qarray))
    _assert_trees_equal(at_load, after)
    cfg = load_hf(folder, tokenizer=False)[0]
    assert np.isfinite(_logits(cfg, at_load)).all()


def test_quantize_at_load_holds_one_float_tensor(ckpt, monkeypatch):
    """While tensor k is quantized, no earlier float tensor that was quantized is still alive."""
    live: list[weakref.ref] = []
    worst = []
    real = hfmod._quantize_tree

    def spy(tree, policy):
        # Reference counting frees a dropped tensor at once (no cycles here), so no gc.collect():
        # a live weak reference means something still holds that float tensor.
        worst.append(sum(r() is not None for r in live))
        x = jax.tree.leaves(tree)[0]
        out = real(tree, policy)
        if jaxq.is_qarray(jax.tree.leaves(out, is_leaf=jaxq.is_qarray)[0]):  # float leaves stay
            live.append(weakref.ref(x))
        return out

    monkeypatch.setattr(hfmod, "_quantize_tree", spy)
    load_hf(ckpt("qwen3"), quantize="int8", tokenizer=False)
    assert len(worst) == len(hfmod.hf_weights(load_hf(ckpt("qwen3"), tokenizer=False)[0]))
    assert max(worst) == 0 and len(live) > 10


# --- write_hf ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_write_hf_round_trip(ckpt, tmp_path, family):
    cfg, params, tok = load_hf(ckpt(family))
    out = write_hf(tmp_path / "out", cfg, params, tok)
    cfg2, params2, tok2 = load_hf(out)
    assert cfg2 == cfg
    _assert_trees_equal(params2, params)
    assert tok2.encode("w9").ids == [9]
    # the written config.json is read the same way by the independent reference
    np.testing.assert_allclose(ref.forward(out, IDS), ref.forward(ckpt(family), IDS), rtol=0, atol=1e-12)


def test_write_hf_sharded_and_bf16(ckpt, tmp_path):
    cfg, params, _ = load_hf(ckpt("gemma3"), tokenizer=False)
    out = write_hf(tmp_path / "s", cfg, params, max_shard_bytes=20_000)
    assert len(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    _assert_trees_equal(load_hf(out, tokenizer=False)[1], params)
    out = write_hf(tmp_path / "b", cfg, params, dtype=jnp.bfloat16)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    _assert_trees_equal(load_hf(out, tokenizer=False)[1], load_hf(ckpt("gemma3", "bfloat16"), tokenizer=False)[1])


def test_write_hf_rejects(ckpt, tmp_path):
    cfg, params, _ = load_hf(ckpt("llama3"), tokenizer=False)
    with pytest.raises(ValueError, match="QArray.*dequantize"):
        write_hf(tmp_path / "q", cfg, jaxq.quantize(params, "int8"))
    with pytest.raises(ValueError, match="qk_norm=True"):
        write_hf(tmp_path / "k", DecoderConfig(**{**cfg.to_dict(), "qk_norm": True,
                                                   "rope_scaling": cfg.rope_scaling}), params)
    with pytest.raises(ValueError, match="rope_interleaved"):
        config_to_hf(DecoderConfig(rope_interleaved=True))


# --- real checkpoint ---------------------------------------------------------------------------
def test_tinystories_matches_old_loader():
    data = os.environ.get("JAXQ_DATA_DIR")
    if not data:
        pytest.skip("JAXQ_DATA_DIR is unset: it must point at the shared data folder holding tinystories_656k/")
    from jaxq.models.llama import Llama
    from jaxq.models.llama_weights import load_tinystories

    folder = Path(data) / "tinystories_656k"
    cfg, params, tok = load_hf(folder)
    assert cfg.arch == "llama" and cfg.tie_word_embeddings and "embed_tokens" not in params
    assert cfg.bos_token_id == 1 and cfg.add_bos  # add_bos_token (and the tokenizer prepends it itself)
    ids = np.asarray(tok.encode("Once upon a time, there was a little boy named Tom. He liked to play.").ids)
    assert ids[0] == 1
    old_cfg, old_params, _ = load_tinystories(folder)
    want = np.asarray(Llama(old_cfg).apply({"params": old_params}, jnp.asarray(ids)[None]))[0]
    got = _logits(cfg, params, ids)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    np.testing.assert_allclose(got, ref.forward(folder, ids), atol=1e-4 * np.abs(want).max())


# --- bad input ---------------------------------------------------------------------------------
def test_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no config\.json.*must contain config\.json, model\.safetensors"):
        load_hf(tmp_path)


def test_unknown_model_type(ckpt, tmp_path):
    folder = tmp_path / "x"
    shutil.copytree(ckpt("llama"), folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt_neox", "hidden_size": 8}))
    with pytest.raises(ValueError, match=r"model_type 'gpt_neox' is not supported; supported: llama, mistral, qwen2"):
        load_hf(folder)


def test_missing_tensor(tmp_path):
    ts = ref.random_tensors(ref.FAMILIES["qwen3"])
    del ts["model.layers.1.mlp.up_proj.weight"]
    folder = ref.make_checkpoint(tmp_path / "m", "qwen3", tensors=ts, shards=2)
    with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'; "
                                         r"searched model-00001-of-00002\.safetensors, model-00002"):
        load_hf(folder)


def test_wrong_shape(tmp_path):
    ts = ref.random_tensors(ref.FAMILIES["llama3"])
    ts["model.layers.0.self_attn.k_proj.weight"] = np.zeros((16, 31), np.float32)
    folder = ref.make_checkpoint(tmp_path / "w", "llama3", tensors=ts)
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \(16, 31\), "
                                         r"expected \(16, 32\)"):
        load_hf(folder)


def test_missing_files(ckpt, tmp_path):
    folder = tmp_path / "f"
    shutil.copytree(ckpt("llama"), folder)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"no tokenizer\.json; pass tokenizer=False"):
        load_hf(folder)
    assert load_hf(folder, tokenizer=False)[2] is None
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors and no model\.safetensors\.index\.json"):
        load_hf(folder, tokenizer=False)


def test_unknown_tensors(tmp_path):
    ts = ref.random_tensors(ref.FAMILIES["llama3"])
    ts["model.layers.0.self_attn.o_proj.bias"] = np.zeros(32, np.float32)
    with pytest.raises(ValueError, match=r"o_proj\.bias.*refusing to drop them"):
        load_hf(ref.make_checkpoint(tmp_path / "a", "llama3", tensors=ts), tokenizer=False)
    ts = ref.random_tensors(ref.FAMILIES["llama3"])
    ts["score.weight"] = np.zeros((2, 32), np.float32)
    ts["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros(4, np.float32)  # a buffer: silent
    with pytest.warns(UserWarning, match=r"ignoring 1 tensors outside the decoder: \['score\.weight'\]"):
        load_hf(ref.make_checkpoint(tmp_path / "b", "llama3", tensors=ts), tokenizer=False)


def test_corrupt_and_non_float_tensors(tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = ref.make_checkpoint(tmp_path / "i", "llama3")
    ts = load_file(str(folder / "model.safetensors"))
    ts["model.norm.weight"] = np.ones(32, np.int32)
    save_file(ts, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"'model\.norm\.weight' has dtype I32; expected a float tensor"):
        load_hf(folder, tokenizer=False)
    folder = ref.make_checkpoint(tmp_path / "t", "llama3")
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"corrupt or truncated"):
        load_hf(folder, tokenizer=False)
    f.write_bytes(b"\xff" * 16)
    with pytest.raises(ValueError, match=r"not a safetensors file"):
        load_hf(folder, tokenizer=False)


@pytest.mark.parametrize("change,match", [
    ({"hidden_size": None}, r"config\.json: missing required key 'hidden_size' for model_type 'llama'"),
    ({"hidden_act": "gelu"}, r"hidden_act 'gelu' is not supported for llama"),
    ({"attention_bias": True}, r"attention_bias=true"),
    ({"model_type": "mistral", "sliding_window": 4096}, r"Mistral with sliding_window=4096 is not supported"),
    ({"model_type": "qwen2", "use_sliding_window": True}, r"use_sliding_window=true is not supported for qwen2"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, r"rope_scaling type 'yarn' is not supported"),
    ({"model_type": "gemma2", "hidden_activation": "gelu"}, r"hidden_activation 'gelu' is not supported"),
])
def test_bad_configs(change, match):
    hf = dict(ref._BASE, model_type="llama", num_hidden_layers=2)
    hf.update(change)
    hf = {k: v for k, v in hf.items() if v is not None}
    with pytest.raises(ValueError, match=match):
        config_from_hf(hf)
