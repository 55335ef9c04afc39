"""``iapo ctrl``: one KL-regularised RL run on Phi(calibrated reward), checkpointed and resumable.

Calibration pools come from ``iapo calibrate`` (``--pool-dir``, checked against this run's reward
and sampling settings) or are sampled here first. SIGTERM (a preemption notice) writes a final
checkpoint and exits with status 75; ``--resume --run-dir RUN`` continues the recorded run from its
latest readable checkpoint and gives the same numbers as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import sys

from iapo_jax.alignment.ctrl_config import RECORDED_WITHOUT_FLOOR, CTRLConfig
from iapo_jax.commands import JobSpec
from iapo_jax.commands.common import job_context
from iapo_jax.commands.configs import MeshFlags
from iapo_jax.commands.job_inputs import (
    JobInputError,
    build_reward,
    record_reward,
    resolve_model_source,
    reward_spec,
    same_reward,
)



def resume_safe(recorded: dict) -> tuple[str, ...]:
    """What a resume may change: steps, unless a cosine schedule decays over them."""
    return () if recorded.get("lr_schedule", "constant") != "constant" else ("steps",)


LAST_METRICS = "last_metrics"  # kept in each checkpoint, so a resume that trains no step reports them


@dataclasses.dataclass(frozen=True)
class CtrlJobConfig(CTRLConfig, MeshFlags):
    """CTRL training: the CTRLConfig fields plus the model, reward, data and checkpoint settings."""

    model: str = "smollm2-135m-instruct"
    """Reference model pi_ref (calibration pool, KL) and, without --init-policy, the starting
    policy: HF directory, .gguf file, 'smollm2-135m-instruct', or a ctrl/compare run directory
    (its trained policy)."""
    init_policy: str | None = None
    """Starting policy when it is not pi_ref, e.g. an earlier ctrl run directory trained further
    against the original --model (default: --model)."""
    dtype: str = "float32"
    """Parameter and compute dtype (float32 or bfloat16)."""
    reward: str = "vader"
    """Reward spec: a packaged scorer (vader, textblob, harmlessness, length[:key=value]), an
    `iapo train-rm` or `iapo train-scorer` run directory, or a weighted sum (0.7*vader+0.3*RUN)."""
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


def check_config(cfg: CtrlJobConfig) -> None:
    """Everything that needs no model, before any is loaded."""
    try:
        cfg.validate()
    except ValueError as err:
        raise JobInputError(str(err)) from None
    if cfg.save_every < 1:
        raise JobInputError(f"--save-every must be at least 1 (checkpoint every k steps), got "
                            f"{cfg.save_every}")
    if cfg.keep_last < 1:
        raise JobInputError(f"--keep-last must be at least 1 (resuming needs the latest "
                            f"checkpoint), got {cfg.keep_last}")
    if cfg.probe_every < 0:
        raise JobInputError(f"--probe-every must be >= 0 (0 = never), got {cfg.probe_every}")
    if cfg.pool_dir is None and cfg.train_prompts < 1:
        raise JobInputError(f"--train-prompts must be at least 1, got {cfg.train_prompts}")
    if cfg.pool_dir is None and cfg.transform != "raw" and cfg.pool_size < 2:
        raise JobInputError(f"--pool-size must be at least 2 (calibration ranks a response among "
                            f"the reference samples of its prompt), got {cfg.pool_size}")

    reward_spec(cfg.reward)  # names, options and paths; the vocabulary is checked in run()


def check_pool(cfg: CtrlJobConfig, meta: dict, pool_dir) -> None:
    """A pool calibrates this run only if it was scored and sampled as this run scores and samples
    (the pool's meta, written by `iapo calibrate`)."""

    if "reward" in meta:
        pool_reward = reward_spec(meta["reward"], dict(meta.get("reward_options") or {}),
                                  flag=f"the reward of --pool-dir {pool_dir}")
        if not same_reward(pool_reward, reward_spec(cfg.reward)):
            raise JobInputError(
                f"--pool-dir {pool_dir} was scored with reward {str(pool_reward)!r} but this run "
                f"uses {cfg.reward!r}; calibration needs both scored alike: pass --reward "
                f"{str(pool_reward)!r} or build a pool with `iapo calibrate --reward {cfg.reward}`")
    wanted = {"max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "top_k": 0,
              "top_p": 1.0}
    for key, value in wanted.items():
        if key not in meta:
            continue
        if meta[key] != value:
            flag = {"top_k": "top-k", "top_p": "top-p"}.get(key, "--" + key.replace("_", "-"))
            raise JobInputError(
                f"--pool-dir {pool_dir} was built with {key.replace('_', ' ')} {meta[key]!r} but "
                f"this run uses {value!r}; calibration needs both scored and sampled alike: pass "
                f"the matching {flag} or build a pool with `iapo calibrate`")
    model = meta.get("model")
    if model is not None and not _same_model(model, cfg.model):
        raise JobInputError(f"--pool-dir {pool_dir} was sampled from model {model!r}, not "
                            f"{cfg.model!r}; calibration ranks against the reference model's own "
                            f"samples: pass --model {model!r} or build a pool with this model")


def _same_model(a: str, b: str) -> bool:
    from pathlib import Path

    from iapo_jax.errors import IapoError

    if a == b:
        return True
    try:  # a run directory stands for the policy it exported
        a, b = resolve_model_source(a), resolve_model_source(b)
    except IapoError:
        pass
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def check_models(cfg: CtrlJobConfig) -> tuple[str, str]:
    """(reference, starting policy) sources, resolved and checked (configs only) before any load:
    both must exist and share one vocabulary."""
    from iapo_jax.models.checkpoints import load_config

    reference = resolve_model_source(cfg.model)
    init = resolve_model_source(cfg.init_policy) if cfg.init_policy else reference
    if init != reference:
        a, b = load_config(reference).vocab_size, load_config(init).vocab_size
        if a != b:
            raise JobInputError(f"--init-policy {cfg.init_policy} has a vocabulary of {b} tokens but "
                                f"the reference --model has {a}; start from a policy of the "
                                "reference's model family")
    return reference, init


def run(cfg: CtrlJobConfig) -> dict:
    import jax

    import iapo_jax
    from iapo_jax.alignment.ctrl import CTRLTrainer
    from iapo_jax.alignment.trainer import Hook
    from iapo_jax.commands.eval import pool_directory
    from iapo_jax.data.prompts import load_chat_prompts
    from iapo_jax.rewards.calibration import ReferencePool
    from iapo_jax.rewards.pools import sample_reference_pool
    from iapo_jax.runtime import signals

    check_config(cfg)
    pool = None
    if cfg.pool_dir:
        pool_dir = pool_directory(cfg.pool_dir)
        pool = ReferencePool.load(pool_dir)
        check_pool(cfg, pool.meta, cfg.pool_dir)
    # Bad models or rewards are one-line errors before anything loads.
    ref_source, init_source = check_models(cfg)
    spec = reward_spec(cfg.reward, policy=ref_source)
    reward = build_reward(spec)
    with job_context("ctrl", cfg) as ctx:
        mesh = ctx.mesh(cfg)
        ctx.fingerprint_model("model", ref_source)
        if init_source != ref_source:
            ctx.fingerprint_model("init_policy", init_source)
        # Which model is pi_ref matters once a trained policy starts a run: say so in the record.
        ctx.record.set_extra("models", {"reference": ref_source, "init_policy": init_source})
        record_reward(ctx, "reward", spec)
        reference = iapo_jax.load_model(ref_source, dtype=cfg.dtype)
        tokenizer = iapo_jax.load_tokenizer(ref_source)
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
        policy = iapo_jax.load_model(init_source, dtype=cfg.dtype)
        trainer = CTRLTrainer(cfg, policy, reference, tokenizer, reward, pool, prompts,
                              probe_prompts=prompts if cfg.probe_every else (), mesh=mesh)
        ckpt = ctx.checkpointer(keep_last=cfg.keep_last, save_every=cfg.save_every)
        last = {}
        if ctx.resume and ckpt.latest_step() is not None:
            restored = ckpt.restore(model=trainer.trainable, opt_state=trainer.opt_state)
            trainer.restore(restored)
            last = dict(restored.meta.get("extra", {}).get(LAST_METRICS) or {})
            print(f"resumed at step {trainer.step} from {ckpt.directory}", file=sys.stderr)

        def items() -> dict:
            out = trainer.checkpoint_items()
            out["extra"] = {**out.get("extra", {}), LAST_METRICS: last}
            return out

        def log_and_save(step: int, metrics: dict) -> bool:
            nonlocal last
            last = dict(metrics)
            ctx.log(step, **last)
            ckpt.maybe_save(step, **items(), config=cfg)
            return ckpt.should_stop  # the CLI says how to resume and exits with the preemption status

        hooks = [Hook(log_and_save)]
        if cfg.probe_every:
            hooks.insert(0, Hook(lambda step, metrics: metrics.update(probe_win_rate=trainer.probe_win_rate()),
                                 every=cfg.probe_every, at_last=False))
        trainer.fit(cfg.steps, hooks, progress=lambda steps: ctx.progress(
            steps, desc="ctrl", initial=trainer.step, total=cfg.steps))
        with signals.shield():  # the final save and the export finish even if SIGTERM arrives now
            if trainer.step >= cfg.steps:
                ctx.mark_complete()
                if ckpt.latest_step() != trainer.step:
                    ckpt.save(trainer.step, **items(), config=cfg)
            ckpt.close()
            if ctx.is_main and trainer.step >= cfg.steps:
                # The trained policy in HF format: `iapo eval --policy RUN_DIR` and transformers
                # load it.
                from iapo_jax.models.checkpoints import save_hf

                save_hf(trainer.current_policy(), ctx.run_dir / "policy", tokenizer)
                ctx.fingerprint_output("policy", "policy")
        return {"step": trainer.step, "t": trainer.t or 0.0, **{k: v for k, v in last.items()}}


# With the constant learning rate, more steps continue the same run exactly; a cosine schedule
# decays over --steps, so there nothing may change (resume_safe). Ignored by reproduce: the
# step's stage timings (StageClock). Records from before the reward floor trained without one.
JOB = JobSpec(config=CtrlJobConfig, run=run, reproduce_ignore=("*seconds",), resumable=True,
              resume_safe=("steps",), narrow_resume_safe=resume_safe, record_defaults=RECORDED_WITHOUT_FLOOR)
