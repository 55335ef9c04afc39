"""``iapo generate``: sample responses with plain sampling, best-of-N, worst-of-N, blockwise or
token-level controlled decoding, and write them to ``samples.jsonl`` in the run directory.

    iapo generate --prompts-file prompts.txt --n 4
    iapo generate --mode bon --n 8 --reward vader
    iapo generate --mode blockwise --n 4 --block-size 8 --scorer runs/train-scorer-...   (or a reward)
    iapo generate --mode token-cd --scorer runs/train-scorer-... --lam 2 --cd-top-k 10
    iapo generate --mode pruned-bon --n 16 --prune 8:4 --reward vader --scorer runs/train-scorer-...
    iapo generate --mode blockwise --scorer 0.7*runs/train-scorer-...+0.3*vader   (multi-objective)
    iapo generate --model runs/ctrl-...                (the policy a ctrl run trained)

Each line of samples.jsonl is one served response: prompt_index, prompt, sample, response,
num_tokens, and the reward (when --reward is given) or the decoding method's own scores.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Literal

import numpy as np

from iapo_jax.commands import JobSpec
from iapo_jax.commands.common import job_context
from iapo_jax.commands.configs import PromptFlags
from iapo_jax.commands.job_inputs import (
    JobInputError,
    build_reward,
    check_sampling,
    load_model_and_tokenizer,
    load_job_prompts,
    record_reward,
    resolve_model_source,
    reward_spec,
)
from iapo_jax.commands.job_outputs import SAMPLES_FILE, write_jsonl
from iapo_jax.commands.prompt_batches import PromptPlan, decoding_mesh, prompt_bucket, run_batches

MODES = ("plain", "bon", "won", "soft-bon", "pruned-bon", "blockwise", "token-cd")


@dataclasses.dataclass(frozen=True)
class GenerateConfig(PromptFlags):
    """Sample responses: plain, best-of-N, worst-of-N, blockwise or token-level controlled decoding."""

    model: str = "smollm2-135m-instruct"
    """Model source: an HF checkpoint directory, a .gguf file, 'smollm2-135m-instruct', or a
    training run directory with an exported policy in policy/."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute and storage dtype of the weights."""
    prompt_split: Literal["train", "eval", "all"] = "eval"
    """Split of the packaged chat questions (when no --prompts-file)."""
    mode: Literal["plain", "bon", "won", "soft-bon", "pruned-bon", "blockwise", "token-cd"] = "plain"
    """plain sampling; bon/won: best/worst of --n by --reward; soft-bon: of --n, response i with
    probability softmax(reward / --lam)_i; pruned-bon: best of --n by --reward, branches pruned
    early by --prune on --scorer (default: the reward on the partial text); blockwise: K = --n candidate blocks
    of --block-size tokens ranked by --scorer; token-cd: tilt the top --cd-top-k tokens by
    exp(--lam * value) of a trained --scorer."""
    n: int = 1
    """Samples per prompt (plain), N (bon, won) or K candidates per block (blockwise)."""
    max_new_tokens: int = 64
    """Response length limit in tokens."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_k: int = 0
    """Keep the k most likely tokens (0: all). Not used by token-cd (see --cd-top-k)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1: all). Not used by token-cd."""
    seed: int = 0
    """Sampling seed."""
    reward: str | None = None
    """Reward spec (a packaged scorer such as vader or length:target=20, an `iapo train-rm` or
    `iapo train-scorer` run directory, or a weighted sum 0.7*vader+0.3*RUN): selects the response
    in bon/won and scores the served responses in every mode."""
    reward_options: tuple[str, ...] = ()
    """KEY=VALUE options of a single-term reward, e.g. target=20 for length."""
    scorer: str | None = None
    """Scorer spec for blockwise/token-cd: an `iapo train-scorer` run directory (a prefix scorer,
    run on the policy's tokens), or for blockwise any reward spec (text terms score the partial
    text), e.g. 0.7*runs/scorer+0.3*vader."""
    block_size: int = 8
    """Blockwise CD: tokens per block (M)."""
    lam: float = 1.0
    """Token-level CD: tilt strength lambda (0: plain top-k sampling); soft-bon: the selection
    temperature, in the reward's units (> 0)."""
    cd_top_k: int = 10
    """Token-level CD: candidate tokens per step."""
    prune: str = "none"
    """pruned-bon: TOKENS:KEEP checkpoints, e.g. 8:8,16:4 keeps the 8 best of --n branches by
    --scorer after 8 tokens and the 4 best of those after 16."""
    batch_prompts: int = 8
    """Prompts per compiled decoding call."""
    data: int = -1
    """Devices of this process the decoding rows are split over (-1: all)."""


