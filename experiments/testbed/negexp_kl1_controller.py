"""Worst-of-4 at KL 1 on the testbed with the adaptive KL controller instead of the final beta.

    python experiments/testbed/negexp_kl1_controller.py [--steps 800] [--start-beta 1e-2]

At the best t (about 16) the beta whose optimum has KL 1 is 2.8e-5 in trainer units, and training
at that beta from the start collapses to KL 4.3. Starting at a larger beta and letting the
controller (target KL 1, default gain) lower it keeps the exact KL at the target while the win
rate climbs. Prints the exact KL, worst-of-4 win rate, beta and KL(pi || pi_opt) every 50 steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np

from iapo_jax.alignment.ctrl import CTRLTrainer
from iapo_jax.testbed import exact
from iapo_jax.testbed import run as testbed_run
from iapo_jax.testbed.setting import build_setting, spec_for


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--start-beta", type=float, default=1e-2)
    args = parser.parse_args()
    setting = build_setting(spec_for("single"))
    ref = exact.response_log_probs(setting.reference, setting)
    case = testbed_run.prepare_case(setting, "negexp", 1.0, "rloo",
                                    testbed_run.RunSettings(steps=args.steps, samples_per_prompt=256))
    cfg = dataclasses.replace(case.trainer.cfg, beta=args.start_beta, target_kl=1.0)
    trainer = CTRLTrainer(cfg, setting.new_policy(), setting.reference, setting.tokenizer, setting.reward,
                          case.pool, list(setting.prompts))
    start, table = time.perf_counter(), setting.reward_table
    while trainer.step < args.steps:
        trainer.train(min(trainer.step + 50, args.steps))
        logp = exact.response_log_probs(trainer.current_policy(), setting)
        print(f"step {trainer.step}  KL {np.mean(exact.kl_per_prompt(logp, ref)):.4f}  "
              f"WoN_4 {np.mean(exact.win_rate_per_prompt(logp, ref, table, 'won', 4)):.4f}  beta {trainer.beta:.2e}  "
              f"KL(pi||pi_opt) {np.mean(exact.kl_per_prompt(logp, case.opt_logp)):.3f}  "
              f"{time.perf_counter() - start:.0f} s", flush=True)
    optimum = np.mean(exact.win_rate_per_prompt(case.opt_logp, ref, table, "won", 4))
    print(f"optimum: beta {case.beta:.3g}, WoN_4 {optimum:.4f}")


if __name__ == "__main__":
    main()
