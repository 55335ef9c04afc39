"""The compiled CTRL update on SmolLM2 for full fine-tuning, LoRA merged before the forward, and
LoRA applied beside the frozen kernels, timed interleaved in one process so that a busy machine
slows all three alike. The batch has the shape of `iapo bench train`: 4 prompts (80 tokens) x 8
samples x 24 response tokens.

    python experiments/bench/lora_update.py [--dtype float32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import iapo_jax
from iapo_jax.alignment.ctrl_step import RolloutBatch, StepOptions, make_train_step
from iapo_jax.commands.bench import machine_name
from iapo_jax.models import lora

SETUPS = {"full": StepOptions(), "lora merged": StepOptions(lora_rank=8, lora_merged_update=True),
          "lora factored": StepOptions(lora_rank=8)}


def batch(prompts=4, n=8, prompt_len=80, response_len=24, vocab=40000, seed=0) -> RolloutBatch:
    rng = np.random.default_rng(seed)
    rows = prompts * n
    return RolloutBatch(
        prompt_ids=jnp.asarray(rng.integers(3, vocab, (prompts, prompt_len)), jnp.int32),
        prompt_mask=jnp.ones((prompts, prompt_len), bool),
        tokens=jnp.asarray(rng.integers(3, vocab, (rows, response_len)), jnp.int32),
        lengths=jnp.full((rows,), response_len, jnp.int32),
        advantages=jnp.asarray(rng.normal(size=rows), jnp.float32),
        old_logp=jnp.full((rows, response_len), -3.0), ref_logp=jnp.full((rows, response_len), -3.0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    graphdef, state = nnx.split(iapo_jax.load_model("smollm2-135m-instruct", dtype=args.dtype))
    data, opt = batch(), optax.adamw(1e-5)
    live = {}
    for name, opts in SETUPS.items():
        if opts.lora_rank:
            trainable, frozen = lora.init_lora(state, opts.lora_rank, jax.random.PRNGKey(0)), state
        else:
            trainable, frozen = jax.tree.map(jnp.copy, state), None
        step = make_train_step(graphdef, opt, opts)
        out = jax.block_until_ready(step(trainable, frozen, opt.init(trainable), data, 0.1, 0.2))  # compile
        live[name] = [step, out[0], frozen, out[1]]
    times = {name: [] for name in live}
    for _ in range(args.repeats):
        for name, (step, trainable, frozen, opt_state) in live.items():
            t = time.perf_counter()
            trainable, opt_state, _ = jax.block_until_ready(step(trainable, frozen, opt_state, data, 0.1, 0.2))
            times[name].append(time.perf_counter() - t)
            live[name][1], live[name][3] = trainable, opt_state
    print(f"Machine: {machine_name()}; load average {os.getloadavg()[0]:.1f} at the end.")
    full = statistics.median(times["full"])
    print(f"| setup ({args.dtype}) | update (s), median of {args.repeats} | relative to full |")
    print("|---|---:|---:|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.2f} | {statistics.median(ts) / full:.2f} |")


if __name__ == "__main__":
    main()