def check_config(cfg: GenerateConfig) -> None:
    """Reject what cannot work before loading anything."""
    from iapo_jax.rewards.spec import RewardSpecError, check_on_tokens

    check_sampling(cfg)
    if cfg.mode == "soft-bon":
        from iapo_jax.decoding.best_of_n import check_lam

        try:
            check_lam(cfg.lam, worst=False)
        except ValueError as err:
            raise JobInputError(f"--mode soft-bon: {err} (--lam)") from None
    if cfg.mode == "pruned-bon":
        from iapo_jax.decoding.pruned_best_of_n import PruneSchedule

        try:
            PruneSchedule.parse(cfg.prune).check(cfg.n, cfg.max_new_tokens)
        except ValueError as err:
            raise JobInputError(f"--prune: {err}") from None
    elif cfg.prune != "none":
        raise JobInputError(f"--prune is used by --mode pruned-bon, not {cfg.mode}; drop it or change --mode")
    if cfg.mode in ("bon", "won", "soft-bon", "pruned-bon") and not cfg.reward:
        raise JobInputError(f"--mode {cfg.mode} ranks the {cfg.n} samples by a reward; pass --reward "
                            "NAME (e.g. --reward vader)")
    if cfg.mode in ("blockwise", "token-cd") and not cfg.scorer:
        raise JobInputError(f"--mode {cfg.mode} needs --scorer: the run directory of "
                            "`iapo train-scorer`" + (" or a reward name" if cfg.mode == "blockwise" else ""))
    if cfg.mode == "token-cd":
        try:
            check_on_tokens(reward_spec(cfg.scorer, flag="--scorer"), "token-level CD (--scorer)")
        except RewardSpecError as err:
            raise JobInputError(str(err)) from None
        if cfg.top_k or cfg.top_p < 1:
            raise JobInputError("--mode token-cd draws from its own top --cd-top-k tokens; leave "
                                "--top-k and --top-p at their defaults")
    if cfg.scorer and cfg.mode in ("plain", "bon", "won", "soft-bon"):
        raise JobInputError(f"--scorer is used by --mode blockwise, token-cd and pruned-bon, not {cfg.mode}; "
                            "drop it or change --mode")
    if cfg.reward_options and not cfg.reward:
        raise JobInputError("--reward-options given without --reward")
    if cfg.reward:
        reward_spec(cfg.reward, cfg.reward_options)
    if cfg.scorer:
        reward_spec(cfg.scorer, flag="--scorer")


def _scorer(spec, model):
    """The (scorer, weight) pairs of a --scorer spec, or the one scorer when it is a single term."""
    from iapo_jax.rewards.spec import build_scorers

    pairs = build_scorers(spec, model)
    return pairs[0][0] if len(pairs) == 1 and pairs[0][1] == 1.0 else pairs


def _batch_sampler(cfg: GenerateConfig, model, tokenizer, reward, scorer, key, mesh, bucket):
    """The function that samples one batch of prompts for cfg.mode -> per-prompt arrays."""
    import jax

    from iapo_jax.decoding.best_of_n import best_of_n
    from iapo_jax.decoding.blockwise import blockwise_cd
    from iapo_jax.decoding.pruned_best_of_n import pruned_best_of_n
    from iapo_jax.decoding.engine import sample
    from iapo_jax.decoding.token_cd import token_cd

    common = {"max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
              "tokenizer": tokenizer, "mesh": mesh, "prompt_buckets": (bucket,)}
    filters = {"top_k": cfg.top_k, "top_p": cfg.top_p}

    def run(prompts: list[str], batch_id: int) -> dict:
        k = jax.random.fold_in(key, batch_id)
        if cfg.mode == "plain":
            out = sample(model, prompts, n=cfg.n, key=k, **filters, **common)
            b = len(prompts)
            return {"tokens": np.asarray(out.tokens).reshape(b, cfg.n, -1),
                    "lengths": np.asarray(out.lengths).reshape(b, cfg.n)}
        if cfg.mode in ("bon", "won", "soft-bon"):
            out = best_of_n(model, prompts, reward, n=cfg.n, worst=cfg.mode == "won", key=k,
                            lam=cfg.lam if cfg.mode == "soft-bon" else None, **filters, **common)
            return {"tokens": np.asarray(out.best_tokens)[:, None],
                    "lengths": np.asarray(out.best_lengths)[:, None],
                    "candidate_scores": np.asarray(out.scores), "chosen": np.asarray(out.chosen)}
        if cfg.mode == "pruned-bon":
            out = pruned_best_of_n(model, prompts, reward, scorer if scorer is not None else reward,
                                   n=cfg.n, schedule=cfg.prune, key=k, **filters, **common)
            return {"tokens": np.asarray(out.best_tokens)[:, None],
                    "lengths": np.asarray(out.best_lengths)[:, None],
                    "candidate_scores": np.asarray(out.scores), "chosen": np.asarray(out.chosen),
                    "branch": np.asarray(out.branch),
                    "generated_tokens": np.asarray(out.generated_tokens)}
        if cfg.mode == "blockwise":
            out = blockwise_cd(model, prompts, scorer, k=cfg.n, block_size=cfg.block_size, key=k,
                               **filters, **common)
            return {"tokens": np.asarray(out.tokens)[:, None], "lengths": np.asarray(out.lengths)[:, None],
                    "scorer_value": np.asarray(out.scores), "kl_bound": np.asarray(out.kl_bound)}
        out = token_cd(model, prompts, scorer, lam=cfg.lam, k=cfg.cd_top_k, key=k, **common)
        return {"tokens": np.asarray(out.tokens)[:, None], "lengths": np.asarray(out.lengths)[:, None]}

    return run


