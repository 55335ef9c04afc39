"""Pure losses checked against brute force and closed forms (no model code involved)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from iapo_jax.alignment import losses


def test_rloo_matches_explicit_leave_one_out():
    rng = np.random.default_rng(0)
    r = rng.normal(size=(3, 5)).astype(np.float32)
    adv = np.asarray(losses.rloo_advantages(jnp.asarray(r)))
    for p, i in itertools.product(range(3), range(5)):
        others = np.delete(r[p], i)
        assert adv[p, i] == pytest.approx(r[p, i] - others.mean(), abs=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        losses.rloo_advantages(jnp.ones((2, 1)))


def test_kl_estimators_are_unbiased_for_exact_kl():
    """k1 and k3 average to the exact KL(pi || ref) over samples from pi (fixed seed, 200k draws)."""
    pi = np.array([0.5, 0.3, 0.15, 0.05])
    ref = np.array([0.25, 0.25, 0.25, 0.25])
    exact = float(np.sum(pi * np.log(pi / ref)))
    draws = jax.random.choice(jax.random.PRNGKey(0), 4, shape=(200_000,), p=jnp.asarray(pi))
    logp, ref_logp = jnp.log(pi)[draws], jnp.log(ref)[draws]
    for name in ("k1", "k3"):
        est = float(jnp.mean(losses.get_kl_estimator(name)(logp, ref_logp)))
        assert est == pytest.approx(exact, abs=5e-3), name
    assert float(jnp.min(losses.kl_k3(logp, ref_logp))) >= 0.0
    with pytest.raises(ValueError, match="unknown KL estimator"):
        losses.get_kl_estimator("k9")


def test_rloo_with_kl_in_reward_converges_to_tilted_optimum():
    """On a bandit the KL-regularised optimum is pi_ref * exp(R / beta) / Z (closed form)."""
    n_arms, beta, n = 6, 0.5, 16
    reward = jnp.linspace(0.0, 1.0, n_arms)
    ref_logits = jnp.log(jnp.array([0.3, 0.25, 0.2, 0.12, 0.08, 0.05]))
    target = jax.nn.softmax(ref_logits + reward / beta)
    opt = optax.adam(0.05)

    def loss_fn(logits, key):
        draws = jax.random.categorical(key, logits, shape=(32, n))  # 32 prompts x n samples
        logp_all = jax.nn.log_softmax(logits)
        logp = logp_all[draws][..., None]
        ref_logp = jax.nn.log_softmax(ref_logits)[draws][..., None]
        shaped = losses.kl_penalised_rewards(reward[draws], logp, ref_logp, jnp.ones_like(logp), beta)
        adv = losses.rloo_advantages(shaped).reshape(-1)
        return losses.policy_gradient_loss(
            logp.reshape(-1, 1), logp.reshape(-1, 1), adv, jnp.ones((adv.shape[0], 1))
        )

    @jax.jit
    def step(carry, key):
        logits, state = carry
        grads = jax.grad(loss_fn)(logits, key)
        updates, state = opt.update(grads, state)
        return (optax.apply_updates(logits, updates), state), None

    (logits, _), _ = jax.lax.scan(
        step, (ref_logits, opt.init(ref_logits)), jax.random.split(jax.random.PRNGKey(1), 600)
    )
    tv = 0.5 * float(jnp.sum(jnp.abs(jax.nn.softmax(logits) - target)))
    assert tv < 0.03, tv


def test_ppo_clip_blocks_gradient_outside_trust_region():
    logp = jnp.array([[0.0]])
    old = jnp.array([[-1.0]])  # ratio e > 1 + eps
    mask = jnp.ones((1, 1))
    g_pos = jax.grad(lambda lp: losses.policy_gradient_loss(lp, old, jnp.array([1.0]), mask, 0.2))(logp)
    g_neg = jax.grad(lambda lp: losses.policy_gradient_loss(lp, old, jnp.array([-1.0]), mask, 0.2))(logp)
    assert float(g_pos[0, 0]) == 0.0  # positive advantage already past 1+eps: clipped
    assert float(g_neg[0, 0]) != 0.0  # negative advantage: still pushed down


def test_bradley_terry_gradient_and_accuracy():
    c, r = jnp.array([2.0, 0.0, 1.0]), jnp.array([1.0, 1.0, 1.0])
    gc = jax.grad(lambda x: losses.bradley_terry_loss(x, r))(c)
    np.testing.assert_allclose(gc, -(1 - jax.nn.sigmoid(c - r)) / 3, rtol=1e-6)
    assert float(losses.pairwise_accuracy(c, r)) == pytest.approx((1 + 0 + 0.5) / 3)
    centred = losses.bradley_terry_loss(c, r, center_coef=0.1)
    assert float(centred) > float(losses.bradley_terry_loss(c, r))


def _toy_tree(depth=3, vocab=3, seed=0):
    """All sequences of a tiny vocabulary; pi_ref per prefix, reward at the leaves."""
    rng = np.random.default_rng(seed)
    prefixes = [p for d in range(depth + 1) for p in itertools.product(range(vocab), repeat=d)]
    probs = {p: rng.dirichlet(np.ones(vocab)) for p in prefixes if len(p) < depth}
    reward = {p: rng.normal() for p in prefixes if len(p) == depth}
    value = {}
    for p in sorted(prefixes, key=len, reverse=True):  # exact expected reward under pi_ref
        value[p] = reward[p] if len(p) == depth else sum(
            probs[p][z] * value[p + (z,)] for z in range(vocab)
        )
    return prefixes, probs, reward, value


def test_cd_fudge_minimiser_is_the_conditional_expected_reward():
    """Least squares on on-policy rollouts: tabular V converges to E[r | prefix] (exact by DP)."""
    depth, vocab = 3, 3
    prefixes, probs, reward, value = _toy_tree(depth, vocab)
    rng = np.random.default_rng(1)
    seqs = []
    for _ in range(20_000):
        p = ()
        while len(p) < depth:
            p = p + (int(rng.choice(vocab, p=probs[p])),)
        seqs.append(p)
    index = {p: i for i, p in enumerate(prefixes)}
    ids = jnp.array([[index[s[: t + 1]] for t in range(depth)] for s in seqs])  # prefixes y^1..y^T
    r = jnp.array([reward[s] for s in seqs])
    table = jnp.zeros(len(prefixes))
    # The loss is quadratic in each table entry; its exact minimiser is the per-prefix mean target.
    grad = jax.grad(lambda v: losses.cd_fudge_loss(v[ids], r, jnp.ones(ids.shape)))(table)
    hess = jax.grad(lambda v: losses.cd_fudge_loss(v[ids], r, jnp.ones(ids.shape)))(table + 1.0) - grad
    solved = table - grad / jnp.where(hess == 0, 1.0, hess)
    for p in prefixes:
        if len(p) >= 1 and hess[index[p]] > 0.01:  # well-visited prefixes
            assert float(solved[index[p]]) == pytest.approx(value[p], abs=0.1)


def test_cd_q_fixed_point_is_exact_value_with_off_policy_data():
    """Iterating CD-Q targets over uniformly chosen (off-policy) prefixes reaches V^{pi_ref}."""
    depth, vocab = 3, 3
    prefixes, probs, reward, value = _toy_tree(depth, vocab, seed=2)
    inner = [p for p in prefixes if 1 <= len(p) < depth]
    table = {p: 0.0 for p in prefixes}
    for _ in range(depth + 1):
        nv = jnp.array([[[table[p + (z,)] for z in range(vocab)]] for p in inner])
        pr = jnp.array([[probs[p]] for p in inner])
        targets = losses.cd_q_targets(nv, pr, jnp.zeros(len(inner)), jnp.zeros((len(inner), 1), bool))
        for p, t in zip(inner, np.asarray(targets)[:, 0]):
            table[p] = float(t)
        leaves = [p for p in prefixes if len(p) == depth]
        lt = losses.cd_q_targets(
            jnp.zeros((len(leaves), 1, 1)), jnp.ones((len(leaves), 1, 1)),
            jnp.array([reward[p] for p in leaves]), jnp.ones((len(leaves), 1), bool),
        )
        for p, t in zip(leaves, np.asarray(lt)[:, 0]):
            table[p] = float(t)
    for p in inner:
        assert table[p] == pytest.approx(value[p], abs=1e-5)
    # The loss is zero exactly at the fixed point.
    nv = jnp.array([[[table[p + (z,)] for z in range(vocab)]] for p in inner])
    pr = jnp.array([[probs[p]] for p in inner])
    vals = jnp.array([[table[p]] for p in inner])
    loss = losses.cd_q_loss(vals, nv, pr, jnp.zeros(len(inner)), jnp.zeros((len(inner), 1), bool),
                            jnp.ones((len(inner), 1)))
    assert float(loss) < 1e-10


def test_renormalised_top_k_sums_to_one():
    ids, p = losses.renormalised_top_k(jnp.array([[0.1, 3.0, 2.0, -1.0]]), 2)
    assert ids.tolist() == [[1, 2]]
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-6)


# --- KL in the loss: the expected gradient must be grad KL(pi || pi_ref) over whole sequences ---

V = 4  # a tabular two-token policy: pi(y1, y2) = softmax(a)[y1] * softmax(b[y1])[y2]


def _tabular(theta):
    a, b = theta
    first = jax.nn.log_softmax(a)  # [V]
    second = jax.nn.log_softmax(b, axis=-1)  # [V, V]
    ys = np.array(list(itertools.product(range(V), repeat=2)))
    return jnp.stack([first[ys[:, 0]], second[ys[:, 0], ys[:, 1]]], axis=1), ys  # [V*V, 2]


def _exact_kl(theta, ref_theta):
    lp, _ = _tabular(theta)
    ref, _ = _tabular(ref_theta)
    seq, ref_seq = lp.sum(1), ref.sum(1)
    return jnp.sum(jnp.exp(seq) * (seq - ref_seq))


def _expected_surrogate_grad(theta, ref_theta, surrogate):
    """E_{y ~ pi}[grad surrogate(y)], exactly: the sum over every sequence weighted by pi(y)."""
    ref_lp, _ = _tabular(ref_theta)
    weights = jnp.exp(jax.lax.stop_gradient(_tabular(theta)[0]).sum(1))

    def objective(th):
        lp, _ = _tabular(th)
        per_row = jax.vmap(lambda l, r: surrogate(l[None], r[None], jnp.ones((1, 2))))(lp, ref_lp)
        return jnp.sum(weights * per_row)

    return jax.grad(objective)(theta)


def _thetas():
    rng = np.random.default_rng(3)
    theta = (jnp.asarray(rng.normal(size=V)), jnp.asarray(rng.normal(size=(V, V))))
    ref = (jnp.asarray(rng.normal(size=V)), jnp.asarray(rng.normal(size=(V, V))))
    return theta, ref


def test_kl_loss_term_has_the_sequence_kl_gradient():
    """The offered KL-in-loss surrogate: its on-policy expected gradient equals jax.grad of the
    exact sequence KL, computed independently by enumerating all V^2 sequences."""
    theta, ref = _thetas()
    want = jax.grad(_exact_kl)(theta, ref)
    got = _expected_surrogate_grad(theta, ref, losses.kl_loss_term)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-6)
    assert float(jnp.max(jnp.abs(want[1]))) > 0.05  # the second token's credit is not trivial


def test_per_token_kl_estimators_in_the_loss_have_wrong_gradients_and_are_refused():
    """Why only the sequence-level k2 is offered: per-token k1 has zero expected gradient, per-token
    k3 follows the reverse KL, per-token k2 misses the later tokens' KL; all differ from the truth."""
    theta, ref = _thetas()
    want = jax.grad(_exact_kl)(theta, ref)
    flat = lambda g: np.concatenate([np.ravel(x) for x in g])  # noqa: E731
    for name in ("k1", "k2", "k3"):
        per_token = lambda lp, r, m, name=name: jnp.mean(losses.sequence_kl(lp, r, m, name))  # noqa: E731
        got = flat(_expected_surrogate_grad(theta, ref, per_token))
        assert np.max(np.abs(got - flat(want))) > 1e-2, name
    for name in ("k1", "k3"):
        with pytest.raises(ValueError, match="cannot be put in the loss"):
            losses.check_kl_loss_estimator(name)
    from iapo_jax.alignment.ctrl_config import CTRLConfig

    with pytest.raises(ValueError, match="cannot be put in the loss"):
        CTRLConfig(kl_in_loss=True, kl_estimator="k3").validate()


