"""The sample KL (k1) and its standard errors, and the KL bounds of best-of-K / blockwise CD,
against exact values of known distributions and seeded simulations."""

import math

import numpy as np
import pytest

from iapo_jax.decoding.kl_bounds import best_of_k_kl_bound, blockwise_kl_bound
from iapo_jax.evaluation.kl import per_prompt_kl, sample_kl

P = np.array([0.5, 0.25, 0.125, 0.125])
Q = np.array([0.25, 0.25, 0.25, 0.25])
EXACT_KL = 0.25 * math.log(2)  # sum p log(p/q) = 0.5 log 2 + 0.25 * 0 + 2 * 0.125 * log(0.5)


def test_exact_kl_by_hand():
    assert float(np.sum(P * np.log(P / Q))) == pytest.approx(EXACT_KL, abs=1e-15)


def test_sample_kl_of_categorical_sequences_matches_the_exact_kl():
    """Sequences of 3 independent tokens from p scored under p and q: KL = 3 * KL(p || q). The
    estimate lies within 4 of its standard errors, and the SE matches the closed-form sd of
    sum_t log p/q over sequences (within 5%)."""
    rng = np.random.default_rng(0)
    rows, steps = 20_000, 3
    y = rng.choice(4, size=(rows, steps), p=P)
    kl, se = sample_kl(np.log(P)[y], np.log(Q)[y], np.ones((rows, steps)))
    assert abs(kl - steps * EXACT_KL) < 4 * se
    token_var = float(np.sum(P * np.log(P / Q) ** 2)) - EXACT_KL**2
    assert se == pytest.approx(math.sqrt(steps * token_var / rows), rel=0.05)


def test_sample_kl_masks_padding():
    """Padding positions (mask 0) carry garbage log-probs and must not count."""
    logp = np.array([[-1.0, -2.0, 99.0], [-0.5, 99.0, 99.0]])
    ref = np.array([[-1.5, -1.0, 0.0], [-1.0, 0.0, 0.0]])
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    kl, se = sample_kl(logp, ref, mask)
    per_seq = np.array([0.5 - 1.0, 0.5])  # by hand
    assert kl == pytest.approx(per_seq.mean(), abs=1e-12)
    assert se == pytest.approx(per_seq.std(ddof=1) / math.sqrt(2), abs=1e-12)


def _clustered(rng, prompts, k, prompt_sd=0.5, within_sd=0.3):
    """Per-sequence KL values with a shared level per prompt: mu_x ~ N(1, prompt_sd^2), then
    N(mu_x, within_sd^2) per sample, rows ordered prompt by prompt, as one-token 'sequences'."""
    mu = rng.normal(1.0, prompt_sd, size=(prompts, 1))
    return (mu + rng.normal(0.0, within_sd, size=(prompts, k))).reshape(-1, 1)


def test_cluster_standard_error_matches_the_spread_over_simulated_experiments():
    """1000 seeded experiments of 20 prompts x 8 samples. The true sd of the mean is
    sqrt(0.5^2 / 20 + 0.3^2 / 160) = 0.115; the cluster SE averages to it (within 10%), while the
    i.i.d. SE, which ignores that samples of a prompt share its level, is about 2.5x too small."""
    rng = np.random.default_rng(1)
    prompts, k = 20, 8
    truth_sd = math.sqrt(0.25 / prompts + 0.09 / (prompts * k))
    means, cluster_se, iid_se = [], [], []
    for _ in range(1000):
        x = _clustered(rng, prompts, k)
        zeros, ones = np.zeros_like(x), np.ones_like(x)
        m, s = sample_kl(x, zeros, ones, samples_per_prompt=k)
        means.append(m)
        cluster_se.append(s)
        iid_se.append(sample_kl(x, zeros, ones)[1])
    assert np.std(means) == pytest.approx(truth_sd, rel=0.1)  # the simulation itself
    assert np.sqrt(np.mean(np.square(cluster_se))) == pytest.approx(truth_sd, rel=0.1)
    assert np.mean(iid_se) < 0.5 * truth_sd


