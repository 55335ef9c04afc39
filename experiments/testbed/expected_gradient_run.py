"""Drive the CTRL trainer's compiled step with the exact expected gradient on the testbed.

    python experiments/testbed/expected_gradient_run.py negexp 0.5 --steps 400
    python experiments/testbed/expected_gradient_run.py identity 0.5 --steps 300 --case sequence

Same model, optimiser (Adam, clipping, schedule) and objective as a sampled run, without the
sampling noise: it separates an estimator that is too noisy from an optimisation that is too slow.
Prints the exact KL and KL(pi || pi_opt) every steps/10 updates.
"""

from __future__ import annotations

import argparse
import time

from iapo_jax.testbed import expected_gradient
from iapo_jax.testbed import run as testbed_run
from iapo_jax.testbed.setting import build_setting, spec_for


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("transform")
    parser.add_argument("kl", type=float)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--case", default="single")
    args = parser.parse_args()
    setting = build_setting(spec_for(args.case))
    settings = testbed_run.RunSettings(steps=args.steps, learning_rate=args.learning_rate)
    case = testbed_run.prepare_case(setting, args.transform, args.kl, "rloo", settings)
    start = time.perf_counter()
    expected_gradient.train_on_expected_gradient(case.trainer, setting, case.phi, case.ref_logp, args.steps,
                                                 every=max(args.steps // 10, 1), log=print)
    print(f"seconds {time.perf_counter() - start:.0f}")


if __name__ == "__main__":
    main()
