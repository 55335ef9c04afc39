"""``iapo train-scorer``: train a prefix scorer (CD-FUDGE or CD-Q) and measure what it buys.

Rollouts are sampled from the base model (pi_ref) on packaged chat prompts of the training topics
and scored with a registered reward; held-out rollouts come from prompts of other topics. The
scorer (a value head on pi_ref's backbone) is trained with the CD-FUDGE loss, or with CD-Q's
Bellman targets (``--top-k 0`` for the exact full-vocabulary expectation, else pi_ref's top k).
Evaluation: mean squared error of V([x, y^t]) to the final reward by prefix length (next to the
best constant's), and the win rate against pi_ref of blockwise CD (K candidates of M tokens)
guided by the trained scorer, with a bootstrap interval over the held-out prompts.

    iapo train-scorer --reward vader --mode head --steps 300
    iapo generate --mode blockwise --scorer runs/train-scorer-...     (decode with it)

The run directory gets the rollouts (``rollouts_{train,eval}.npz``), Orbax checkpoints and
``head_model.json``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

from iapo_jax.commands import JobSpec
from iapo_jax.commands.common import job_context
from iapo_jax.commands.configs import HeadTrainingFlags
from iapo_jax.commands.job_inputs import (
    JobInputError,
    build_reward,
    check_mesh_batch,
    check_sampling,
    load_model_and_tokenizer,
    load_prompts,
    record_reward,
    resolve_model_source,
    reward_spec,
)


TRAIN_ROLLOUTS, EVAL_ROLLOUTS = "rollouts_train.npz", "rollouts_eval.npz"


@dataclasses.dataclass(frozen=True)
class TrainScorerConfig(HeadTrainingFlags):
    """Train a CD-FUDGE / CD-Q prefix scorer on pi_ref rollouts and evaluate blockwise CD with it."""

    model: str = "smollm2-135m-instruct"
    """pi_ref and the scorer's starting backbone: an HF checkpoint directory, a .gguf file or
    'smollm2-135m-instruct'."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute and storage dtype of the weights."""
    reward: str = "vader"
    """Reward spec the scorer learns to predict: a packaged scorer (vader, textblob, harmlessness,
    length[:key=value]), an `iapo train-rm` run directory, or a weighted sum (0.7*vader+0.3*RUN)."""
    reward_options: tuple[str, ...] = ()
    """KEY=VALUE options of a single-term reward, e.g. target=20 for length."""
    method: Literal["fudge", "cdq"] = "fudge"
    """CD-FUDGE (regress every prefix on the final reward) or CD-Q (Bellman targets)."""
    top_k: int = 8
    """CD-Q: expectation over pi_ref's k most likely next tokens (renormalised); 0 = the exact
    expectation over the whole vocabulary (small vocabularies only)."""
    num_prompts: int = 64
    """Training prompts (packaged chat questions, train topics)."""
    samples_per_prompt: int = 4
    """Rollouts per training prompt."""
    eval_prompts: int = 32
    """Held-out prompts (packaged chat questions, eval topics) for the MSE and the win rate."""
    eval_samples: int = 2
    """Held-out rollouts per prompt for the MSE."""
    prompt_seed: int = 0
    """Shuffle seed of the packaged chat questions."""
    max_new_tokens: int = 24
    """Response length limit."""
    temperature: float = 1.0
    """Sampling temperature of pi_ref."""
    batch_prompts: int = 16
    """Prompts per compiled sampling call."""
    rollouts_file: Path | None = None
    """Train on these rollouts (an .npz written by this job or `save_rollouts`) instead of sampling;
    CD-Q may use off-policy data, CD-FUDGE expects pi_ref's own samples."""
    eval_rollouts_file: Path | None = None
    """Held-out rollouts (.npz) instead of sampling them."""
    steps: int = 300
    """Optimizer steps."""
    batch_size: int = 16
    """Rollouts per step."""
    eval_every: int = 100
    """Log held-out MSE every this many steps (0: only at the end)."""
    bucket_edges: tuple[int, ...] = (0, 1, 4, 8, 16, 32, 64)
    """Prefix-length buckets [a, b) of the MSE report."""
    win_rate: bool = True
    """Measure blockwise CD's win rate against pi_ref with the trained scorer."""
    cd_k: int = 4
    """Blockwise CD: candidate blocks per step (K)."""
    block_size: int = 4
    """Blockwise CD: tokens per block (M)."""
    cd_samples: int = 2
    """Blockwise CD responses per held-out prompt."""
    reference_samples: int = 4
    """pi_ref responses per held-out prompt compared against."""
    bootstrap: int = 2000
    """Bootstrap resamples of the win-rate interval."""
    seed: int = 0
    """Seed of sampling, initialisation, batch order and the bootstrap."""


