"""The compiled sampler against transformers (PyTorch) and its own contracts.

References nobody here wrote: transformers' greedy `generate` and its PyTorch logits.
"""

import jax
import numpy as np
import pytest
import torch

from iapo_jax.decoding.engine import sample, split_model, start_jit
from iapo_jax.decoding.inputs import prepare
from iapo_jax.decoding.sampler import Sampler

# Mixed lengths: the batch is left-padded, so every row must behave as if it were alone.
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30]]


@pytest.fixture(scope="module")
def hf_llama(tiny_llama_dir):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(tiny_llama_dir).eval()


def _hf_greedy(hf, prompt, new_tokens, eos, pad):
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    return out[0, len(prompt):].tolist()


def _ours(tokens, lengths, b):
    return np.asarray(tokens)[b, : int(lengths[b])].tolist()


def test_greedy_matches_transformers_llama(llama, hf_llama):
    out = sample(llama, PROMPTS, max_new_tokens=20, greedy=True)
    for b, p in enumerate(PROMPTS):
        # A single-row generate stops at EOS, so the whole continuation must match.
        assert _ours(out.tokens, out.lengths, b) == _hf_greedy(hf_llama, p, 20, eos=2, pad=0)


def test_greedy_matches_transformers_gpt2(tiny_gpt2_dir):
    from transformers import GPT2LMHeadModel

    from iapo_jax import load_model

    model = load_model(tiny_gpt2_dir)
    hf = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).eval()
    out = sample(model, PROMPTS, max_new_tokens=20, temperature=0.0)  # temperature 0 == greedy
    for b, p in enumerate(PROMPTS):
        assert _ours(out.tokens, out.lengths, b) == _hf_greedy(hf, p, 20, eos=2, pad=2)


def test_same_key_same_output_and_logprobs_vs_transformers(llama, hf_llama):
    # max_new_tokens=20 everywhere in this file: one response bucket, so programs are reused.
    a = sample(llama, PROMPTS, max_new_tokens=20, key=7, ref_model=llama)
    b = sample(llama, PROMPTS, max_new_tokens=20, key=jax.random.key(7))
    c = sample(llama, PROMPTS, max_new_tokens=20, key=8)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
    assert not np.array_equal(a.tokens, c.tokens)
    # Temperature 1, no filter: sampling-policy, raw and (teacher-forced) reference log-probs agree,
    # and all equal log_softmax of transformers' logits on the same sequence.
    np.testing.assert_allclose(a.logprobs, a.raw_logprobs, atol=1e-5)
    np.testing.assert_allclose(a.ref_logprobs, a.raw_logprobs, atol=1e-4)
    for row, p in enumerate(PROMPTS):
        n = int(a.lengths[row])
        seq = p + np.asarray(a.tokens)[row, :n].tolist()
        with torch.no_grad():
            logits = hf_llama(torch.tensor([seq])).logits[0].log_softmax(-1).numpy()
        ref = logits[np.arange(len(p) - 1, len(seq) - 1), seq[len(p):]]
        np.testing.assert_allclose(np.asarray(a.raw_logprobs)[row, :n], ref, atol=1e-4)
        assert np.all(np.asarray(a.raw_logprobs)[row, n:] == 0)


def test_per_row_stop_tokens_and_lengths(llama, hf_llama):
    greedy = sample(llama, PROMPTS, max_new_tokens=20, greedy=True)
    toks = np.asarray(greedy.tokens)
    # Row 0 stops at the token it greedily emits at step 3; row 1 at its step-5 token; row 2 runs to 6.
    stops = [[int(toks[0, 3])], [int(toks[1, 5])], [2]]
    out = sample(llama, PROMPTS, max_new_tokens=[20, 20, 6], greedy=True, stop_tokens=stops)
    first0 = list(toks[0]).index(toks[0, 3]) + 1
    first1 = list(toks[1]).index(toks[1, 5]) + 1
    assert list(np.asarray(out.lengths)) == [first0, first1, min(6, int(greedy.lengths[2]))]
    for b in range(3):
        n = int(out.lengths[b])
        np.testing.assert_array_equal(np.asarray(out.tokens)[b, :n], toks[b, :n])
        assert np.all(np.asarray(out.tokens)[b, n:] == 0)  # pad id of the tiny Llama
    assert out.tokens.shape == (3, 20)


def test_n_samples_share_a_prefill_and_match_repeated_prompts(llama):
    shared = sample(llama, PROMPTS, max_new_tokens=20, n=3, key=1)
    repeated = sample(llama, [p for p in PROMPTS for _ in range(3)], max_new_tokens=20, key=1)
    np.testing.assert_array_equal(shared.tokens, repeated.tokens)
    np.testing.assert_allclose(shared.logprobs, repeated.logprobs, atol=1e-5)


