"""CTRL trainer options checked on the exact testbed (controller, LoRA + PPO), and its building blocks."""

import numpy as np
import pytest

import iapo_jax
from iapo_jax.alignment.ctrl import CTRLTrainer
from iapo_jax.alignment.ctrl_config import CTRLConfig
from iapo_jax.rewards.pools import sample_reference_pool


class AlnumReward:
    """Count of ASCII letters and digits in the response: dense enough for a random byte model."""

    name = "alnum"

    def score(self, prompts, responses):
        return np.array([sum(c.isascii() and c.isalnum() for c in r) for r in responses], np.float32)


PROMPTS = [f"prompt number {i}" for i in range(8)]


def _pool(model, tok, reward, m=16, seed=7):
    # Rounds of 4 per prompt reuse the rollout program (8 prompts x 4 samples): one compile.
    return sample_reference_pool(model, tok, reward, PROMPTS, m=m, max_new_tokens=12, key=seed, per_call=4)


@pytest.fixture(scope="module")
def setup(tiny_chat_llama_dir):
    ref = iapo_jax.load_model(tiny_chat_llama_dir)
    tok = iapo_jax.load_tokenizer(tiny_chat_llama_dir)
    reward = AlnumReward()
    return ref, tok, reward, _pool(ref, tok, reward)


@pytest.fixture(scope="module")
def testbed():
    """The exact one-token testbed: KLs and win rates of a trained policy are computed exactly."""
    from iapo_jax.testbed import exact
    from iapo_jax.testbed import run as testbed_run
    from iapo_jax.testbed.setting import build_setting, spec_for

    setting = build_setting(spec_for("single"))
    ref_logp = exact.response_log_probs(setting.reference, setting)
    pool = testbed_run.reference_pool(setting, 512, 0)
    case = testbed_run.prepare_case(setting, "identity", 0.5, "rloo", pool=pool, ref_logp=ref_logp)
    return setting, ref_logp, pool, case


@pytest.mark.parametrize("controller", ["proportional", "predictive"])
def test_kl_controller_finds_the_beta_of_the_target_kl(testbed, controller):
    """Started at beta 0.05, each controller (default gain) settles where the exact KL is the
    target and beta is the one whose exact optimum has that KL (solved independently by bisection)."""
    import dataclasses

    from iapo_jax.testbed import exact

    setting, ref_logp, pool, case = testbed
    cfg = dataclasses.replace(case.trainer.cfg, beta=0.05, target_kl=0.5, steps=300, kl_controller=controller)
    trainer = CTRLTrainer(cfg, setting.new_policy(), setting.reference, setting.tokenizer, setting.reward,
                          pool, list(setting.prompts))
    trainer.train()
    kl = float(np.mean(exact.kl_per_prompt(exact.response_log_probs(trainer.current_policy(), setting), ref_logp)))
    rel = 0.1 if controller == "predictive" else 0.2  # predictive measured: KL 0.51, beta 0.241
    assert kl == pytest.approx(0.5, rel=rel)
    assert trainer.beta == pytest.approx(case.beta, rel=rel)  # the exact beta for KL 0.5: 0.245