def test_sequence_rewards_to_advantages_by_hand():
    """KL in the reward: A_i = s_i - mean_{j != i} s_j with s = R - beta * sum_t (log pi - log pi_ref);
    KL in the loss: the same leave-one-out on R alone."""
    from iapo_jax.alignment.ctrl_step import sequence_rewards_to_advantages

    rng = np.random.default_rng(5)
    p, n, r_len, beta = 2, 3, 4, 0.3
    rewards = rng.normal(size=p * n).astype(np.float32)
    logp = rng.normal(-2, 0.5, (p * n, r_len)).astype(np.float32)
    ref = rng.normal(-2, 0.5, (p * n, r_len)).astype(np.float32)
    lengths = np.array([4, 2, 1, 3, 4, 2])
    mask = (np.arange(r_len)[None] < lengths[:, None]).astype(np.float32)
    shaped = rewards - beta * ((logp - ref) * mask).sum(1)
    for kl_in_loss, s in ((False, shaped), (True, rewards)):
        got = np.asarray(sequence_rewards_to_advantages(
            jnp.asarray(rewards), jnp.asarray(logp), jnp.asarray(ref), jnp.asarray(mask), beta, n, kl_in_loss))
        for i in range(p * n):
            group = s[(i // n) * n:(i // n + 1) * n]
            others = np.delete(group, i % n)
            assert got[i] == pytest.approx(s[i] - others.mean(), abs=1e-5)


def test_ctrl_rejects_temperature_other_than_one():
    from iapo_jax.alignment.ctrl_config import CTRLConfig

    with pytest.raises(ValueError, match="temperature 1"):
        CTRLConfig(temperature=0.7).validate()
