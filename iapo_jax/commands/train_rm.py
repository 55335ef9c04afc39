"""``iapo train-rm``: train a Bradley-Terry reward model on preference pairs.

Pairs come from one of
- ``--pairs sampled`` (default): n responses per chat prompt sampled from the base model (pi_ref)
  and ranked by a packaged scorer (``--scorer``), best against worst, ties skipped; held-out pairs
  come from prompts of other topics (every distinct-score pair of each held-out prompt);
- ``--pairs hh-rlhf``: Anthropic HH-RLHF from the official jsonl.gz files (``--hh-rlhf-dir``);
- ``--pairs file``: JSON lines written by ``preference_pairs.save_pairs`` (``--pairs-file``,
  with ``--eval-pairs-file`` for the held-out split).

    iapo train-rm --scorer harmlessness --mode head --steps 300
    iapo train-rm --pairs hh-rlhf --hh-rlhf-dir ~/hh --mode lora --steps 2000

The run directory gets the pairs (``pairs_train.jsonl``, ``pairs_eval.jsonl``), Orbax checkpoints
of what was trained, and ``head_model.json``; ``get_reward("reward_model", path=RUN_DIR)`` (or
``--reward reward_model --reward-options path=RUN_DIR`` in other jobs) then scores with it.
Final metrics: held-out pairwise accuracy before and after training, training accuracy, loss.
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
    check_mesh_batch,
    check_sampling,
    load_model_and_tokenizer,
    load_prompts,
    make_reward,
    parse_key_values,
    resolve_model_source,
)

TRAIN_PAIRS, EVAL_PAIRS = "pairs_train.jsonl", "pairs_eval.jsonl"
TRAIN_EVAL_PAIRS = 1024  # training pairs scored at the end to report the fit


@dataclasses.dataclass(frozen=True)
class TrainRMConfig(HeadTrainingFlags):
    """Train a Bradley-Terry reward model (on the base model's backbone) on preference pairs."""

    model: str = "smollm2-135m-instruct"
    """Backbone of the reward model and, for sampled pairs, pi_ref: an HF checkpoint directory, a
    .gguf file or 'smollm2-135m-instruct'."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute and storage dtype of the weights."""
    pairs: Literal["sampled", "hh-rlhf", "file"] = "sampled"
    """Where preference pairs come from (see the job's description)."""
    scorer: str = "harmlessness"
    """Registered reward that ranks sampled responses (the preference to imitate)."""
    scorer_options: tuple[str, ...] = ()
    """KEY=VALUE options of the scorer."""
    num_prompts: int = 64
    """Training prompts (packaged chat questions, train topics) for sampled pairs."""
    eval_prompts: int = 32
    """Held-out prompts (packaged chat questions, eval topics) for sampled pairs."""
    prompt_seed: int = 0
    """Shuffle seed of the packaged chat questions."""
    samples_per_prompt: int = 4
    """Responses sampled per prompt (n >= 2)."""
    max_new_tokens: int = 24
    """Length limit of sampled responses."""
    temperature: float = 1.0
    """Sampling temperature of pi_ref."""
    pairing: Literal["best_worst", "all"] = "best_worst"
    """Training pairs per prompt: best against worst, or every pair with distinct scores."""
    eval_pairing: Literal["best_worst", "all"] = "all"
    """Held-out pairs per prompt."""
    min_gap: float = 0.0
    """Pairs whose scores differ by at most this much count as ties and are skipped."""
    batch_prompts: int = 16
    """Prompts per compiled sampling call."""
    pairs_file: Path | None = None
    """Training pairs (JSON lines) for --pairs file."""
    eval_pairs_file: Path | None = None
    """Held-out pairs (JSON lines) for --pairs file."""
    hh_rlhf_dir: Path | None = None
    """Folder with the official <subset>/{train,test}.jsonl.gz files, for --pairs hh-rlhf."""
    hh_rlhf_data_dir: Path | None = None
    """Where the prepared HH-RLHF dataset is kept (default: <hh-rlhf-dir>/prepared)."""
    hh_rlhf_subset: str = "harmless-base"
    """HH-RLHF subset (harmless-base, helpful-base, ...)."""
    max_pairs: int = 0
    """Use at most this many training pairs (0: all); held-out pairs at most a quarter of that."""
    max_length: int = 128
    """Tokens per (prompt, response) sequence; longer ones lose the start of the prompt."""
    pooling: Literal["last", "mean"] = "last"
    """How the head reads a sequence: the end-of-turn token's state, or the mean of every token's
    (suits rewards that add up over words, such as a sentiment lexicon)."""
    batch_size: int = 16
    """Pairs per step."""
    margin: float = 0.0
    """Constant margin m in -log sigmoid(r_chosen - r_rejected - m)."""
    margin_from_gap: float = 0.0
    """Adds this times the scorer's gap of each sampled pair to its margin."""
    center_coef: float = 0.0
    """Weight of the centering penalty mean((r_chosen + r_rejected)^2)."""
    eval_every: int = 50
    """Log held-out accuracy every this many steps (0: only at the end)."""


def check_config(cfg: TrainRMConfig) -> None:
    check_sampling(cfg)
    check_mesh_batch(cfg, cfg.batch_size)
    if cfg.pairs == "sampled" and cfg.samples_per_prompt < 2:
        raise JobInputError(f"--samples-per-prompt must be at least 2 to make pairs, got {cfg.samples_per_prompt}")
    if cfg.pairs == "sampled" and (cfg.num_prompts < 1 or cfg.eval_prompts < 1):
        raise JobInputError("--num-prompts and --eval-prompts must be at least 1")
    if cfg.pairs == "file" and (cfg.pairs_file is None or cfg.eval_pairs_file is None):
        raise JobInputError("--pairs file needs --pairs-file and --eval-pairs-file (JSON lines of "
                            '{"prompt", "chosen", "rejected"})')
    for path in (cfg.pairs_file, cfg.eval_pairs_file):
        if cfg.pairs == "file" and path is not None and not Path(path).is_file():
            raise JobInputError(f"pairs file {path} not found")
    if cfg.pairs == "hh-rlhf" and cfg.hh_rlhf_dir is None and cfg.hh_rlhf_data_dir is None:
        raise JobInputError("--pairs hh-rlhf needs --hh-rlhf-dir (the folder with "
                            "<subset>/train.jsonl.gz and test.jsonl.gz)")
    if cfg.max_pairs < 0 or cfg.min_gap < 0:
        raise JobInputError("--max-pairs and --min-gap must be >= 0")
    if cfg.max_length < 8:
        raise JobInputError(f"--max-length must be at least 8 tokens, got {cfg.max_length}")
    if cfg.eval_every < 0:
        raise JobInputError(f"--eval-every must be >= 0, got {cfg.eval_every}")
    try:
        train_config(cfg).validate()
    except ValueError as err:
        raise JobInputError(str(err)) from None


def train_config(cfg: TrainRMConfig):
    from iapo_jax.alignment.reward_model_training import RewardTrainConfig

    return RewardTrainConfig(**cfg.head_train_settings(), margin=cfg.margin, margin_from_gap=cfg.margin_from_gap,
                             center_coef=cfg.center_coef)


def _sampled_pairs(cfg: TrainRMConfig, ctx, model, tokenizer):
    import jax

    from iapo_jax.rewards.preference_pairs import sample_pairs

    scorer = make_reward(cfg.scorer, parse_key_values(cfg.scorer_options, "--scorer-options"))
    key = ctx.key(cfg.seed)
    out, stats = {}, {}
    for split, count, pairing in (("train", cfg.num_prompts, cfg.pairing),
                                  ("eval", cfg.eval_prompts, cfg.eval_pairing)):
        prompts = load_prompts(None, split=split, categories=(), num_prompts=count, seed=cfg.prompt_seed)
        ctx.add_data(f"{split}_prompts", prompts, count=len(prompts))
        with ctx.timer(f"sample_{split}_pairs"):
            pairs, st, scores, _ = sample_pairs(
                model, tokenizer, prompts, scorer, n=cfg.samples_per_prompt,
                max_new_tokens=cfg.max_new_tokens, key=jax.random.fold_in(key, len(out)),
                temperature=cfg.temperature, pairing=pairing, min_gap=cfg.min_gap,
                prompts_per_batch=cfg.batch_prompts)
        out[split] = pairs
        stats[split] = {**st.as_dict(), "score_mean": float(scores.mean()), "score_std": float(scores.std())}
    return out["train"], out["eval"], stats


def _hh_rlhf_pairs(cfg: TrainRMConfig):
    from iapo_jax.data.hh_rlhf_pipeline import hh_rlhf_source, preference_loader
    from iapo_jax.rewards.preference_pairs import pairs_from_records

    data_dir = cfg.hh_rlhf_data_dir or Path(cfg.hh_rlhf_dir) / "prepared"
    out = []
    for split, limit in (("train", cfg.max_pairs), ("test", cfg.max_pairs // 4)):
        source = hh_rlhf_source(cfg.hh_rlhf_subset, split, data_dir, manual_dir=cfg.hh_rlhf_dir)
        loader = preference_loader(source, seed=cfg.seed, shuffle=True)
        records = []
        for rec in loader:
            records.append(rec)
            if limit and len(records) >= limit:
                break
        out.append(pairs_from_records(records))
    return out[0], out[1], {}


def run(cfg: TrainRMConfig) -> dict:
    import numpy as np

    from iapo_jax.parallel.distributed import is_main_process
    from iapo_jax.rewards.head_checkpoints import build_head_model, write_spec
    from iapo_jax.rewards.preference_pairs import load_pairs, save_pairs
    from iapo_jax.alignment.reward_model_training import (
        RewardModelTrainer,
        encode_preference_splits,
    )

    check_config(cfg)
    resolve_model_source(cfg.model)  # a bad --model is a one-line error before anything runs
    with job_context("train-rm", cfg) as ctx:
        source = resolve_model_source(cfg.model)
        ctx.fingerprint_model("model", source)
        if cfg.pairs == "sampled":
            ctx.fingerprint_reward("scorer", cfg.scorer, parse_key_values(cfg.scorer_options,
                                                                          "--scorer-options"))
        with ctx.timer("load_model"):
            base, tokenizer = load_model_and_tokenizer(source, cfg.dtype)
        train_file, eval_file = ctx.run_dir / TRAIN_PAIRS, ctx.run_dir / EVAL_PAIRS
        stats: dict = {}
        if ctx.resume and train_file.is_file() and eval_file.is_file():
            train_pairs, eval_pairs = load_pairs(train_file), load_pairs(eval_file)
        elif cfg.pairs == "sampled":
            train_pairs, eval_pairs, stats = _sampled_pairs(cfg, ctx, base, tokenizer)
        elif cfg.pairs == "hh-rlhf":
            train_pairs, eval_pairs, stats = _hh_rlhf_pairs(cfg)
        else:
            train_pairs, eval_pairs = load_pairs(cfg.pairs_file), load_pairs(cfg.eval_pairs_file)
        if cfg.max_pairs:
            train_pairs, eval_pairs = train_pairs[:cfg.max_pairs], eval_pairs[:max(cfg.max_pairs // 4, 1)]
        if not train_pairs or not eval_pairs:
            raise JobInputError(f"{len(train_pairs)} training and {len(eval_pairs)} held-out pairs: both "
                                "must be non-empty; use more prompts or a scorer with fewer ties")
        if is_main_process():
            save_pairs(train_file, train_pairs)
            save_pairs(eval_file, eval_pairs)
        ctx.add_data("train_pairs", path=train_file, count=len(train_pairs))
        ctx.add_data("eval_pairs", path=eval_file, count=len(eval_pairs))
        if stats:
            ctx.record.set_extra("pair_stats", stats)

        (train_arr, eval_arr), cut = encode_preference_splits(tokenizer, [train_pairs, eval_pairs],
                                                              cfg.max_length)
        model = build_head_model("reward", base, cfg.seed, cfg.pooling)
        ckpt = ctx.checkpointer(keep_last=2)
        with ctx.timer("prepare"):
            trainer = RewardModelTrainer(train_config(cfg), model, train_arr, eval_arr, checkpointer=ckpt,
                                         log=lambda step, **m: log(step, **m), mesh=ctx.mesh(cfg))

        def log(step, **metrics):
            ctx.log(step, **metrics)
            ctx.stop_if_preempted(trainer.save, step)  # SIGTERM: checkpoint this step and stop

        if ctx.resume and ckpt.latest_step() is not None:
            trainer.restore()
        before = trainer.evaluate()
        with ctx.timer("train"):
            trainer.train(eval_every=cfg.eval_every,
                          progress=lambda it: ctx.progress(it, desc="train-rm", unit="step"))
        held_out_scores = trainer.pair_scores(eval_arr)  # once: both read-outs below use them
        after = trainer.evaluate(eval_arr, held_out_scores)
        on_train = trainer.evaluate(_training_sample(train_arr, TRAIN_EVAL_PAIRS, cfg.seed))
        clear = _accuracy_on_clear_pairs(held_out_scores, eval_arr.gap)
        if is_main_process():
            write_spec(ctx.run_dir, kind="reward", base=source, finetune=trainer.finetune,
                       step=trainer.step, max_length=cfg.max_length, scorer=cfg.scorer, pairs=cfg.pairs,
                       pooling=cfg.pooling)
        ctx.fingerprint_output("train_pairs", TRAIN_PAIRS)
        ctx.fingerprint_output("eval_pairs", EVAL_PAIRS)
        return {
            "train_pairs": len(train_pairs), "eval_pairs": len(eval_pairs),
            "truncated_rows": int(cut),
            "eval_pairwise_accuracy_before": before["pairwise_accuracy"],
            "eval_pairwise_accuracy": after["pairwise_accuracy"],
            "eval_loss": after["loss"],
            "eval_pairwise_accuracy_top_half_gap": clear,
            "train_pairwise_accuracy": on_train["pairwise_accuracy"],
            "train_loss": on_train["loss"],
            "train_eval_pairs": on_train["pairs"],
            "steps": trainer.step,
            "sequence_tokens": int(train_arr.chosen_ids.shape[1]),
            "mean_scorer_gap": float(np.mean(train_arr.gap)),
        }



def _training_sample(data, limit: int, seed: int):
    """At most `limit` training pairs, drawn without replacement: how well the training pairs are
    fitted, without rerunning the backbone over tens of thousands of rows in modes lora and full."""
    import numpy as np

    if data.size <= limit:
        return data
    return data.take(np.sort(np.random.default_rng([seed, 1]).choice(data.size, limit, replace=False)))


def _accuracy_on_clear_pairs(scores, gap) -> float:
    """Held-out accuracy on the half of the pairs the scorer separates most (largest gaps)."""
    import numpy as np

    rc, rr = scores
    gap = np.asarray(gap)
    keep = gap >= np.median(gap)
    right = np.where(rc > rr, 1.0, np.where(rc == rr, 0.5, 0.0))
    return float(right[keep].mean())


# Nothing may change on --resume (resume_safe empty): the learning-rate schedule decays over
# --steps, so even more steps would make the continued run differ from any uninterrupted one.
JOB = JobSpec(config=TrainRMConfig, run=run, reproduce_ignore=("*per_s", "*seconds"), resumable=True)
