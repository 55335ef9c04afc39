"""Best-of-N / worst-of-N: the exact N/(N+1) win rate, selection, scorers and bad input."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from iapo_jax.decoding.best_of_n import best_of_n
from iapo_jax.decoding.scorers import PrefixFn

N = 4
PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16, 17]]


def _reward_fn(ids, mask):
    # Continuous in the tokens (a sum of irrational-frequency sines), so ties have probability ~0.
    return jnp.sum(jnp.where(mask, jnp.sin(ids.astype(jnp.float32) * 1.618 + 0.3), 0.0), -1)


REWARD = PrefixFn(_reward_fn, "sines")


def _rescore(prompts, tokens, lengths):
    """The reward recomputed from returned tokens, outside every compiled path."""
    out = []
    for p, t, n in zip(prompts, np.asarray(tokens), np.asarray(lengths)):
        seq = np.asarray(list(p) + list(t[:n]))
        out.append(float(np.sum(np.sin(seq.astype(np.float32) * 1.618 + 0.3))))
    return np.asarray(out)


class CharTokenizer:
    """Just enough tokenizer for Python scorers: one letter per token id."""

    eos_token_id = 2
    chat_template = None

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(97 + int(i) % 26) for i in ids)


@pytest.mark.slow
def test_best_of_n_wins_n_over_n_plus_one(llama):
    """With a continuous reward, BoN_N beats an independent plain sample with probability exactly
    N/(N+1) = 0.8. 1200 trials: binomial sd 0.0115; we accept |rate - 0.8| < 0.04 (3.5 sd)."""
    prompts = [PROMPTS[i % 3] for i in range(1200)]
    best = best_of_n(llama, prompts, REWARD, n=N, max_new_tokens=8, key=1)
    other = best_of_n(llama, prompts, REWARD, n=N, max_new_tokens=8, key=2)
    chosen = np.take_along_axis(np.asarray(best.scores), np.asarray(best.chosen)[:, None], 1)[:, 0]
    plain = np.asarray(other.scores)[:, 0]  # branch 0 of an independent draw is a plain sample
    ties = np.mean(chosen == plain)
    rate = np.mean(chosen > plain) + 0.5 * ties
    assert ties < 0.01
    assert abs(rate - N / (N + 1)) < 0.04, rate
    # The chosen response really is the best of its N, and scores match the reward recomputed
    # from the returned tokens.
    scores = np.asarray(best.scores)
    assert np.all(chosen == scores.max(1))
    flat = [p for p in prompts[:30] for _ in range(N)]
    np.testing.assert_allclose(
        scores[:30].reshape(-1),
        _rescore(flat, np.asarray(best.tokens[:30]).reshape(30 * N, -1), np.asarray(best.lengths[:30]).reshape(-1)),
        atol=1e-4)


def test_worst_of_n_and_returned_fields(llama):
    out = best_of_n(llama, PROMPTS, REWARD, n=N, max_new_tokens=8, key=3, worst=True)
    assert out.tokens.shape == (3, N, 8) and out.scores.shape == (3, N) and out.chosen.shape == (3,)
    np.testing.assert_array_equal(out.chosen, np.argmin(np.asarray(out.scores), 1))
    np.testing.assert_array_equal(out.best_tokens, np.asarray(out.tokens)[np.arange(3), np.asarray(out.chosen)])
    assert out.kl_bound == pytest.approx(math.log(N) - (N - 1) / N)
    assert out.component_scores.shape == (1, 3, N)


def test_jax_reward_model_inside_compiled_path_and_weighted_combination(llama):
    from iapo_jax.models.heads import RewardModel

    rm = RewardModel.from_policy(llama, nnx.Rngs(0), head_init_std=1.0)
    out = best_of_n(llama, PROMPTS, [(rm, 0.5), (REWARD, 2.0)], n=N, max_new_tokens=8, key=4)
    ids = np.asarray(out.tokens).reshape(3 * N, -1)
    lengths = np.asarray(out.lengths).reshape(-1)
    flat = [p for p in PROMPTS for _ in range(N)]
    width = max(len(p) for p in flat) + ids.shape[1]
    seq = np.zeros((len(flat), width), np.int32)
    mask = np.zeros((len(flat), width), bool)
    for i, (p, t, n) in enumerate(zip(flat, ids, lengths)):
        row = list(p) + list(t[:n])
        seq[i, width - len(row):] = row  # left-padded, unlike the sampler's layout
        mask[i, width - len(row):] = True
    rm_scores = np.asarray(rm.score(jnp.asarray(seq), jnp.asarray(mask)))
    np.testing.assert_allclose(np.asarray(out.component_scores[0]).reshape(-1), rm_scores, atol=1e-3)
    combined = 0.5 * rm_scores + 2.0 * _rescore(flat, ids, lengths)
    np.testing.assert_allclose(np.asarray(out.scores).reshape(-1), combined, atol=2e-3)
    np.testing.assert_array_equal(out.chosen, combined.reshape(3, N).argmax(1))


def test_python_reward_on_strings(llama):
    tok = CharTokenizer()

    def count_a(prompts, responses):
        assert len(prompts) == len(responses) == 3 * N
        return [r.count("a") + 0.01 * len(r) for r in responses]

    out = best_of_n(llama, PROMPTS, count_a, n=N, max_new_tokens=8, key=5, tokenizer=tok)
    texts = out.texts
    expected = np.asarray([[t.count("a") + 0.01 * len(t) for t in row] for row in texts])
    np.testing.assert_allclose(out.scores, expected, atol=1e-6)
    np.testing.assert_array_equal(out.chosen, expected.argmax(1))
    assert out.best_texts == tuple(row[int(c)] for row, c in zip(texts, np.asarray(out.chosen)))


@pytest.mark.parametrize(
    "reward, message",
    [
        (lambda p, r: [0.0] * (len(r) - 1), "returned 11 scores"),
        (lambda p, r: [float("nan")] * len(r), "NaN"),
        (lambda p, r: ["high"] * len(r), "not numbers"),
    ],
)
def test_bad_python_reward_is_a_clear_error(llama, reward, message):
    with pytest.raises(ValueError, match=message):
        best_of_n(llama, PROMPTS, reward, n=N, max_new_tokens=8, key=5, tokenizer=CharTokenizer())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n=0), "N must be at least 1"),
        (dict(reward=lambda p, r: r), "pass tokenizer="),
        (dict(reward=[]), "no scorer given"),
        (dict(weights=[1.0, 2.0]), "2 weights for 1 scorers"),
        (dict(reward=object()), "cannot use"),
    ],
)
def test_bad_input_before_compute(llama, kwargs, message, monkeypatch):
    from iapo_jax.decoding import engine

    def no_compute(*a, **k):
        raise AssertionError("compute started before validation")

    monkeypatch.setattr(engine, "start_jit", no_compute)
    kw = dict(reward=REWARD, n=N, max_new_tokens=8)
    kw.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=message):
        best_of_n(llama, PROMPTS, kw.pop("reward"), **kw)
