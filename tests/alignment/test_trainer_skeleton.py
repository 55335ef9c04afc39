"""The trainer skeleton: the update step against a hand-computed AdamW step, the fit loop's hooks,
and the one optimizer's schedules read off Adam's update (with a constant gradient it is the rate)."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from iapo_jax.alignment.optimizer import OptimizerConfig, learning_rate_schedule, make_optimizer
from iapo_jax.alignment.trainer import Hook, Trainer, make_update_step


def _rates(cfg: OptimizerConfig, total: int, steps: int) -> list[float]:
    opt = make_optimizer(cfg, total)
    params = {"w": jnp.zeros(())}
    state = opt.init(params)
    out = []
    for _ in range(steps):
        updates, state = opt.update({"w": jnp.ones(())}, state, params)
        out.append(-float(updates["w"]))
    return out


def test_ctrl_schedule_warms_up_from_its_first_update_and_holds():
    cfg = OptimizerConfig(learning_rate=1.0, warmup_steps=3, schedule="constant", warmup_from_zero=False)
    np.testing.assert_allclose(_rates(cfg, 0, 6), [1 / 4, 2 / 4, 3 / 4, 1, 1, 1], atol=1e-4)


def test_ctrl_cosine_decays_to_zero_at_the_last_update():
    cfg = OptimizerConfig(learning_rate=1.0, warmup_steps=0, schedule="cosine", end_fraction=0.0,
                          warmup_from_zero=False)
    rates = _rates(cfg, 10, 11)
    expected = [0.5 * (1 + np.cos(np.pi * t / 10)) for t in range(11)]
    np.testing.assert_allclose(rates, expected, atol=1e-4)


def test_a_warmup_longer_than_the_run_still_reaches_the_peak():
    schedule = learning_rate_schedule(OptimizerConfig(learning_rate=1.0, warmup_steps=50), 5)
    assert float(schedule(4)) == pytest.approx(1.0)


@pytest.mark.parametrize("bad, match", [(dict(schedule="linear"), "lr_schedule"), (dict(learning_rate=0.0), "learning_rate"),
                                        (dict(max_grad_norm=0.0), "max_grad_norm"), (dict(end_fraction=2.0), "end_fraction")])
def test_bad_optimizer_settings_name_the_setting(bad, match):
    with pytest.raises(ValueError, match=match):
        make_optimizer(OptimizerConfig(**bad), 10)


def test_update_step_is_one_adamw_step_on_the_loss_gradient():
    """loss = sum((w - x)^2) over the trainable only; frozen passes through untouched."""

    def loss_fn(trainable, frozen, batch, scale):
        loss = scale * jnp.sum(jnp.square(trainable["w"] - batch)) + 0.0 * frozen["b"]
        return loss, {"loss": loss}

    opt = optax.adamw(0.1, weight_decay=0.0)
    step = make_update_step(loss_fn, opt)
    w0, batch = np.asarray([1.0, -2.0], np.float32), np.asarray([0.5, 0.5], np.float32)
    trainable = {"w": jnp.asarray(w0)}  # donated to the step
    opt_state = opt.init(trainable)
    new, _, metrics = step(trainable, {"b": jnp.float32(3.0)}, opt_state, jnp.asarray(batch), jnp.float32(2.0))
    grad = 2.0 * 2.0 * (w0 - batch)
    # Adam's first step moves each coordinate by lr * sign(grad) (bias-corrected m / sqrt(v)).
    np.testing.assert_allclose(np.asarray(new["w"]), w0 - 0.1 * np.sign(grad), atol=1e-6)
    assert float(metrics["grad_norm"]) == pytest.approx(float(np.linalg.norm(grad)), rel=1e-6)
    assert float(metrics["loss"]) == pytest.approx(2.0 * float(np.sum((w0 - batch) ** 2)))


class _Counter(Trainer):
    def __init__(self):
        self.step = 0

    def train_step(self):
        self.step += 1
        return {"step_seen": float(self.step)}


def test_hooks_run_every_k_steps_and_at_the_last_and_can_stop_the_loop():
    calls = []
    trainer = _Counter()
    history = trainer.fit(7, [Hook(lambda s, m: calls.append(("eval", s)), every=3),
                              Hook(lambda s, m: calls.append(("save", s)), every=3, at_last=False),
                              Hook(lambda s, m: m.update(extra=1.0))])
    assert [s for kind, s in calls if kind == "eval"] == [3, 6, 7]
    assert [s for kind, s in calls if kind == "save"] == [3, 6]
    assert len(history) == 7 and all(m["extra"] == 1.0 for m in history)

    stopper = _Counter()
    history = stopper.fit(10, [Hook(lambda s, m: s == 4)])
    assert stopper.step == 4 and len(history) == 4
    history = stopper.fit(10)  # resumes from where it stopped
    assert stopper.step == 10 and len(history) == 6