def run(cfg: GenerateConfig) -> dict:
    from iapo_jax.decoding.kl_bounds import best_of_k_kl_bound
    from iapo_jax.decoding.engine import decode_texts

    check_config(cfg)
    with job_context("generate", cfg) as ctx:
        source = resolve_model_source(cfg.model)
        prompts = load_job_prompts(cfg)
        reward_of = reward_spec(cfg.reward, cfg.reward_options, policy=source) if cfg.reward else None
        scorer_of = reward_spec(cfg.scorer, flag="--scorer", policy=source) if cfg.scorer else None
        reward = build_reward(reward_of) if reward_of is not None else None
        ctx.add_data("prompts", prompts, count=len(prompts))
        ctx.fingerprint_model("model", source)
        if reward_of is not None:
            record_reward(ctx, "reward", reward_of)
        if scorer_of is not None:
            record_reward(ctx, "scorer", scorer_of)
        with ctx.timer("load_model"):
            model, tokenizer = load_model_and_tokenizer(source, cfg.dtype)
            scorer = _scorer(scorer_of, model) if scorer_of is not None else None
        mesh = decoding_mesh(cfg.data)
        if mesh is not None:
            ctx.set_mesh(mesh)
        plan = PromptPlan.make(len(prompts), cfg.batch_prompts)
        sampler = _batch_sampler(cfg, model, tokenizer, reward, scorer, ctx.key(cfg.seed), mesh,
                                 prompt_bucket(tokenizer, prompts))
        start = time.perf_counter()
        with ctx.timer("sampling"):
            out = run_batches(prompts, plan, sampler,
                              progress=lambda it: ctx.progress(it, desc=f"generate ({cfg.mode})",
                                                               unit="batch"))
        seconds = time.perf_counter() - start
        per_prompt = out["tokens"].shape[1]
        flat_tokens = out["tokens"].reshape(len(prompts) * per_prompt, -1)
        flat_lengths = out["lengths"].reshape(-1)
        texts = decode_texts(tokenizer, flat_tokens, flat_lengths)
        prompt_of = [p for p in prompts for _ in range(per_prompt)]
        rewards = None
        if reward is not None:
            with ctx.timer("scoring"):
                rewards = np.asarray(reward.score(prompt_of, list(texts)), np.float64)

        rows = []
        for row, text in enumerate(texts):
            i, j = divmod(row, per_prompt)
            item = {"prompt_index": i, "prompt": prompts[i], "sample": j, "response": text,
                    "num_tokens": int(flat_lengths[row])}
            if rewards is not None:
                item["reward"] = float(rewards[row])
            if "candidate_scores" in out:
                item["candidate_scores"] = out["candidate_scores"][i].tolist()
                item["chosen"] = int(out["chosen"][i])
            if "branch" in out:  # pruned-bon: the survivors' branch indices among the N
                item["surviving_branches"] = out["branch"][i].tolist()
                item["generated_tokens"] = int(out["generated_tokens"][i])
            if "scorer_value" in out:
                item["scorer_value"] = float(out["scorer_value"][i])
                item["kl_bound"] = float(out["kl_bound"][i])
            rows.append(item)
        write_jsonl(ctx.run_dir / SAMPLES_FILE, rows)
        ctx.fingerprint_output("samples", SAMPLES_FILE)

        metrics = {"prompts": len(prompts), "responses": len(texts),
                   "mean_response_tokens": float(flat_lengths.mean()),
                   "tokens_per_s": float(flat_lengths.sum() / max(seconds, 1e-9))}
        if rewards is not None:
            metrics["mean_reward"] = float(rewards.mean())
            metrics["reward_std"] = float(rewards.std())
        if cfg.mode == "pruned-bon":  # the served response is one of N draws, so KL <= log N
            metrics["kl_bound"] = float(math.log(cfg.n))
            metrics["mean_selected_score"] = float(
                np.take_along_axis(out["candidate_scores"], out["chosen"][:, None], 1).mean())
            metrics["generated_tokens"] = int(out["generated_tokens"].sum())
        if cfg.mode in ("bon", "won", "soft-bon"):  # soft: one of N draws, so KL <= log N
            metrics["kl_bound"] = float(math.log(cfg.n) if cfg.mode == "soft-bon" else best_of_k_kl_bound(cfg.n))
            metrics["mean_selected_score"] = float(
                np.take_along_axis(out["candidate_scores"], out["chosen"][:, None], 1).mean())
        if cfg.mode == "blockwise":
            metrics["mean_kl_bound"] = float(out["kl_bound"].mean())
            metrics["mean_scorer_value"] = float(out["scorer_value"].mean())
        return metrics


JOB = JobSpec(config=GenerateConfig, run=run, reproduce_ignore=("*per_s",))
