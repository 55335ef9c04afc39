"""``iapo calibrate``: build reference pools for calibrated rewards (algorithms.md section 2).

For every prompt, m responses are sampled from pi_ref and scored with a registered reward; the
pool (prompts, responses, sorted scores and the sampling settings in its meta) is saved with
``ReferencePool.save`` into ``<run_dir>/pool``, where `iapo ctrl` and `iapo eval` read it.

    iapo calibrate --reward vader --samples 32 --num-prompts 64
    iapo calibrate --prompts-file prompts.jsonl --reward length --reward-options target=40
    iapo calibrate --reward runs/train-rm-...          (a trained reward model; any reward spec)

Final metrics: reward mean/std/min/max, the tie fraction (chance that two reference samples of a
prompt tie, where the mid-rank rule matters), mean response length, and ``pool_digest``, the first
48 bits of the pool's fingerprint as a number, so `iapo reproduce` checks the whole pool.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Literal

import numpy as np

from iapo_jax.commands import JobSpec
from iapo_jax.commands.common import job_context
from iapo_jax.commands.configs import PromptFlags
from iapo_jax.commands.job_inputs import (
    JobInputError,
    build_reward,
    check_distinct,
    check_sampling,
    load_model_and_tokenizer,
    load_job_prompts,
    record_reward,
    resolve_model_source,
    reward_spec,
    spec_meta,
)
from iapo_jax.commands.job_outputs import digest_number, tie_fraction
from iapo_jax.commands.prompt_batches import PromptPlan, decoding_mesh, prompt_bucket, run_batches

POOL_DIR = "pool"


@dataclasses.dataclass(frozen=True)
class CalibrateConfig(PromptFlags):
    """Sample m reference responses per prompt, score them and save the reference pool."""

    model: str = "smollm2-135m-instruct"
    """The reference policy pi_ref: an HF checkpoint directory, a .gguf file or
    'smollm2-135m-instruct'."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute and storage dtype of the weights."""
    samples: int = 16
    """m, reference samples per prompt (calibration resolution is 1/m; around 100 is typical)."""
    reward: str = "vader"
    """Reward spec to calibrate: a packaged scorer (vader, textblob, harmlessness,
    length[:key=value]), an `iapo train-rm` or `iapo train-scorer` run directory, or a weighted sum
    (0.7*vader+0.3*RUN_DIR)."""
    reward_options: tuple[str, ...] = ()
    """KEY=VALUE options of a single-term reward, e.g. target=20 for length."""
    max_new_tokens: int = 32
    """Response length limit in tokens."""
    temperature: float = 1.0
    """Sampling temperature of pi_ref."""
    top_k: int = 0
    """Keep the k most likely tokens (0: all)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1: all)."""
    seed: int = 0
    """Sampling seed."""
    keep_responses: bool = True
    """Store the response texts in the pool (not only their scores)."""
    batch_prompts: int = 8
    """Prompts per compiled decoding call (each with all m samples)."""
    data: int = -1
    """Devices of this process the decoding rows are split over (-1: all)."""


def check_config(cfg: CalibrateConfig) -> None:
    check_sampling(cfg)
    if cfg.samples < 2:
        raise JobInputError(f"--samples must be at least 2 (calibration compares a response with m "
                            f"reference samples; around 100 is typical), got {cfg.samples}")


def pool_meta(cfg: CalibrateConfig, source: str, reward_options: dict, spec=None) -> dict:
    """What a pool's user needs to sample its policy the same way and score it with the same reward
    (``spec``: the parsed reward spec; without it, cfg.reward with ``reward_options``)."""

    reward = spec_meta(spec) if spec is not None else {"reward": cfg.reward,
                                                       "reward_options": reward_options}
    return {"job": "calibrate", "model": source, "dtype": cfg.dtype, **reward, "samples": cfg.samples,
            "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
            "top_k": cfg.top_k, "top_p": cfg.top_p, "seed": cfg.seed, "chat_template": True}


def run(cfg: CalibrateConfig) -> dict:
    import jax

    from iapo_jax.decoding.engine import decode_texts, sample
    from iapo_jax.parallel.distributed import is_main_process
    from iapo_jax.rewards.calibration import ReferencePool

    check_config(cfg)
    with job_context("calibrate", cfg) as ctx:
        source = resolve_model_source(cfg.model)
        prompts = load_job_prompts(cfg)
        check_distinct(prompts)
        spec = reward_spec(cfg.reward, cfg.reward_options, policy=source)
        reward = build_reward(spec)
        ctx.add_data("prompts", prompts, count=len(prompts))
        ctx.fingerprint_model("model", source)
        record_reward(ctx, "reward", spec)
        with ctx.timer("load_model"):
            model, tokenizer = load_model_and_tokenizer(source, cfg.dtype)
        mesh = decoding_mesh(cfg.data)
        if mesh is not None:
            ctx.set_mesh(mesh)
        key = ctx.key(cfg.seed)
        bucket = prompt_bucket(tokenizer, prompts)
        m = cfg.samples

        def sample_batch(batch: list[str], batch_id: int) -> dict:
            out = sample(model, batch, max_new_tokens=cfg.max_new_tokens, n=m,
                         key=jax.random.fold_in(key, batch_id), temperature=cfg.temperature,
                         top_k=cfg.top_k, top_p=cfg.top_p, tokenizer=tokenizer, mesh=mesh,
                         prompt_buckets=(bucket,))
            return {"tokens": np.asarray(out.tokens).reshape(len(batch), m, -1),
                    "lengths": np.asarray(out.lengths).reshape(len(batch), m)}

        plan = PromptPlan.make(len(prompts), cfg.batch_prompts)
        start = time.perf_counter()
        with ctx.timer("sampling"):
            out = run_batches(prompts, plan, sample_batch,
                              progress=lambda it: ctx.progress(it, desc="calibrate: sampling",
                                                               unit="batch"))
        seconds = time.perf_counter() - start
        lengths = out["lengths"].reshape(-1)
        texts = decode_texts(tokenizer, out["tokens"].reshape(lengths.size, -1), lengths)
        with ctx.timer("scoring"):
            scores = reward.score([p for p in prompts for _ in range(m)], list(texts))
        scores = np.asarray(scores, np.float32).reshape(len(prompts), m)
        responses = np.asarray(texts, dtype=object).reshape(len(prompts), m).tolist() \
            if cfg.keep_responses else None
        pool = ReferencePool.build(prompts, scores, responses=responses,
                                   meta=pool_meta(cfg, source, {}, spec))
        pool_dir = ctx.run_dir / POOL_DIR
        if is_main_process():
            pool.save(pool_dir)
            ctx.add_data("reference_pool", path=pool_dir)
        fingerprint = pool.fingerprint()
        ctx.record.set_extra("pool", {"path": str(pool_dir), "fingerprint": fingerprint})
        ctx.fingerprint_output("pool", POOL_DIR, sha256=fingerprint)  # content: prompts, responses, scores
        return {
            "prompts": pool.num_prompts,
            "samples_per_prompt": pool.num_samples,
            "mean_reward": float(scores.mean()),
            "reward_std": float(scores.std()),
            "min_reward": float(scores.min()),
            "max_reward": float(scores.max()),
            "tie_fraction": tie_fraction(pool.scores),
            "mean_response_tokens": float(lengths.mean()),
            "pool_digest": digest_number(fingerprint),
            "tokens_per_s": float(lengths.sum() / max(seconds, 1e-9)),
        }


JOB = JobSpec(config=CalibrateConfig, run=run, reproduce_ignore=("*per_s",))
