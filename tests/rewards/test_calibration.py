"""Calibration: C_hat(x, y) = mean_j [1{r(y) > r(z_j)} + 1/2 * 1{r(y) = r(z_j)}] (algorithms.md §2).

References nobody here wrote: the exact uniformity of ranks of exchangeable samples (checked with
scipy's Kolmogorov-Smirnov test at fixed seeds), a brute-force double loop for ties, and the exact
identity E[C_hat] = 1/2 for fresh reference samples even with ties.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from iapo_jax.rewards import ReferencePool, calibrate, calibrate_sorted, check_pool

# KS acceptance threshold: with fixed seeds the outcome is deterministic; 0.01 leaves room for
# an unlucky but valid draw, while the power checks below fail by many orders of magnitude.
KS_ALPHA = 0.01


def _per_prompt_samples(rng, num_prompts, count):
    """Reference-policy rewards whose distribution differs per prompt (location, scale, shape)."""
    loc = rng.normal(0.0, 3.0, size=(num_prompts, 1))
    scale = rng.uniform(0.2, 2.0, size=(num_prompts, 1))
    normal = loc + scale * rng.normal(size=(num_prompts, count))
    skewed = loc + scale * rng.exponential(size=(num_prompts, count))
    use_skewed = (np.arange(num_prompts) % 2 == 1)[:, None]
    return np.where(use_skewed, skewed, normal).astype(np.float32)


def _fresh_and_pool(seed, num_prompts, n, m):
    rng = np.random.default_rng(seed)
    both = _per_prompt_samples(rng, num_prompts, n + m)
    return both[:, :n], both[:, n:]


def test_fresh_reference_samples_are_uniform_large_pool():
    # m = 1024: C_hat's grid (steps of 1/m) is far below the KS resolution at n = 2048.
    fresh, pool = _fresh_and_pool(seed=0, num_prompts=8, n=256, m=1024)
    u = np.asarray(calibrate(fresh, pool)).ravel()
    result = stats.kstest(u, "uniform")
    print(f"KS large pool: n={u.size} m=1024 D={result.statistic:.4f} p={result.pvalue:.3f}")
    assert result.pvalue > KS_ALPHA
    assert u.min() >= 0.0 and u.max() <= 1.0


def test_fresh_reference_samples_are_uniform_exact_small_pool():
    # With m = 16 and no ties, m * C_hat = #pool below y is uniform on {0..m} for a fresh y, so
    # (m * C_hat + V) / (m + 1) with V ~ U(0, 1) is exactly Uniform[0, 1] (randomised PIT).
    m = 16
    fresh, pool = _fresh_and_pool(seed=1, num_prompts=250, n=16, m=m)
    c = np.asarray(calibrate(fresh, pool)).ravel()
    assert np.allclose(c * m, np.round(c * m))  # no ties: integer ranks
    v = np.random.default_rng(2).uniform(size=c.shape)
    u = (c * m + v) / (m + 1)
    result = stats.kstest(u, "uniform")
    print(f"KS exact PIT: n={u.size} m={m} D={result.statistic:.4f} p={result.pvalue:.3f}")
    assert result.pvalue > KS_ALPHA


def test_ks_rejects_a_policy_better_than_reference():
    # Power check: the same test must fail for samples that are not from pi_ref.
    fresh, pool = _fresh_and_pool(seed=0, num_prompts=8, n=256, m=1024)
    scale = np.std(pool, axis=1, keepdims=True)
    u = np.asarray(calibrate(fresh + 0.2 * scale, pool)).ravel()
    assert stats.kstest(u, "uniform").pvalue < 1e-6


def _brute_force(scores, pool):
    out = np.zeros(scores.shape, np.float64)
    for p in range(scores.shape[0]):
        for i in range(scores.shape[1]):
            total = 0.0
            for z in pool[p]:
                total += 1.0 if scores[p, i] > z else (0.5 if scores[p, i] == z else 0.0)
            out[p, i] = total / pool.shape[1]
    return out


def test_ties_match_brute_force_double_loop():
    rng = np.random.default_rng(3)
    pool = rng.integers(-3, 4, size=(5, 9)).astype(np.float32)  # heavy ties
    scores = rng.integers(-4, 5, size=(5, 12)).astype(np.float32)  # ties, and values outside the pool
    pool[0] = 0.0  # an all-equal pool
    got = np.asarray(calibrate(scores, pool))
    want = _brute_force(scores, pool)
    # Exact in units of 1/(2m) (the half-counts), and to float32 rounding as values.
    np.testing.assert_array_equal(np.rint(got * 2 * pool.shape[1]), want * 2 * pool.shape[1])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)


def test_tied_lexicon_like_reward_has_mean_one_half():
    # For y, z_j ~ pi_ref i.i.d., P(y > z) + P(y = z) / 2 = 1/2 exactly, ties or not. A reward that
    # is exactly 0 on 70% of samples (like VADER on short chat lines) makes ties dominant.
    rng = np.random.default_rng(4)

    def draw(shape):
        return np.where(rng.uniform(size=shape) < 0.7, 0.0, rng.normal(size=shape)).astype(np.float32)

    fresh, pool = draw((200, 20)), draw((200, 50))
    c = np.asarray(calibrate(fresh, pool))
    standard_error = c.std() / np.sqrt(c.size)  # conservative: rows share a pool
    assert abs(c.mean() - 0.5) < 4 * standard_error + 1e-3
    # Counting ties as losses (a bare searchsorted 'left') is visibly biased on the same data.
    left_only = np.mean(np.sum(pool[:, None, :] < fresh[:, :, None], axis=-1) / pool.shape[1])
    assert 0.5 - left_only > 0.15


@pytest.mark.parametrize(
    "fn",
    [lambda x: np.exp(x), lambda x: x**3, lambda x: 2.5 * x + 7.0, lambda x: np.arctan(x / 4)],
    ids=["exp", "cube", "affine", "arctan"],
)
def test_invariant_under_strictly_increasing_maps(fn):
    rng = np.random.default_rng(5)

    def grid(shape):  # ties, exactly representable
        return rng.integers(-16, 17, size=shape) / 8.0

    def cont(shape):
        return rng.normal(size=shape)

    for draw in (grid, cont):
        pool, scores = draw((6, 40)), draw((6, 25))
        mapped_pool = fn(pool).astype(np.float32)
        mapped_scores = fn(scores).astype(np.float32)
        # Precondition: the float32 map kept all values distinct (else it is not strictly increasing).
        both = np.concatenate([pool, scores], axis=1).astype(np.float32)
        mapped = np.concatenate([mapped_pool, mapped_scores], axis=1)
        assert all(len(np.unique(a)) == len(np.unique(b)) for a, b in zip(both, mapped))
        np.testing.assert_array_equal(
            calibrate(mapped_scores, mapped_pool),
            calibrate(scores.astype(np.float32), pool.astype(np.float32)),
        )


def test_jit_and_vmap_compatible():
    fresh, pool = _fresh_and_pool(seed=6, num_prompts=4, n=7, m=33)
    eager = np.asarray(calibrate(fresh, pool))
    np.testing.assert_array_equal(np.asarray(jax.jit(calibrate)(fresh, pool)), eager)
    sorted_pool = jnp.sort(pool, axis=-1)
    np.testing.assert_array_equal(np.asarray(jax.jit(calibrate_sorted)(fresh, sorted_pool)), eager)
    batched = jax.vmap(calibrate)(jnp.stack([fresh, fresh]), jnp.stack([pool, pool]))
    np.testing.assert_array_equal(np.asarray(batched[1]), eager)
    assert eager.dtype == np.float32 and eager.shape == (4, 7)


@pytest.mark.parametrize(
    "pool, scores, message",
    [
        (np.zeros((3, 1)), None, "at least 2"),
        (np.zeros((4,)), None, r"\[P, m\]"),
        (np.array([[0.0, np.nan, 1.0]]), None, "NaN"),
        (np.array([[0.0, np.inf, 1.0]]), None, "NaN/inf"),
        (np.zeros((2, 5)), np.array([[0.0], [np.nan]]), "scores contains 1 NaN"),
        (np.zeros((2, 5)), np.zeros((3, 1)), "P = 2"),
        (np.zeros((0, 5)), None, "no prompts"),
    ],
)
def test_check_pool_errors(pool, scores, message):
    with pytest.raises(ValueError, match=message):
        check_pool(pool, scores)


def test_reference_pool_sorts_saves_and_loads(tmp_path):
    pool = ReferencePool.build(
        ["p0", "p1"],
        np.array([[3.0, 1.0, 2.0], [0.0, 0.0, -1.0]]),
        responses=[["a", "b", "c"], ["d", "e", "f"]],
        meta={"reward": "vader", "m": 3, "seed": 0},
    )
    np.testing.assert_array_equal(pool.scores, [[1, 2, 3], [-1, 0, 0]])
    assert pool.responses == (("b", "c", "a"), ("f", "d", "e"))  # stays paired with its score
    assert (pool.num_prompts, pool.num_samples) == (2, 3)
    got = pool.calibrate(["p1", "p0"], np.array([[0.0], [2.0]]))
    np.testing.assert_allclose(got, [[(1 + 0.5 * 2) / 3], [(1 + 0.5) / 3]], rtol=0, atol=1e-7)

    pool.save(tmp_path / "pool")
    loaded = ReferencePool.load(tmp_path / "pool")
    assert loaded.fingerprint() == pool.fingerprint()
    assert loaded.prompts == pool.prompts and loaded.responses == pool.responses
    np.testing.assert_array_equal(loaded.scores, pool.scores)
    assert len(pool.fingerprint()) == 64

    record = json.loads((tmp_path / "pool" / "pool.json").read_text())
    record["prompts"][0] = "edited"
    (tmp_path / "pool" / "pool.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="fingerprint"):
        ReferencePool.load(tmp_path / "pool")


def test_reference_pool_errors(tmp_path):
    with pytest.raises(ValueError, match="repeats prompt 0"):
        ReferencePool.build(["a", "a"], np.zeros((2, 3)))
    with pytest.raises(ValueError, match="at least 2"):
        ReferencePool.build(["a"], np.zeros((1, 1)))
    with pytest.raises(ValueError, match="NaN"):
        ReferencePool.build(["a"], np.array([[0.0, np.nan]]))
    with pytest.raises(ValueError, match="rows of 2"):
        ReferencePool.build(["a"], np.zeros((1, 2)), responses=[["only one"]])
    pool = ReferencePool.build(["a"], np.zeros((1, 2)))
    with pytest.raises(KeyError, match="no reference samples"):
        pool.calibrate(["b"], np.zeros((1, 1)))
    with pytest.raises(FileNotFoundError, match="missing"):
        ReferencePool.load(tmp_path / "nowhere")
