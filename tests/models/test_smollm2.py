"""SmolLM2-135M-Instruct from the packaged GGUF against transformers loading the same file.

Reference nobody here wrote: transformers' own GGUF loader and PyTorch model (float32).
Tolerances: mean per-token KL(transformers || ours) <= 1e-3 (observed about 4e-11); greedy answer
to the capital question contains "Paris"; bfloat16 weights and compute: mean per-token KL against
our float32 <= 5e-3 (observed 8e-4) and the greedy next token agrees on >= 90% of positions.
All tests share one loaded model of each kind (loading dominates: about 10 s ours, 15-50 s theirs).
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from iapo_jax import load_model, load_tokenizer
from iapo_jax.models.checkpoints import cast_model

pytestmark = pytest.mark.slow

CHAT = [
    {"role": "system", "content": "You are a concise assistant who answers in one sentence."},
    {"role": "user", "content": "Which planet is known as the red planet, and why?"},
    {"role": "assistant", "content": "Mars, because iron oxide on its surface makes it look red."},
    {"role": "user", "content": "How long does light from the Sun take to reach it?"},
]


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    start = time.perf_counter()
    model = load_model(smollm2_gguf)
    jax.block_until_ready(model.embed[...])
    print(f"\nSmolLM2 load_model: {time.perf_counter() - start:.1f} s")
    return model


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf, smollm2):
    return load_tokenizer(smollm2_gguf, model=smollm2)


@pytest.fixture(scope="session")
def transformers_smollm2(smollm2_gguf):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32).eval()


def _chat_ids(tokenizer, messages, generation_prompt=True):
    return tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt,
                                         return_dict=True)["input_ids"]


def _log_softmax(x):
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _jitted_logits(model):
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids))
    return lambda ids: np.asarray(fn(state, jnp.asarray(ids, jnp.int32)))


@pytest.fixture(scope="session")
def chat_logits(smollm2, smollm2_tokenizer):
    ids = np.asarray([_chat_ids(smollm2_tokenizer, CHAT)])
    return ids, _jitted_logits(smollm2)(ids)


def test_config_and_tokenizer(smollm2, smollm2_tokenizer):
    c = smollm2.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (30, 576, 9, 3, 64)
    assert c.rope_theta == 100000.0 and c.tie_word_embeddings and c.vocab_size == 49152
    assert "<|im_start|>" in smollm2_tokenizer.chat_template
    assert len(smollm2_tokenizer) <= c.vocab_size


def test_logits_match_transformers_gguf(chat_logits, transformers_smollm2):
    import torch

    ids, ours = chat_logits
    with torch.no_grad():
        theirs = transformers_smollm2(torch.tensor(ids)).logits.numpy()
    p_theirs, p_ours = _log_softmax(theirs[0]), _log_softmax(ours[0])
    kl = (np.exp(p_theirs) * (p_theirs - p_ours)).sum(-1)
    print(f"\nSmolLM2 vs transformers GGUF over {ids.shape[1]} tokens: mean KL {kl.mean():.2e}, "
          f"max KL {kl.max():.2e}, max |logit diff| {np.abs(theirs - ours).max():.2e}")
    assert kl.mean() <= 1e-3
    assert (theirs[0].argmax(-1) == ours[0].argmax(-1)).mean() >= 0.99


def greedy(model, prompt_ids, max_new_tokens, eos_ids):
    """A tiny greedy loop on forward_cached: one prefill, then one token per step."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, ids, positions, cache):
        m = nnx.merge(graphdef, state)
        hidden, cache = m.forward_cached(ids, positions, jnp.ones(ids.shape, bool), cache)
        return jnp.argmax(m.logits_from_hidden(hidden[:, -1]), axis=-1), cache

    length = len(prompt_ids)
    cache = model.init_cache(1, length + max_new_tokens)
    token, cache = step(state, jnp.asarray([prompt_ids], jnp.int32), jnp.arange(length)[None], cache)
    out = []
    for t in range(max_new_tokens):
        out.append(int(token[0]))
        if out[-1] in eos_ids:
            break
        token, cache = step(state, token[:, None].astype(jnp.int32), jnp.asarray([[length + t]]), cache)
    return out


def test_greedy_answer_names_paris(smollm2, smollm2_tokenizer):
    prompt = _chat_ids(smollm2_tokenizer, [{"role": "user", "content": "What is the capital of France?"}])
    answer = smollm2_tokenizer.decode(greedy(smollm2, prompt, 16, smollm2.config.eos_token_ids),
                                      skip_special_tokens=True)
    print(f"\nSmolLM2 greedy answer: {answer!r}")
    assert "Paris" in answer


def test_bfloat16_close_to_float32(smollm2, chat_logits):
    ids, f32 = chat_logits
    bf16 = _jitted_logits(cast_model(smollm2, "bfloat16"))(ids)
    p32, p16 = _log_softmax(f32[0]), _log_softmax(bf16[0])
    kl = (np.exp(p32) * (p32 - p16)).sum(-1)
    agree = (f32[0].argmax(-1) == bf16[0].argmax(-1)).mean()
    print(f"\nSmolLM2 bfloat16 vs float32: mean KL {kl.mean():.2e}, max KL {kl.max():.2e}, "
          f"argmax agreement {agree:.3f}")
    assert kl.mean() <= 5e-3 and agree >= 0.9