def test_prompt_ids_in_any_order_give_the_same_cluster_se():
    rng = np.random.default_rng(2)
    x = _clustered(rng, 6, 4)
    z, o = np.zeros_like(x), np.ones_like(x)
    want = sample_kl(x, z, o, samples_per_prompt=4)
    perm = rng.permutation(len(x))
    ids = (np.arange(len(x)) // 4)[perm]
    got = sample_kl(x[perm], z, o, prompt_ids=[f"prompt {i}" for i in ids])
    assert got == pytest.approx(want, abs=1e-12)
    # equal cluster sizes: the SE of the per-prompt means, computed by hand
    per_prompt = x.reshape(6, 4).mean(1)
    assert want[1] == pytest.approx(per_prompt.std(ddof=1) / math.sqrt(6), abs=1e-12)
    # unequal sizes: the cluster-robust ratio formula, by hand for two prompts
    v = np.array([1.0, 2.0, 3.0, 7.0])  # prompt a: 1, 2, 3; prompt b: 7
    m, s = sample_kl(v[:, None], np.zeros((4, 1)), np.ones((4, 1)), prompt_ids=["a", "a", "a", "b"])
    assert m == pytest.approx(3.25, abs=1e-12)
    assert s == pytest.approx(math.sqrt(2 * ((6 - 3 * 3.25) ** 2 + (7 - 3.25) ** 2)) / 4, abs=1e-12)


def test_sample_kl_cluster_arguments_are_checked():
    x = np.zeros((6, 2))
    with pytest.raises(ValueError, match="positive divisor of the 6 sequences"):
        sample_kl(x, x, x, samples_per_prompt=4)
    with pytest.raises(ValueError, match="not both"):
        sample_kl(x, x, x, samples_per_prompt=2, prompt_ids=range(6))
    with pytest.raises(ValueError, match="one prompt id per sequence"):
        sample_kl(x, x, x, prompt_ids=range(5))
    assert math.isnan(sample_kl(x, x, x, samples_per_prompt=6)[1])  # one prompt: no SE


def test_best_of_k_kl_bound_values():
    assert best_of_k_kl_bound(1) == 0.0
    assert best_of_k_kl_bound(2) == pytest.approx(math.log(2) - 0.5, abs=1e-15)
    assert best_of_k_kl_bound(4) == pytest.approx(1.3862943611198906 - 0.75, abs=1e-15)
    with pytest.raises(ValueError, match="at least 1"):
        best_of_k_kl_bound(0)


def test_blockwise_bound_counts_a_partial_last_block():
    """K = 4, M = 4: 8 tokens are 2 selections, 9 tokens are 3 (the ninth token needed a third
    best-of-4 choice), 1 token is 1, 0 tokens none."""
    per_block = math.log(4) - 0.75
    got = blockwise_kl_bound(4, [8, 9, 1, 0, 12], 4)
    np.testing.assert_allclose(got, per_block * np.array([2, 3, 1, 0, 3]), rtol=1e-12, atol=1e-12)
    # M >= L: one block, exactly the best-of-K bound (section 5: blockwise with M >= L is best-of-K)
    assert blockwise_kl_bound(6, [17], 32)[0] == pytest.approx(best_of_k_kl_bound(6), abs=1e-15)
    with pytest.raises(ValueError, match="block size M"):
        blockwise_kl_bound(4, [3], 0)


def test_per_prompt_kl_is_each_prompts_mean_sequence_kl_in_any_row_order():
    rng = np.random.default_rng(5)
    logp, ref_logp = rng.normal(size=(9, 6)), rng.normal(size=(9, 6))
    mask = np.arange(6)[None, :] < rng.integers(1, 7, size=9)[:, None]
    ids = np.array([2, 0, 1, 2, 0, 1, 2, 0, 1])
    per_seq = ((logp - ref_logp) * mask).sum(-1)
    want = [per_seq[ids == k].mean() for k in range(3)]
    np.testing.assert_allclose(per_prompt_kl(logp, ref_logp, mask, ids), want, rtol=1e-12)
    # the per-prompt values average to sample_kl's mean when every prompt has the same count
    assert np.mean(want) == pytest.approx(sample_kl(logp, ref_logp, mask, prompt_ids=ids)[0])
