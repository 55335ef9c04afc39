"""Bad input is rejected before any compute, with a message naming the file and the problem."""

import json
import shutil

import numpy as np
import pytest

from iapo_jax import load_model, load_tokenizer
from iapo_jax.errors import CheckpointError, IapoError


@pytest.fixture
def llama_copy(tiny_llama_dir, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(tiny_llama_dir, target)
    return target


def _edit_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text()) | changes
    path.write_text(json.dumps(config))


def test_directory_without_config_json(llama_copy):
    (llama_copy / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json") as err:
        load_model(llama_copy)
    assert str(llama_copy) in str(err.value)
    assert isinstance(err.value, IapoError) and isinstance(err.value, ValueError)


def test_unsupported_architecture(llama_copy):
    _edit_config(llama_copy, model_type="bert", architectures=["BertForMaskedLM"])
    with pytest.raises(CheckpointError, match="unsupported architecture") as err:
        load_model(llama_copy)
    assert "config.json" in str(err.value) and "bert" in str(err.value)


def test_tokenizer_vocabulary_larger_than_model(llama_copy):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(300)}  # the model has vocab_size 256
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0").save_pretrained(llama_copy)
    with pytest.raises(CheckpointError, match="300 tokens") as err:
        load_tokenizer(llama_copy)
    assert str(llama_copy) in str(err.value) and "vocab_size 256" in str(err.value)


def test_tokenizer_that_fits_loads(llama_copy):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(200)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", eos_token="w2")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    tok.save_pretrained(llama_copy)
    loaded = load_tokenizer(llama_copy)
    assert loaded.pad_token == "w2"  # missing pad falls back to eos
    assert loaded.apply_chat_template([{"role": "user", "content": "w5 w7"}], tokenize=False) == "w5 w7 "


def test_truncated_safetensors(llama_copy):
    weights = llama_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated") as err:
        load_model(llama_copy)
    assert str(weights) in str(err.value)


def test_missing_shard_and_pickled_weights(llama_copy):
    (llama_copy / "model.safetensors").rename(llama_copy / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (llama_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        load_model(llama_copy)
    for p in llama_copy.glob("model*"):
        p.unlink()
    (llama_copy / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="pickled"):
        load_model(llama_copy)


def test_config_that_does_not_match_the_weights(llama_copy):
    _edit_config(llama_copy, intermediate_size=96)
    with pytest.raises(CheckpointError, match="shape") as err:
        load_model(llama_copy)
    assert "model.safetensors" in str(err.value) and "mlp" in str(err.value)


def test_bad_source_and_dtype(tmp_path, tiny_llama_dir):
    with pytest.raises(CheckpointError, match="no such file"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="directory"):
        load_model(tmp_path / "weights.bin")
    with pytest.raises(ValueError, match="float64"):
        load_model(tiny_llama_dir, dtype="float64")


def _gguf_with(path, arch="llama", tensor=None):
    import gguf

    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(8)
    writer.add_head_count(2)
    writer.add_tensor("token_embd.weight", np.zeros((16, 8), np.float32))
    if tensor is not None:
        writer.add_tensor(*tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unsupported_gguf_tensor_type(tmp_path):
    path = _gguf_with(tmp_path / "ints.gguf", tensor=("blk.0.attn_q.weight", np.zeros((8, 8), np.int32)))
    with pytest.raises(CheckpointError, match="I32") as err:
        load_model(path)
    assert str(path) in str(err.value) and "blk.0.attn_q.weight" in str(err.value)


def test_unsupported_gguf_architecture_and_garbage_file(tmp_path):
    path = _gguf_with(tmp_path / "mamba.gguf", arch="mamba")
    with pytest.raises(CheckpointError, match="unsupported architecture 'mamba'"):
        load_model(path)
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF but not really")
    with pytest.raises(CheckpointError, match="garbage.gguf"):
        load_model(garbage)
