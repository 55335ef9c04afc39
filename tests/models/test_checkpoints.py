"""Checkpoint formats in and out: sharded safetensors, HF round trip, GGUF layout, configs.

References: transformers' PyTorch models (logits after a round trip through save_hf), the
llama.cpp Q/K permutation written out independently here, and gguf's own quantiser.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors import safe_open

import iapo_jax
from iapo_jax import load_model, save_hf
from iapo_jax.models.checkpoints import default_model_path, load_config
from iapo_jax.models.config import ModelConfig
from iapo_jax.models.param_assembly import model_arrays


def _params(model):
    return model_arrays(model)


def _assert_same_params(a, b, atol=0.0):
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for key in pa:
        assert pa[key].shape == pb[key].shape, key
        np.testing.assert_allclose(np.asarray(pa[key], np.float32), np.asarray(pb[key], np.float32),
                                   atol=atol, rtol=0, err_msg=key)


def _torch(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_top_level_exports():
    assert iapo_jax.load_model is load_model and iapo_jax.save_hf is save_hf
    assert callable(iapo_jax.load_tokenizer)


def test_sharded_safetensors_equal_single_file(tiny_llama_dir, tmp_path):
    _torch(tiny_llama_dir).save_pretrained(tmp_path, max_shard_size="60KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    _assert_same_params(load_model(tmp_path), load_model(tiny_llama_dir))


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_gpt2_dir"])
def test_save_hf_round_trip_through_transformers(request, fixture, tmp_path):
    """load_model -> save_hf -> transformers loads it -> same logits as the original checkpoint."""
    src = request.getfixturevalue(fixture)
    model = load_model(src)
    save_hf(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    ids = torch.tensor(np.random.default_rng(0).integers(3, 256, size=(2, 11)))
    with torch.no_grad():
        original = _torch(src)(ids).logits.numpy()
        reloaded = _torch(tmp_path)(ids).logits.numpy()
    assert np.abs(reloaded - original).max() <= 1e-5
    _assert_same_params(load_model(tmp_path), model)


def test_bfloat16_params_save_and_load(tiny_llama_dir, tmp_path):
    model = load_model(tiny_llama_dir, dtype="bfloat16")
    save_hf(model, tmp_path)
    with safe_open(tmp_path / "model.safetensors", "numpy") as f:
        assert f.get_slice("model.layers.0.self_attn.q_proj.weight").get_dtype() == "BF16"
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    _assert_same_params(load_model(tmp_path, dtype="bfloat16"), model)
    # and the bf16 values are the float32 checkpoint rounded once
    _assert_same_params(model, load_model(tiny_llama_dir), atol=2e-3)


def test_config_round_trip_and_transformers_reads_it(tiny_llama_dir):
    from transformers import LlamaConfig

    hf = json.loads((tiny_llama_dir / "config.json").read_text())
    config = ModelConfig.from_hf(hf)
    assert (config.family, config.num_kv_heads, config.head_dim, config.rope_theta) == ("llama", 2, 16, 1e4)
    assert config.eos_token_ids == (2,) and not config.tie_word_embeddings
    assert ModelConfig.from_hf(config.to_hf()) == config
    assert hash(config) == hash(ModelConfig.from_hf(config.to_hf()))
    theirs = LlamaConfig.from_dict(config.to_hf())
    assert theirs.rope_parameters["rope_theta"] == 1e4 and theirs.num_key_value_heads == 2
    # transformers 4 style: rope_theta + rope_scaling at top level
    legacy = {k: v for k, v in hf.items() if k != "rope_parameters"}
    legacy |= {"rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}}
    old = ModelConfig.from_hf(legacy)
    assert old.rope_theta == 5e5 and old.rope_type == "linear" and old.rope_scaling["factor"] == 2.0
    assert load_config(tiny_llama_dir, dtype="bfloat16").param_dtype == "bfloat16"


def test_config_validation_names_the_fix():
    hf_like = dict(family="llama", vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1,
                   num_heads=3, num_kv_heads=2, head_dim=4, max_position_embeddings=8)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        ModelConfig(**hf_like)
    with pytest.raises(ValueError, match="dynamic"):
        ModelConfig(**(hf_like | {"num_heads": 4, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}))


def test_default_model_path_is_the_packaged_gguf():
    path = default_model_path()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000


# --- GGUF -------------------------------------------------------------------------------------


def _llama_cpp_permute(w, heads):
    """The permutation llama.cpp's converter applies to Llama Q/K rows (HF -> GGUF)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(hf_dir, path, quantise=()):
    """Write an HF Llama/Qwen2 checkpoint as llama.cpp does (F32, or the given names in Q8_0/F16).

    llama.cpp permutes Q/K rows for Llama only; Qwen2 uses the rotate-half ("NEOX") layout as is.
    """
    import gguf
    from safetensors.numpy import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    arch = cfg["model_type"]
    tensors = load_file(hf_dir / "model.safetensors")
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_rope_dimension_count(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    for key, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id)):
        if cfg.get(key) is not None:
            add(cfg[key])
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for name, array in tensors.items():
        if name in names:
            out = names[name]
        else:
            parts = name.split(".")
            out = f"blk.{parts[2]}.{layer['.'.join(parts[3:-1])]}.{parts[-1]}"
        if arch == "llama" and name.endswith("q_proj.weight"):
            array = _llama_cpp_permute(array, cfg["num_attention_heads"])
        elif arch == "llama" and name.endswith("k_proj.weight"):
            array = _llama_cpp_permute(array, cfg["num_key_value_heads"])
        kind = next((k for n, k in quantise if n in out), None)
        if kind == "Q8_0":
            q = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(out, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        elif kind == "F16":
            w.add_tensor(out, array.astype(np.float16))
        else:
            w.add_tensor(out, np.ascontiguousarray(array, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def tiny_qwen2_dir(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(2)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rope_theta=1e6, tie_word_embeddings=True))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.bias.normal_()
    model.eval().save_pretrained(tmp_path / "qwen2")
    return tmp_path / "qwen2"


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen2_dir"])
def test_gguf_layout_and_rotary_permutation_are_undone(request, fixture, tmp_path):
    """F32 GGUF (Q/K as llama.cpp writes them) loads to exactly the HF weights."""
    hf_dir = request.getfixturevalue(fixture)
    path = write_tiny_gguf(hf_dir, tmp_path / "tiny.gguf")
    from_gguf, from_hf = load_model(path), load_model(hf_dir)
    g = from_gguf.config
    assert g.norm_eps == pytest.approx(from_hf.config.norm_eps, rel=1e-6)  # GGUF stores float32
    assert g == from_hf.config.replace(max_position_embeddings=g.max_position_embeddings,
                                       pad_token_id=g.pad_token_id, norm_eps=g.norm_eps)
    _assert_same_params(from_gguf, from_hf)


def test_gguf_quantised_tensors_dequantise_within_their_precision(tiny_llama_dir, tmp_path):
    path = write_tiny_gguf(tiny_llama_dir, tmp_path / "q.gguf",
                                 quantise=[("attn_q", "Q8_0"), ("ffn_up", "F16")])
    got, ref = _params(load_model(path)), _params(load_model(tiny_llama_dir))
    # Q8_0: per 32-value block, error <= max|w| / 127 / 2 (+ fp16 scale rounding)
    q_err = np.abs(got["layers.q"] - ref["layers.q"]).max()
    assert 0 < q_err <= np.abs(ref["layers.q"]).max() / 127
    np.testing.assert_allclose(got["layers.up"], ref["layers.up"], rtol=1e-3, atol=1e-6)
    np.testing.assert_array_equal(got["layers.k"], ref["layers.k"])


def test_loaded_models_are_nnx_modules_that_split(tiny_gpt2_dir):
    model = load_model(tiny_gpt2_dir)
    graphdef, state = nnx.split(model)
    again = nnx.merge(graphdef, state)
    assert again.config == model.config
    assert jnp.array_equal(again.embed[...], model.embed[...])