@pytest.mark.slow
def test_sharded_batch_equals_unsharded(llama):
    from jax.sharding import Mesh

    mesh = Mesh(np.array(jax.devices()), ("data",))
    assert mesh.shape["data"] == 8
    plain = sample(llama, PROMPTS, max_new_tokens=20, n=3, key=4)
    sharded = sample(llama, PROMPTS, max_new_tokens=20, n=3, key=4, mesh=mesh)
    np.testing.assert_array_equal(plain.tokens, sharded.tokens)
    np.testing.assert_allclose(plain.logprobs, sharded.logprobs, atol=1e-5)
    # The decode state really is split by rows over the 8 devices (3 prompts padded to 8).
    batch = prepare(llama, PROMPTS, max_new_tokens=20, mesh=mesh)
    graphdef, state = split_model(llama, mesh)
    ds, _ = start_jit(graphdef, state, batch.ids, batch.mask, batch.rules, response_len=batch.response_len,
                      n=3, mesh=mesh, data_axis="data")
    assert ds.cache.k.sharding.spec[1] == "data" and ds.tokens.sharding.spec[0] == "data"
    assert ds.tokens.shape[0] == 24 and len(ds.tokens.sharding.device_set) == 8


@pytest.mark.slow
def test_tensor_parallel_decoding_shards_weights_and_cache(llama):
    """data=4 x tensor=2: the same samples as one device, with the KV cache split by heads over
    'tensor' (2 KV heads) and the MLP weights split too, so no device holds a full copy."""
    from jax.sharding import Mesh

    mesh = Mesh(np.array(jax.devices()).reshape(4, 1, 2), ("data", "fsdp", "tensor"))
    plain = sample(llama, PROMPTS, max_new_tokens=12, n=2, key=7, temperature=0.9)
    sharded = sample(llama, PROMPTS, max_new_tokens=12, n=2, key=7, temperature=0.9, mesh=mesh)
    np.testing.assert_array_equal(plain.tokens, sharded.tokens)
    np.testing.assert_allclose(plain.logprobs, sharded.logprobs, atol=1e-5)
    batch = prepare(llama, PROMPTS, max_new_tokens=12, mesh=mesh)
    graphdef, state = split_model(llama, mesh)
    assert "tensor" in tuple(state["layers"]["up"][...].sharding.spec)
    ds, _ = start_jit(graphdef, state, batch.ids, batch.mask, batch.rules, response_len=batch.response_len,
                      n=2, mesh=mesh, data_axis="data")
    spec = tuple(ds.cache.k.sharding.spec) + (None,) * 5
    assert spec[1] == "data" and spec[3] == "tensor", spec
    k_shard = ds.cache.k.addressable_shards[0].data.shape
    assert k_shard[1] * 4 == ds.cache.k.shape[1] and k_shard[3] * 2 == ds.cache.k.shape[3]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompts=[[5, 6], []]), "prompt 1 is empty"),
        (dict(prompts=[list(range(3, 40))], prompt_buckets=(16, 32)), "longer than the largest prompt bucket"),
        (dict(stop_tokens=[300]), "unknown stop token id 300"),
        (dict(max_new_tokens=0), "max_new_tokens must be at least 1"),
        (dict(n=0), "at least 1"),
        (dict(temperature=-1.0), "temperature must be"),
        (dict(top_p=1.5), "top_p must be"),
        (dict(top_k=[1, 2]), "one value per row"),
        (dict(prompts=[[5, 999]]), "outside the model's vocabulary"),
        (dict(prompts="hello"), "single string"),
    ],
)
def test_bad_input_is_rejected_before_compute(llama, kwargs, message, monkeypatch):
    from iapo_jax.decoding import engine

    def no_compute(*a, **k):
        raise AssertionError("compute started before validation")

    monkeypatch.setattr(engine, "start_jit", no_compute)
    kw = dict(prompts=[[5, 6, 7]], max_new_tokens=4)
    kw.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=message):
        sample(llama, kw.pop("prompts"), **kw)


@pytest.mark.slow
def test_smollm2_chat_generate_answers_paris(smollm2_gguf):
    from iapo_jax import load_model, load_tokenizer

    model = load_model(smollm2_gguf)
    tok = load_tokenizer(smollm2_gguf)
    sampler = Sampler(model, tok)
    out = sampler.sample(["What is the capital of France?", "Say hi."], max_new_tokens=16, greedy=True)
    assert "Paris" in out.texts[0]
    assert out.tokens.shape == (2, 16)
    with pytest.raises(ValueError, match="unknown stop token"):
        sampler.sample(["Hi"], max_new_tokens=4, stop_tokens=["<|not-a-token|>"])


def test_reference_logprobs_of_n_samples_share_the_prompt_and_match_transformers(llama, hf_llama):
    """n = 3 responses per prompt scored against one prompt pass: each equals transformers' log-softmax
    on the full [prompt, response] sequence."""
    out = sample(llama, PROMPTS, max_new_tokens=20, n=3, key=11, temperature=0.7, ref_model=llama)
    for row in range(3 * len(PROMPTS)):
        p, n = PROMPTS[row // 3], int(out.lengths[row])
        seq = p + np.asarray(out.tokens)[row, :n].tolist()
        with torch.no_grad():
            logits = hf_llama(torch.tensor([seq])).logits[0].log_softmax(-1).numpy()
        want = logits[np.arange(len(p) - 1, len(seq) - 1), seq[len(p):]]
        np.testing.assert_allclose(np.asarray(out.ref_logprobs)[row, :n], want, atol=1e-4)
        assert not np.asarray(out.ref_logprobs)[row, n:].any()
