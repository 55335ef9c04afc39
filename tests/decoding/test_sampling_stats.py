"""Statistical tests of the one-uniform inverse-CDF sampler.

Expected distributions come from transformers: the tiny model's PyTorch logits passed through
transformers' own Temperature / TopK / TopP logits warpers. Chi-square goodness of fit, with bins of
expected count < 5 pooled; seeds are fixed, and a setting fails when p < 1e-3 (a correct sampler
fails such a test once in a thousand seeds; a wrong filter or an off-by-one CDF fails at p ~ 0).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from scipy import stats
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from iapo_jax.decoding.engine import sample
from iapo_jax.decoding.filters import sample_next, sampling_params

P_MIN = 1e-3
PROMPT = [5, 6, 7, 8, 9]
DRAWS = 4000


def hf_probs(logits: np.ndarray, temperature=1.0, top_k=0, top_p=1.0) -> np.ndarray:
    x = torch.tensor(np.asarray(logits, np.float32))[None]
    x = TemperatureLogitsWarper(temperature)(None, x)
    if top_k:
        x = TopKLogitsWarper(top_k)(None, x)
    if top_p < 1:
        x = TopPLogitsWarper(top_p)(None, x)
    return torch.softmax(x, -1)[0].double().numpy()


def chi_square_p(tokens: np.ndarray, probs: np.ndarray) -> float:
    counts = np.bincount(tokens, minlength=probs.shape[0]).astype(float)
    expected = probs * len(tokens)
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    return stats.chisquare(obs[keep], exp[keep] * obs[keep].sum() / exp[keep].sum()).pvalue


@pytest.fixture(scope="module")
def llama_and_logits(tiny_llama_dir):
    from transformers import LlamaForCausalLM

    from iapo_jax import load_model

    hf = LlamaForCausalLM.from_pretrained(tiny_llama_dir).eval()
    with torch.no_grad():
        logits = hf(torch.tensor([PROMPT])).logits[0, -1].numpy()
    # Random tiny models are nearly uniform; sharpen nothing here, the temperatures below do.
    return load_model(tiny_llama_dir), logits


SETTINGS = [
    dict(temperature=1.0),
    dict(temperature=0.05),  # sharp: a handful of tokens carry the mass
    dict(temperature=0.1, top_k=5),
    dict(temperature=0.1, top_p=0.7),
    dict(temperature=0.2, top_k=30, top_p=0.9),
]


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_first_token_frequencies_match_transformers_warpers(llama_and_logits, setting):
    model, logits = llama_and_logits
    out = sample(model, [PROMPT], n=DRAWS, max_new_tokens=1, key=11, stop_tokens=[], **setting)
    tokens = np.asarray(out.tokens)[:, 0]
    probs = hf_probs(logits, **setting)
    # Exact parts: nothing outside the filtered support, and each reported log-prob is the
    # log of transformers' filtered probability of that token.
    assert np.all(probs[tokens] > 0)
    np.testing.assert_allclose(np.asarray(out.logprobs)[:, 0], np.log(probs[tokens]), atol=2e-4)
    raw = torch.log_softmax(torch.tensor(logits), -1).numpy()
    np.testing.assert_allclose(np.asarray(out.raw_logprobs)[:, 0], raw[tokens], atol=1e-4)
    assert chi_square_p(tokens, probs) > P_MIN


def test_greedy_rows_take_the_argmax(llama_and_logits):
    model, logits = llama_and_logits
    out = sample(model, [PROMPT], n=DRAWS, max_new_tokens=1, key=11, stop_tokens=[], greedy=True)
    assert np.all(np.asarray(out.tokens)[:, 0] == np.argmax(logits))


_sample_next = jax.jit(sample_next, static_argnames="cap")


@pytest.mark.parametrize(
    "setting, cap",
    [(dict(), 256), (dict(top_k=40), 256), (dict(top_p=0.8), 256), (dict(top_p=0.8), 8),
     (dict(temperature=1.5, top_k=300, top_p=0.95), 8)],
    ids=lambda x: (",".join(f"{k}={v}" for k, v in x.items()) or "plain") if isinstance(x, dict) else f"cap{x}",
)
def test_large_vocabulary_two_level_cdf_and_exact_fallback(setting, cap):
    """V = 2000 exercises the two-level CDF (blocks of 256); cap = 8 forces the exact threshold
    search (the kept set is larger than the candidate cap)."""
    vocab, draws = 2000, 8000
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal(vocab) * 2.5).astype(np.float32)
    params = sampling_params(draws, **setting)
    u = jax.random.uniform(jax.random.key(3), (draws,))
    tok, lp, _ = _sample_next(jnp.broadcast_to(jnp.asarray(logits), (draws, vocab)), params, u, cap=cap)
    tok = np.asarray(tok)
    probs = hf_probs(logits, **setting)
    assert np.all(probs[tok] > 0)
    np.testing.assert_allclose(np.asarray(lp), np.log(probs[tok]), atol=2e-4)
    assert chi_square_p(tok, probs) > P_MIN