def test_lora_with_ppo_moves_towards_the_optimum_and_keeps_the_base(testbed):
    """LoRA factors on the decoder kernels with PPO-clip (2 epochs): KL(pi || pi_opt) and the win-rate
    gap to the optimum shrink (the frozen head limits how far LoRA can go), the base stays frozen."""
    import dataclasses

    import jax
    from iapo_jax.testbed import exact

    setting, ref_logp, pool, case = testbed
    cfg = dataclasses.replace(case.trainer.cfg, lora_rank=8, clip_eps=0.2, ppo_epochs=2,
                              learning_rate=1e-2, steps=150)
    trainer = CTRLTrainer(cfg, setting.new_policy(), setting.reference, setting.tokenizer, setting.reward,
                          pool, list(setting.prompts))
    base = jax.tree.map(np.asarray, trainer.frozen)
    trainer.train()
    logp = exact.response_log_probs(trainer.current_policy(), setting)
    before = float(np.mean(exact.kl_per_prompt(ref_logp, case.opt_logp)))
    after = float(np.mean(exact.kl_per_prompt(logp, case.opt_logp)))
    win = float(np.mean(exact.win_rate_per_prompt(logp, ref_logp, setting.reward_table)))
    assert after < 0.9 * before, (before, after)
    assert win > 0.53, win  # from 0.5; the optimum is 0.773
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(trainer.frozen)):
        np.testing.assert_array_equal(a, np.asarray(b))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"beta": 0.0}, "beta must be positive"),
        ({"target_kl": -1.0}, "target_kl must be positive"),
        ({"deploy_n": 0}, "at least 1"),
        ({"transform": "exp", "procedure": "won"}, "negexp"),
        ({"transform": "cubic"}, "unknown transform"),
    ],
)
def test_bad_config_is_rejected_before_compute(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CTRLConfig(**kwargs).validate()


def test_mismatched_vocabularies_are_rejected(setup, tiny_llama_dir):
    ref, tok, reward, pool = setup
    other = iapo_jax.load_model(tiny_llama_dir)  # vocab 256 vs 136
    with pytest.raises(ValueError, match="vocabulary"):
        CTRLTrainer(CTRLConfig(t=2.0), other, ref, tok, reward, pool, PROMPTS)


@pytest.mark.parametrize("name,t", [("exp", 3.0), ("exp", 200.0), ("negexp", 5.0)])
def test_unit_range_transform_is_an_increasing_affine_map_of_phi(name, t):
    import jax.numpy as jnp

    from iapo_jax.rewards.transforms import unit_range_transform
    from iapo_jax.rewards.transforms import get_transform

    u = jnp.linspace(0.0, 1.0, 11)
    scaled = np.asarray(unit_range_transform(name, t)(u), np.float64)
    assert scaled[0] == pytest.approx(0.0, abs=1e-6) and scaled[-1] == pytest.approx(1.0, abs=1e-6)
    assert np.all(np.isfinite(scaled)) and np.all(np.diff(scaled) >= 0)
    if t < 80:  # where Phi itself is finite in float32: scaled = a * Phi + b exactly
        phi = np.asarray(get_transform(name, t)(u), np.float64)
        a, b = np.polyfit(phi, scaled, 1)
        np.testing.assert_allclose(a * phi + b, scaled, atol=1e-5)
        assert a > 0


def test_train_step_with_shared_prompt_rows_equals_repeated_prompts(tiny_llama_dir):
    """The step runs each prompt once for its n responses: loss and gradients equal those of the same
    rollout with the prompt repeated per response (float32 rounding)."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from iapo_jax.alignment.ctrl_step import RolloutBatch, StepOptions, make_train_step

    model = iapo_jax.load_model(tiny_llama_dir)
    graphdef, state = nnx.split(model)
    keep = optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p), lambda u, s, p=None: (u, u))
    step = make_train_step(graphdef, keep, StepOptions(kl_in_loss=True, use_clip=True))
    rng = np.random.default_rng(0)
    prompts, n, plen, rlen = 3, 4, 10, 7
    lens = rng.integers(4, plen + 1, prompts)
    mask = np.arange(plen)[None] >= (plen - lens)[:, None]
    ids = np.where(mask, rng.integers(3, 256, (prompts, plen)), 0).astype(np.int32)
    rows = prompts * n
    common = dict(tokens=jnp.asarray(rng.integers(3, 256, (rows, rlen)), jnp.int32),
                  lengths=jnp.asarray(rng.integers(1, rlen + 1, rows), jnp.int32),
                  advantages=jnp.asarray(rng.normal(size=rows), jnp.float32),
                  old_logp=jnp.asarray(rng.normal(-5.5, 0.3, (rows, rlen)), jnp.float32),
                  ref_logp=jnp.asarray(rng.normal(-5.5, 0.3, (rows, rlen)), jnp.float32))
    shared = RolloutBatch(prompt_ids=jnp.asarray(ids), prompt_mask=jnp.asarray(mask), **common)
    repeated = RolloutBatch(prompt_ids=jnp.repeat(shared.prompt_ids, n, 0),
                            prompt_mask=jnp.repeat(shared.prompt_mask, n, 0), **common)
    results = []
    for batch in (shared, repeated):
        trainable = jax.tree.map(jnp.copy, state)
        _, grads, metrics = step(trainable, None, keep.init(trainable), batch, jnp.float32(0.1), jnp.float32(0.2))
        results.append((jax.tree.leaves(grads), metrics))
    (g_shared, m_shared), (g_rep, m_rep) = results
    for name in ("loss", "kl_loss_estimate", "entropy", "grad_norm"):
        np.testing.assert_allclose(float(m_shared[name]), float(m_rep[name]), rtol=1e-5, err_msg=name)
    for a, b in zip(g_shared, g_rep):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5 * float(np.max(np.abs(b))) + 1e-9)