def check_config(cfg: TrainScorerConfig) -> None:
    check_sampling(cfg)
    check_mesh_batch(cfg, cfg.batch_size)
    for name in ("num_prompts", "samples_per_prompt", "eval_prompts", "eval_samples", "cd_k",
                 "cd_samples", "reference_samples"):
        if getattr(cfg, name) < 1:
            raise JobInputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if cfg.top_k < 0:
        raise JobInputError(f"--top-k must be >= 0 (0 = exact over the whole vocabulary), got {cfg.top_k}")
    if cfg.method == "fudge" and cfg.top_k not in (0, 8):
        raise JobInputError("--top-k is a CD-Q option; drop it or pass --method cdq")
    edges = list(cfg.bucket_edges)
    if not edges or edges[0] != 0 or sorted(set(edges)) != edges:
        raise JobInputError(f"--bucket-edges must start at 0 and increase strictly, got {edges}")
    if cfg.eval_every < 0:
        raise JobInputError(f"--eval-every must be >= 0, got {cfg.eval_every}")
    for flag, path in (("--rollouts-file", cfg.rollouts_file), ("--eval-rollouts-file", cfg.eval_rollouts_file)):
        if path is not None and not Path(path).is_file():
            raise JobInputError(f"{flag} {path} not found; pass an .npz written by `iapo train-scorer`")
    try:
        train_config(cfg).validate()
    except ValueError as err:
        raise JobInputError(str(err)) from None


def train_config(cfg: TrainScorerConfig):
    from iapo_jax.alignment.prefix_scorer import ScorerTrainConfig

    return ScorerTrainConfig(**cfg.head_train_settings(), method=cfg.method, top_k=cfg.top_k or None)


def _bucket_metrics(prefix: str, report: dict) -> dict:
    out = {f"{prefix}mse": report["mse"], f"{prefix}baseline_mse": report["baseline_mse"]}
    for b in report["buckets"]:
        out[f"{prefix}mse_t{b['t_from']}_{b['t_to']}"] = b["mse"]
    return out


