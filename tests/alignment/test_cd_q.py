"""CD-Q (algorithms.md §5) on a tabular prefix scorer small enough to solve by hand.

Prompt x, pi_ref(a | x) = pi_ref(b | x) = 1/2, then EOS with probability 1. Prefixes (table
entries): 0 = [x], 1 = [x, a], 2 = [x, b], 3 = [x, a, EOS], 4 = [x, b, EOS]. Each data row holds
the three prefixes of one response. The data are off-policy: three rows "a" and one row "b"
(pi_ref would give 1/2 each).

With the response-dependent reward r(a) = 1, r(b) = 0:
- CD-Q's fixed point is pi_ref's value whatever the data: V(3) = V(1) = 1, V(4) = V(2) = 0,
  V(0) = 1/2 * 1 + 1/2 * 0 = 1/2;
- CD-FUDGE regresses every prefix on the rewards of the rows that contain it, so the data's
  mixture leaks into the root: V(0) = (3 * 1 + 1 * 0) / 4 = 3/4.
With a reward of the prompt only (r = 0.3 for both responses) the two agree (all 0.3): a test
with such a reward cannot tell them apart.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iapo_jax.alignment import losses

ROWS = ["a", "a", "a", "b"]
IDX = np.array([[0, 1 if y == "a" else 2, 3 if y == "a" else 4] for y in ROWS])  # [B, T=3]
# Candidate next tokens of each prefix (k = 2; a padded candidate has probability 0)
CHILD = np.array([[[1, 2], [3 if y == "a" else 4, 0], [0, 0]] for y in ROWS])  # [B, T, k]
PROBS = np.array([[[0.5, 0.5], [1.0, 0.0], [0.0, 0.0]] for _ in ROWS])
IS_LAST = np.array([[False, False, True]] * len(ROWS))  # the EOS prefix ends the response
MASK = np.ones(IDX.shape)


def _rewards(kind):
    return np.array([1.0 if y == "a" else 0.0 for y in ROWS]) if kind == "response" else np.full(len(ROWS), 0.3)


def _cd_q(theta, reward):
    return losses.cd_q_loss(theta[IDX], theta[CHILD], jnp.asarray(PROBS), jnp.asarray(reward),
                            jnp.asarray(IS_LAST), jnp.asarray(MASK))


def _fudge(theta, reward):
    return losses.cd_fudge_loss(theta[IDX], jnp.asarray(reward), jnp.asarray(MASK))


def _hand_targets(theta, reward):
    """v_t by hand: r at the EOS prefix, else sum_z pi_ref(z) V(child z)."""
    nxt = np.sum(PROBS * theta[CHILD], axis=-1)
    return np.where(IS_LAST, reward[:, None], nxt)


def test_targets_carry_no_gradient_and_the_loss_gradient_is_the_semi_gradient():
    """With next_values depending on the parameters, d loss / d theta must be
    (1/B) sum_{b,t} (V_bt - v_bt) e_{idx(b,t)} only; the residual gradient (targets
    differentiated too) adds -(1/B) sum (V - v) sum_z p_z e_{child z}, which is far from it here."""
    theta = np.array([0.2, -0.4, 0.9, 0.3, -0.7])
    reward = _rewards("response")
    resid = theta[IDX] - _hand_targets(theta, reward)  # [B, T]
    semi = np.zeros(5)
    np.add.at(semi, IDX, resid / len(ROWS))
    through_targets = np.zeros(5)
    np.add.at(through_targets, CHILD, -(resid * ~IS_LAST)[..., None] * PROBS / len(ROWS))
    got = np.asarray(jax.grad(_cd_q)(jnp.asarray(theta), reward))
    np.testing.assert_allclose(got, semi, rtol=1e-6, atol=1e-7)
    assert np.max(np.abs(through_targets)) > 0.1  # the test would see a leaking gradient
    # and the targets themselves have zero derivative in the next values
    g = jax.grad(lambda nv: jnp.sum(losses.cd_q_targets(nv, jnp.asarray(PROBS), jnp.asarray(reward),
                                                        jnp.asarray(IS_LAST))))(jnp.asarray(theta[CHILD]))
    np.testing.assert_allclose(np.asarray(g), 0.0, atol=1e-12)


def _solve(loss, reward, iterations=6):
    """Fixed point of the loss's own update: with the targets held fixed the loss is quadratic
    with diagonal curvature (visits of each entry) / B, so a Newton step sets every entry to the
    mean of its current targets. For CD-FUDGE one step is the exact minimiser."""
    visits = np.bincount(IDX.reshape(-1), minlength=5) / len(ROWS)
    theta = jnp.zeros(5)
    for _ in range(iterations):
        theta = theta - jax.grad(loss)(theta, reward) / visits
    return np.asarray(theta)


def test_cd_q_reaches_pi_ref_values_on_off_policy_data_where_cd_fudge_does_not():
    reward = _rewards("response")
    cdq, fudge = _solve(_cd_q, reward), _solve(_fudge, reward)
    np.testing.assert_allclose(cdq, [0.5, 1.0, 0.0, 1.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(fudge, [0.75, 1.0, 0.0, 1.0, 0.0], atol=1e-6)
    assert float(_cd_q(jnp.asarray(cdq), reward)) == pytest.approx(0.0, abs=1e-12)  # a true fixed point
    assert float(_cd_q(jnp.asarray(fudge), reward)) > 1e-3  # FUDGE's solution violates Bellman at the root


def test_with_a_prompt_only_reward_cd_q_and_cd_fudge_agree():
    reward = _rewards("prompt")
    np.testing.assert_allclose(_solve(_cd_q, reward), np.full(5, 0.3), atol=1e-6)
    np.testing.assert_allclose(_solve(_fudge, reward), np.full(5, 0.3), atol=1e-6)
