"""``iapo ctrl``: one KL-regularised RL run on Phi(calibrated reward), checkpointed and resumable.

Calibration pools come from ``iapo calibrate`` (``--pool-dir``) or are sampled here first. SIGTERM
(a preemption notice) writes a final checkpoint and exits cleanly; ``--resume --run-dir RUN``
continues from the latest readable checkpoint and gives the same numbers as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import sys

from iapo_jax.alignment.ctrl_config import CTRLConfig
from iapo_jax.commands.configs import MeshFlags


@dataclasses.dataclass(frozen=True)
class CtrlJobConfig(CTRLConfig, MeshFlags):
    """CTRL training: the CTRLConfig fields plus the model, reward, data and checkpoint settings."""

    model: str = "smollm2-135m-instruct"
    """Reference model and starting policy: HF directory, .gguf file or 'smollm2-135m-instruct'."""
    dtype: str = "float32"
    """Parameter and compute dtype (float32 or bfloat16)."""
    reward: str = "vader"
    """Registered reward (vader, textblob, harmlessness, length)."""
    train_prompts: int = 32
    """Training prompts from the chatterbot-corpus train split (ignored with --pool-dir)."""
    pool_dir: str | None = None
    """A pool saved by `iapo calibrate` (its prompts become the training prompts)."""
    pool_size: int = 16
    """Reference samples per prompt when the pool is sampled here."""
    probe_every: int = 0
    """Every k steps, log the win rate of fresh samples against the pool (0 = never)."""
    save_every: int = 5
    """Checkpoint every k steps (and at the end, and on SIGTERM)."""
    keep_last: int = 2
    """Checkpoints to keep."""


def run(cfg: CtrlJobConfig) -> dict:
    import jax

    import iapo_jax
    from iapo_jax.alignment.ctrl import CTRLTrainer
    from iapo_jax.commands.common import job_context
    from iapo_jax.data.prompts import load_chat_prompts
    from iapo_jax.rewards import get_reward
    from iapo_jax.rewards.calibration import ReferencePool
    from iapo_jax.rewards.pools import sample_reference_pool

    cfg.validate()
    reward = get_reward(cfg.reward)
    pool = ReferencePool.load(cfg.pool_dir) if cfg.pool_dir else None
    with job_context("ctrl", cfg) as ctx:
        mesh = ctx.mesh(cfg)
        reference = iapo_jax.load_model(cfg.model, dtype=cfg.dtype)
        tokenizer = iapo_jax.load_tokenizer(cfg.model)
        if pool is None and cfg.transform != "raw":
            prompts = load_chat_prompts("train", limit=cfg.train_prompts, seed=cfg.seed)
            with ctx.timer("calibrate"):
                pool = sample_reference_pool(
                    reference, tokenizer, reward, prompts, m=cfg.pool_size, per_call=cfg.samples_per_prompt
                    if cfg.pool_size % cfg.samples_per_prompt == 0 else None,
                    max_new_tokens=cfg.max_new_tokens, key=jax.random.fold_in(ctx.key(cfg.seed), 1))
        prompts = list(pool.prompts) if pool is not None else load_chat_prompts(
            "train", limit=cfg.train_prompts, seed=cfg.seed)
        ctx.add_data("train_prompts", prompts)
        if pool is not None:
            ctx.add_data("pool", pool.fingerprint())
        policy = iapo_jax.load_model(cfg.model, dtype=cfg.dtype)
        trainer = CTRLTrainer(cfg, policy, reference, tokenizer, reward, pool, prompts,
                              probe_prompts=prompts if cfg.probe_every else (), mesh=mesh)
        ckpt = ctx.checkpointer(keep_last=cfg.keep_last, save_every=cfg.save_every)
        if ctx.resume and ckpt.latest_step() is not None:
            restored = ckpt.restore(model=trainer.trainable, opt_state=trainer.opt_state)
            trainer.restore(restored)
            print(f"resumed at step {trainer.step} from {ckpt.directory}", file=sys.stderr)
        last = {}
        for _ in ctx.progress(range(trainer.step, cfg.steps), desc="ctrl", initial=trainer.step,
                              total=cfg.steps):
            result = trainer.train_step()
            last = result.metrics
            if cfg.probe_every and trainer.step % cfg.probe_every == 0:
                last["probe_win_rate"] = trainer.probe_win_rate()
            ctx.log(trainer.step, **last)
            ckpt.maybe_save(trainer.step, **trainer.checkpoint_items(), config=cfg)
            if ckpt.should_stop:
                print("preemption notice: final checkpoint written; resume with --resume",
                      file=sys.stderr)
                break
        if trainer.step == cfg.steps and ckpt.latest_step() != cfg.steps:
            ckpt.save(trainer.step, **trainer.checkpoint_items(), config=cfg)
        ckpt.close()
        if ctx.is_main and trainer.step == cfg.steps:
            # The trained policy in HF format: `iapo eval --policy RUN_DIR` and transformers load it.
            from iapo_jax.models.checkpoints import save_hf

            save_hf(trainer.current_policy(), ctx.run_dir / "policy", tokenizer)
        return {"step": trainer.step, "t": trainer.t or 0.0, **{k: v for k, v in last.items()}}
