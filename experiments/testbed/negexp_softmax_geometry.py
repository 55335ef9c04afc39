"""Why worst-of-4 with -exp at KL 1 collapses: the softmax policy-gradient geometry, not the trainer.

    python experiments/testbed/negexp_softmax_geometry.py --out experiments/results/testbed/negexp-geometry

Same objective E_pi[Phi] - beta * KL(pi || pi_ref) (single case, t = 15.96, beta = 2.8e-5, optimum at
KL 1), optimised on its exact gradient two ways:

- tabular: the 4 x 1,024 logits themselves are the parameters (float64), with Adam (which moves each
  logit at a rate of about lr whatever its probability) and with plain gradient descent (whose step
  on a logit scales with that response's probability: the vanishing gradient of softmax policy
  gradient, Mei et al. 2020, arXiv 2005.06392);
- transformer: the testbed's policy, driven through the trainer's own compiled step by the exact
  expected gradient (``iapo_jax.testbed.expected_gradient``), with the trainer's optimiser (Adam,
  clip 1) and with variants swapped in for this experiment (Adam without momentum, Adam with a
  short second-moment memory, gradient descent with momentum).

Writes ``geometry.json`` and ``geometry.md`` (KL, KL(pi || pi_opt) and the exact worst-of-4 win rate
at fixed steps).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import optax

TRANSFORM, TARGET_KL = "negexp", 1.0


def tabular_runs(case, steps: int) -> list[dict]:
    import jax
    import jax.numpy as jnp

    with jax.enable_x64(True):
        phi = jnp.asarray(case.phi, jnp.float64)
        ref = jnp.asarray(case.ref_logp, jnp.float64)

        def objective(z):
            logp = jax.nn.log_softmax(z, -1)
            return jnp.mean(jnp.sum(jnp.exp(logp) * (phi - case.beta * (logp - ref)), -1))

        grad = jax.jit(jax.grad(lambda z: -objective(z)))
        rows = []
        for name, tx in [("Adam lr 2e-2", optax.adam(2e-2)), ("Adam lr 2e-1", optax.adam(0.2)),
                         ("gradient descent lr 1", optax.sgd(1.0)), ("gradient descent lr 100", optax.sgd(100.0))]:
            z, state, start = ref, tx.init(ref), time.perf_counter()
            for step in range(1, steps + 1):
                updates, state = tx.update(grad(z), state)
                z = optax.apply_updates(z, updates)
                if step in checkpoints(steps):
                    rows.append(measure(case, np.asarray(jax.nn.log_softmax(z, -1)), "tabular", name, step,
                                        time.perf_counter() - start))
    return rows


def checkpoints(steps: int) -> tuple[int, ...]:
    return tuple(sorted({max(steps // 100, 1), steps // 20, steps // 4, steps}))


def measure(case, logp, policy: str, optimiser: str, step: int, seconds: float) -> dict:
    from iapo_jax.testbed import exact
    from iapo_jax.testbed import run as testbed_run

    m = testbed_run.evaluate(logp, case.ref_logp, SETTING.reward_table, case.procedure, case.n)
    row = {"policy": policy, "optimiser": optimiser, "step": step, "kl": m["kl"],
           "kl_to_optimum": float(np.mean(exact.kl_per_prompt(logp, case.opt_logp))),
           "win_rate": m["win_rate"], "seconds": round(seconds, 1)}
    print(f"{policy:11s} {optimiser:32s} step {step:5d}  KL {row['kl']:.3f}  "
          f"KL(pi||opt) {row['kl_to_optimum']:.3g}  W {row['win_rate']:.4f}", flush=True)
    return row


def transformer_runs(steps: int) -> list[dict]:
    import iapo_jax.alignment.ctrl as ctrl
    from iapo_jax.testbed import expected_gradient
    from iapo_jax.testbed import run as testbed_run

    variants = [("trainer's Adam (b1 0.9, b2 0.999)", dict(b1=0.9, b2=0.999)),
                ("Adam b1 0 (no momentum)", dict(b1=0.0, b2=0.999)),
                ("Adam b2 0.99", dict(b1=0.9, b2=0.99)),
                ("gradient descent, momentum 0.9, lr 1", None)]
    original, rows = ctrl.make_optimizer, []
    try:
        for name, adam in variants:
            def make_optimizer(cfg, total_updates=0, adam=adam):
                lr = optax.linear_schedule(cfg.learning_rate / (cfg.warmup_steps + 1), cfg.learning_rate,
                                           cfg.warmup_steps)
                inner = optax.adam(lr, **adam) if adam else optax.sgd(1.0, momentum=0.9)
                return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), inner)

            ctrl.make_optimizer = make_optimizer  # the trainer builds its step with this optimiser
            ctrl.compiled_step.cache_clear()
            case = testbed_run.prepare_case(SETTING, TRANSFORM, TARGET_KL, "rloo",
                                            testbed_run.RunSettings(steps=steps))
            fixed = expected_gradient.fixed_rows(SETTING)
            start = time.perf_counter()
            for step in range(steps + 1):
                rollout, logp = expected_gradient.exact_rollout(case.trainer, SETTING, case.phi, case.ref_logp, fixed)
                if step in checkpoints(steps):
                    rows.append(measure(case, logp, "transformer", name, step, time.perf_counter() - start))
                if step < steps:
                    case.trainer.update(rollout)
    finally:
        ctrl.make_optimizer = original
        ctrl.compiled_step.cache_clear()
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| policy | optimiser | step | KL (opt 1.000) | KL(pi ‖ pi_opt) | WoN_4 win rate |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['policy']} | {r['optimiser']} | {r['step']} | {r['kl']:.3f} | "
                     f"{r['kl_to_optimum']:.3g} | {r['win_rate']:.4f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    global SETTING
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tabular-steps", type=int, default=5000)
    parser.add_argument("--transformer-steps", type=int, default=200)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    from iapo_jax.testbed import run as testbed_run
    from iapo_jax.testbed.setting import build_setting, spec_for

    SETTING = build_setting(spec_for("single"))
    case = testbed_run.prepare_case(SETTING, TRANSFORM, TARGET_KL, "rloo", testbed_run.RunSettings())
    print(f"t {case.t:.3f}  beta {case.beta:.3e}", flush=True)
    rows = tabular_runs(case, args.tabular_steps) + transformer_runs(args.transformer_steps)
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"transform": TRANSFORM, "target_kl": TARGET_KL, "t": case.t, "beta": case.beta, "rows": rows}
    (args.out / "geometry.json").write_text(json.dumps(record, indent=1))
    (args.out / "geometry.md").write_text(markdown(rows))


SETTING = None

if __name__ == "__main__":
    main()