def run(cfg: TrainScorerConfig) -> dict:
    import jax
    import numpy as np

    from iapo_jax.alignment.prefix_rollouts import (
        load_rollouts,
        sample_rollouts,
        save_rollouts,
    )
    from iapo_jax.alignment.prefix_scorer import PrefixScorerTrainer
    from iapo_jax.evaluation.blockwise_win_rate import blockwise_win_rate
    from iapo_jax.parallel.distributed import is_main_process
    from iapo_jax.rewards.head_checkpoints import build_head_model, write_spec

    check_config(cfg)
    # A bad --model or --reward is a one-line error before anything runs.
    spec = reward_spec(cfg.reward, cfg.reward_options, policy=resolve_model_source(cfg.model))
    with job_context("train-scorer", cfg) as ctx:
        source = resolve_model_source(cfg.model)
        reward = build_reward(spec)
        ctx.fingerprint_model("model", source)
        record_reward(ctx, "reward", spec)
        prompts = {split: load_prompts(None, split=split, categories=(), num_prompts=count,
                                       seed=cfg.prompt_seed)
                   for split, count in (("train", cfg.num_prompts), ("eval", cfg.eval_prompts))}
        for split, ps in prompts.items():
            ctx.add_data(f"{split}_prompts", ps, count=len(ps))
        with ctx.timer("load_model"):
            base, tokenizer = load_model_and_tokenizer(source, cfg.dtype)
        key = ctx.key(cfg.seed)
        rollouts = {}
        for i, (split, n, name) in enumerate((("train", cfg.samples_per_prompt, TRAIN_ROLLOUTS),
                                              ("eval", cfg.eval_samples, EVAL_ROLLOUTS))):
            path = ctx.run_dir / name
            given = cfg.rollouts_file if split == "train" else cfg.eval_rollouts_file
            if given is not None or (ctx.resume and path.is_file()):
                rollouts[split] = load_rollouts(given if given is not None else path)
                if given is not None:
                    ctx.add_data(f"{split}_rollouts", path=given, rows=rollouts[split].size)
                continue
            with ctx.timer(f"sample_{split}_rollouts"):
                rollouts[split], _, _ = sample_rollouts(
                    base, tokenizer, prompts[split], reward, n=n, max_new_tokens=cfg.max_new_tokens,
                    key=jax.random.fold_in(key, i), temperature=cfg.temperature,
                    prompts_per_batch=cfg.batch_prompts)
            if is_main_process():
                save_rollouts(path, rollouts[split])
            ctx.add_data(f"{split}_rollouts", path=path, rows=rollouts[split].size)
        train, held_out = rollouts["train"], rollouts["eval"]
        from iapo_jax.data.fingerprint import fingerprint

        for split, data in rollouts.items():  # by content: .npz files carry their write time
            ctx.fingerprint_output(f"{split}_rollouts", sha256=fingerprint(jax.tree.leaves(data.as_numpy())))

        scorer = build_head_model("value", base, cfg.seed)
        ckpt = ctx.checkpointer(keep_last=2)
        with ctx.timer("prepare"):
            trainer = PrefixScorerTrainer(train_config(cfg), scorer, train, held_out, reference=base,
                                          checkpointer=ckpt, log=lambda step, **m: log(step, **m),
                                          mesh=ctx.mesh(cfg))

        def log(step, **metrics):
            ctx.log(step, **metrics)
            ctx.stop_if_preempted(trainer.save, step)  # SIGTERM: checkpoint this step and stop

        if ctx.resume and ckpt.latest_step() is not None:
            trainer.restore()
        before = trainer.evaluate(edges=cfg.bucket_edges)
        with ctx.timer("train"):
            trainer.train(eval_every=cfg.eval_every,
                          progress=lambda it: ctx.progress(it, desc="train-scorer", unit="step"))
        after = trainer.evaluate(edges=cfg.bucket_edges)
        ctx.record.set_extra("mse_by_prefix_length", {"before": before, "after": after})
        if is_main_process():
            write_spec(ctx.run_dir, kind="value", base=source, finetune=trainer.finetune, step=trainer.step,
                       reward=str(spec), method=cfg.method)
        result = {
            "train_rollouts": train.size, "eval_rollouts": held_out.size,
            "train_reward_mean": float(np.mean(train.rewards)), "train_reward_std": float(np.std(train.rewards)),
            "eval_mse_before": before["mse"], "steps": trainer.step,
            **_bucket_metrics("eval_", after),
        }
        if cfg.win_rate:
            with ctx.timer("blockwise_win_rate"):
                wr = blockwise_win_rate(
                    base, trainer.current_model(), tokenizer, prompts["eval"], reward, k=cfg.cd_k,
                    block_size=cfg.block_size, max_new_tokens=cfg.max_new_tokens, samples=cfg.cd_samples,
                    reference_samples=cfg.reference_samples, key=cfg.seed + 1000,
                    temperature=cfg.temperature, num_resamples=cfg.bootstrap)
            ctx.record.set_extra("blockwise_cd", wr)
            result.update({f"blockwise_{k}": v for k, v in wr.items()})
        return result


# Nothing may change on --resume (resume_safe empty): the learning-rate schedule decays over
# --steps, so even more steps would make the continued run differ from any uninterrupted one.
JOB = JobSpec(config=TrainScorerConfig, run=run, reproduce_ignore=("*per_s", "*seconds"), resumable=True)
