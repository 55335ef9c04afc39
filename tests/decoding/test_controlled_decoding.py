"""Blockwise and token-level controlled decoding: exact reductions, the tilted distribution, scorers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from scipy import stats

from iapo_jax.decoding.best_of_n import best_of_n
from iapo_jax.decoding.blockwise import blockwise_cd
from iapo_jax.decoding.engine import sample
from iapo_jax.decoding.scorers import PrefixFn
from iapo_jax.decoding.token_cd import token_cd

PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16, 17]]
R = 16  # response length (one bucket)
WEIGHTS = np.random.default_rng(1).standard_normal(256).astype(np.float32)


def _token_weights(ids, mask):
    return jnp.sum(jnp.where(mask, jnp.asarray(WEIGHTS)[ids], 0.0), -1)


def _sines(ids, mask):
    return jnp.sum(jnp.where(mask, jnp.sin(ids.astype(jnp.float32) * 0.7), 0.0), -1)


SCORE = PrefixFn(_token_weights, "token_weights")
SINES = PrefixFn(_sines, "sines")


@pytest.fixture(scope="module")
def value_model(llama):
    from iapo_jax.models.heads import ValueModel

    return ValueModel.from_policy(llama, nnx.Rngs(0), head_init_std=1.0)


class CharTokenizer:
    eos_token_id = 2
    chat_template = None

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(0x100 + int(i)) for i in ids)  # one distinct character per token id


def test_blockwise_with_k1_is_plain_sampling(llama, value_model):
    plain = sample(llama, PROMPTS, max_new_tokens=R, key=3)
    cd = blockwise_cd(llama, PROMPTS, value_model, k=1, block_size=4, max_new_tokens=R, key=3)
    np.testing.assert_array_equal(plain.tokens, cd.tokens)
    np.testing.assert_array_equal(plain.lengths, cd.lengths)
    np.testing.assert_array_equal(plain.logprobs, cd.logprobs)
    np.testing.assert_array_equal(cd.kl_bound, 0.0)  # log 1 - 0


def test_blockwise_with_one_block_is_best_of_k(llama, value_model):
    cd = blockwise_cd(llama, PROMPTS, value_model, k=4, block_size=R, max_new_tokens=R, key=5)
    bon = best_of_n(llama, PROMPTS, value_model, n=4, max_new_tokens=R, key=5)
    np.testing.assert_array_equal(cd.tokens, bon.best_tokens)
    # The cached block scores equal the value model run without cache on the whole sequence.
    np.testing.assert_allclose(cd.scores, np.asarray(bon.scores).max(1), atol=1e-3)
    assert cd.blocks == 1


def test_blockwise_kl_bound_and_improvement_over_plain(llama):
    prompts = [PROMPTS[i % 3] for i in range(48)]
    k, m = 4, 4
    cd = blockwise_cd(llama, prompts, SCORE, k=k, block_size=m, max_new_tokens=R, key=7)
    plain = sample(llama, prompts, max_new_tokens=R, key=8)
    lengths = np.asarray(cd.lengths)
    np.testing.assert_allclose(cd.kl_bound, (math.log(k) - (k - 1) / k) * np.ceil(lengths / m))  # selections made
    # Scores reported by the decoder are the scorer on the kept sequences...
    seqs = [np.asarray(p + list(np.asarray(cd.tokens)[i, : lengths[i]])) for i, p in enumerate(prompts)]
    np.testing.assert_allclose(cd.scores, [WEIGHTS[s].sum() for s in seqs], atol=1e-4)
    # ...and guided decoding raises them well above plain samples (each block adds about the
    # expected max of 4 draws; measured gap > 5 sd of the plain mean).
    plain_scores = [WEIGHTS[np.asarray(p + list(np.asarray(plain.tokens)[i, : int(plain.lengths[i])]))].sum()
                    for i, p in enumerate(prompts)]
    assert np.mean(cd.scores) > np.mean(plain_scores) + 5 * np.std(plain_scores) / np.sqrt(len(prompts))


def test_token_cd_with_lambda_zero_is_top_k_sampling(llama, value_model):
    plain = sample(llama, PROMPTS, max_new_tokens=R, key=9, top_k=6, temperature=0.8)
    cd = token_cd(llama, PROMPTS, value_model, lam=0.0, k=6, max_new_tokens=R, key=9, temperature=0.8)
    np.testing.assert_array_equal(plain.tokens, cd.tokens)
    np.testing.assert_allclose(plain.logprobs, cd.logprobs, atol=1e-5)
    np.testing.assert_allclose(plain.raw_logprobs, cd.raw_logprobs, atol=1e-5)


def test_token_cd_samples_the_tilted_distribution(llama, tiny_llama_dir):
    """First token ~ pi_ref(z) exp(lam * V(z)) over the top-k of pi_ref, V = 0.5 * SCORE + 1.0 * SINES
    (weights given at call time): the closed form from transformers' logits; chi-square over 6000
    draws, fail at p < 1e-3."""
    from transformers import LlamaForCausalLM

    prompt, k, lam, temp, w = [5, 6, 7, 8], 12, 1.5, 0.05, (0.5, 1.0)
    hf = LlamaForCausalLM.from_pretrained(tiny_llama_dir).eval()
    with torch.no_grad():
        logits = hf(torch.tensor([prompt])).logits[0, -1].double().numpy() / temp
    top = np.argsort(-logits)[:k]
    value = w[0] * WEIGHTS[top] + w[1] * np.sin(top.astype(np.float32) * 0.7)  # + a prompt constant
    tilted = logits[top] + lam * value
    probs = np.exp(tilted - tilted.max())
    probs /= probs.sum()
    out = token_cd(llama, [prompt] * 6000, [SCORE, SINES], weights=w, lam=lam, k=k, max_new_tokens=1,
                   key=13, temperature=temp, stop_tokens=[])
    first = np.asarray(out.tokens)[:, 0]
    assert set(first.tolist()) <= set(top.tolist())
    where = {int(t): i for i, t in enumerate(top)}
    np.testing.assert_allclose(np.asarray(out.logprobs)[:, 0], np.log([probs[where[int(t)]] for t in first]),
                               atol=1e-3)
    counts = np.asarray([np.sum(first == t) for t in top])
    assert stats.chisquare(counts, probs * len(first)).pvalue > 1e-3


def test_blockwise_scores_combine_weighted_scorers(llama):
    out = blockwise_cd(llama, PROMPTS, [SCORE, SINES], weights=[0.3, 0.7], k=3, block_size=4,
                       max_new_tokens=R, key=2)
    for i, p in enumerate(PROMPTS):
        seq = np.asarray(p + list(np.asarray(out.tokens)[i, : int(out.lengths[i])]))
        expected = 0.3 * WEIGHTS[seq].sum() + 0.7 * np.sin(seq.astype(np.float32) * 0.7).sum()
        assert float(out.scores[i]) == pytest.approx(expected, abs=1e-4)


def test_python_scorer_path_equals_jax_path(llama):
    """A host scorer summing the token weights of the decoded response text keeps the same blocks
    as the JAX scorer of prompt + response (the prompt adds a constant per prompt)."""
    tok = CharTokenizer()

    def weights_of_text(prompts, responses):
        return [float(sum(WEIGHTS[ord(c) - 0x100] for c in r)) for r in responses]

    host = blockwise_cd(llama, PROMPTS, weights_of_text, k=4, block_size=4, max_new_tokens=R, key=6,
                        tokenizer=tok)
    dev = blockwise_cd(llama, PROMPTS, SCORE, k=4, block_size=4, max_new_tokens=R, key=6)
    np.testing.assert_array_equal(host.tokens, dev.tokens)
    assert host.texts == tuple(tok.decode(t[:n]) for t, n in zip(np.asarray(dev.tokens), np.asarray(dev.lengths)))


@pytest.mark.slow
def test_sharded_blockwise_and_token_cd_equal_unsharded(llama, value_model):
    from jax.sharding import Mesh

    mesh = Mesh(np.array(jax.devices()), ("data",))
    # Same settings as tests above, so only the sharded programs compile here.
    a = blockwise_cd(llama, PROMPTS, SCORE, k=4, block_size=4, max_new_tokens=R, key=6)
    b = blockwise_cd(llama, PROMPTS, SCORE, k=4, block_size=4, max_new_tokens=R, key=6, mesh=mesh)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)
    c = token_cd(llama, PROMPTS, value_model, lam=1.0, k=6, max_new_tokens=R, key=1, temperature=0.8)
    d = token_cd(llama, PROMPTS, value_model, lam=1.0, k=6, max_new_tokens=R, key=1, temperature=0.8, mesh=mesh)
    np.testing.assert_array_equal(c.tokens, d.tokens)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m, v: blockwise_cd(m, PROMPTS, v, k=0, block_size=4, max_new_tokens=8), "K .* at least 1"),
        (lambda m, v: blockwise_cd(m, PROMPTS, v, k=2, block_size=0, max_new_tokens=8), "M .* at least 1"),
        (lambda m, v: token_cd(m, PROMPTS, v, k=0, max_new_tokens=8), "at least 1"),
        (lambda m, v: token_cd(m, PROMPTS, lambda p, r: r, k=2, max_new_tokens=8), "Python scorers"),
        (lambda m, v: token_cd(m, PROMPTS, v, lam=float("nan"), max_new_tokens=8), "lam must be"),
        (lambda m, v: blockwise_cd(m, PROMPTS, lambda p, r: r, k=2, block_size=4, max_new_tokens=8),
         "pass tokenizer="),
        (lambda m, v: blockwise_cd(m, [[]], v, k=2, block_size=4, max_new_tokens=8), "empty"),
    ],
)
def test_bad_input_before_compute(llama, value_model, call, message, monkeypatch):
    from iapo_jax.decoding import engine

    def no_compute(*a, **k):
        raise AssertionError("compute started before validation")

    monkeypatch.setattr(engine, "start_jit", no_compute)
    with pytest.raises((ValueError, TypeError), match=message):
        call(llama, value_model)


def test_reward_model_is_rejected_as_prefix_scorer(llama):
    from iapo_jax.models.heads import RewardModel

    rm = RewardModel.from_policy(llama, nnx.Rngs(0))
    with pytest.raises(TypeError, match="prefix scorer"):
        blockwise_cd(llama, PROMPTS, rm, k=2, block_size=4, max_new_tokens=8)
