"""``iapo eval``: inference-time win rates W^T(pi > pi_ref) and the KL of a policy (algorithms.md §1).

The reference side is a saved reference pool (``iapo calibrate``): its m scored pi_ref samples per
prompt. The policy is sampled on the pool's prompts with the pool's sampling settings, scored with
the pool's reward, and compared under plain sampling and under best-of-N / worst-of-N for several N
(unbiased estimates over N-subsets of each side's samples, with bootstrap intervals over prompts). KL(pi || pi_ref) is the k1 estimate
from the policy's samples with log-probs under the reference model (the pool's model by default).

    iapo eval --pool runs/calibrate-.../pool --policy runs/ctrl-.../policy --ns 1 4 16
    iapo eval --pool runs/calibrate-... --policy runs/ctrl-a --baseline runs/ctrl-b

With --baseline, a second policy is sampled on the same prompts with the same settings and both
are compared: each against the pool, their difference with paired bootstrap intervals (prompts
resampled jointly), and head to head, W^T(policy > baseline).

Writes win_rates.md (the table), win_rates.json and the policy's samples.jsonl (and the
baseline's baseline_samples.jsonl).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Literal

import numpy as np

from iapo_jax.errors import IapoError
from iapo_jax.commands import JobSpec
from iapo_jax.commands.common import job_context
from iapo_jax.commands.job_inputs import (
    JobInputError,
    build_reward,
    check_same_vocabulary,
    check_sampling,
    load_model_and_tokenizer,
    parse_key_values,
    record_reward,
    resolve_model_source,
    reward_spec,
    same_reward,
    spec_meta,
)
from iapo_jax.commands.job_outputs import SAMPLES_FILE, write_jsonl, write_text
from iapo_jax.commands.prompt_batches import PromptPlan, decoding_mesh, prompt_bucket, run_batches

TABLE_FILE = "win_rates.md"
JSON_FILE = "win_rates.json"
BASELINE_SAMPLES = "baseline_samples.jsonl"
EVAL_STREAM = 0x6576616C  # "eval": folded into the seed
BASELINE_STREAM = 0x62617365  # "base": the baseline policy's samples, independent of the policy's


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Inference-time win rates (sampling, best-of-N, worst-of-N) and KL of a policy vs pi_ref."""

    pool: Path
    """Reference pool: the pool/ folder of an `iapo calibrate` run (or that run directory)."""
    policy: str = "smollm2-135m-instruct"
    """Policy to evaluate: an HF checkpoint directory, a .gguf file, 'smollm2-135m-instruct', or a
    training run directory with an exported policy in policy/."""
    baseline: str | None = None
    """A second policy to compare with --policy (e.g. another ctrl run directory): paired
    intervals of the difference of their win rates, and their head-to-head win rate."""
    reference: str | None = None
    """Reference model for the KL estimate (default: the model that sampled the pool)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute and storage dtype of the weights."""
    samples: int = 16
    """Policy samples per prompt."""
    num_prompts: int | None = None
    """Evaluate on the first k prompts of the pool (default: all)."""
    procedures: tuple[Literal["sampling", "bon", "won", "soft_bon"], ...] = ("sampling", "bon", "won")
    """Inference-time procedures T: plain sampling, best-of-N, worst-of-N, soft best-of-N (--lam)."""
    lam: float | None = None
    """soft_bon's selection temperature: response i of N is served with probability
    softmax(C / lam)_i, C the pool calibration of the reward (required with soft_bon only)."""
    ns: tuple[int, ...] = (2, 4, 8, 16)
    """N for best-of-N and worst-of-N (plain sampling is N = 1)."""
    reward: str | None = None
    """Reward spec (default: the pool's; another reward would compare different scores)."""
    reward_options: tuple[str, ...] = ()
    """KEY=VALUE options of a single-term reward (default: the pool's)."""
    max_new_tokens: int | None = None
    """Response length limit (default: the pool's, so both sides are sampled alike)."""
    temperature: float | None = None
    """Sampling temperature (default: the pool's)."""
    top_k: int | None = None
    """Top-k filter (default: the pool's)."""
    top_p: float | None = None
    """Top-p filter (default: the pool's)."""
    bootstrap: int = 1000
    """Bootstrap resamples (over prompts) for the confidence intervals."""
    confidence: float = 0.95
    """Confidence level of the intervals."""
    seed: int = 0
    """Sampling and bootstrap seed."""
    batch_prompts: int = 8
    """Prompts per compiled decoding call (each with all samples)."""
    data: int = -1
    """Devices of this process the decoding rows are split over (-1: all)."""


def pool_directory(path: Path) -> Path:
    """The pool folder itself, or the pool/ folder of a calibrate run directory."""
    path = Path(path)
    if not (path / "pool.json").is_file() and (path / "pool" / "pool.json").is_file():
        return path / "pool"
    if not (path / "pool.json").is_file():
        raise JobInputError(f"{path} holds no reference pool (pool.json); pass the pool/ folder of an "
                            "`iapo calibrate` run")
    return path


def reward_of(cfg: EvalConfig, meta: dict):
    """The reward spec: the pool's, or the config's when given (then it must be the pool's)."""

    if meta.get("reward") is None and cfg.reward is None:
        raise JobInputError("the pool does not name its reward; pass --reward NAME")
    pool = None if meta.get("reward") is None else reward_spec(
        meta["reward"], dict(meta.get("reward_options") or {}), flag="the pool's reward")
    if cfg.reward is None and not cfg.reward_options:
        return pool
    options = parse_key_values(cfg.reward_options, "--reward-options") if cfg.reward_options \
        else dict(meta.get("reward_options") or {})
    given = reward_spec(cfg.reward or meta["reward"], options)
    if pool is not None and not same_reward(given, pool):
        raise JobInputError(f"--reward {str(given)!r} differs from the pool's reward {str(pool)!r}; "
                            "win rates need both sides scored by the same reward (build a pool "
                            "with `iapo calibrate --reward ...`)")
    return given


def settings(cfg: EvalConfig, meta: dict) -> dict:
    """Sampling settings and reward: the config's where given, else the pool's."""

    def pick(name, default):
        value = getattr(cfg, name)
        return value if value is not None else meta.get(name, default)

    return {**spec_meta(reward_of(cfg, meta)),
            "max_new_tokens": int(pick("max_new_tokens", 64)),
            "temperature": float(pick("temperature", 1.0)), "top_k": int(pick("top_k", 0)),
            "top_p": float(pick("top_p", 1.0))}


def check_subset_sizes(cfg: EvalConfig, pool_size: int) -> None:
    """The unbiased best/worst-of-N estimate needs N samples on each side: checked before sampling."""
    if not any(p != "sampling" for p in cfg.procedures) or not cfg.ns:
        return
    top = max(cfg.ns)
    if top > cfg.samples:
        raise JobInputError(f"--ns {top} exceeds --samples {cfg.samples}: best/worst-of-N needs at least N "
                            f"policy samples per prompt; raise --samples to {top} or lower --ns")
    if top > pool_size:
        raise JobInputError(f"--ns {top} exceeds the pool's {pool_size} samples per prompt; lower --ns or "
                            "calibrate a larger pool (iapo calibrate --pool-size)")


def check_config(cfg: EvalConfig) -> None:
    check_sampling(cfg)
    if not cfg.procedures:
        raise JobInputError("--procedures is empty; choose from sampling, bon, won")
    if any(n < 1 for n in cfg.ns):
        raise JobInputError(f"--ns must hold positive integers, got {list(cfg.ns)}")
    if "soft_bon" in cfg.procedures:
        from iapo_jax.evaluation.win_rates import check_lam

        try:
            check_lam(cfg.lam)
        except ValueError as err:
            raise JobInputError(f"--procedures soft_bon: {err} (--lam)") from None
    elif cfg.lam is not None:
        raise JobInputError("--lam is soft_bon's selection temperature; add soft_bon to --procedures "
                            "or drop --lam")
    if any(p != "sampling" for p in cfg.procedures) and not cfg.ns:
        raise JobInputError("--ns is empty; give N values for bon/won, e.g. --ns 2 4 8")
    if not 0 < cfg.confidence < 1:
        raise JobInputError(f"--confidence must be in (0, 1), got {cfg.confidence}")
    if cfg.num_prompts is not None and cfg.num_prompts < 1:
        raise JobInputError(f"--num-prompts must be at least 1, got {cfg.num_prompts}")


def win_rate_rows(policy_scores, reference_scores, cfg: EvalConfig) -> list:
    """WinRate per (procedure, N): sampling once, bon/won/soft_bon at every N of cfg.ns."""
    from iapo_jax.evaluation import bootstrap_win_rate
    from iapo_jax.evaluation.win_rates import pool_calibration

    rows = []
    for procedure in cfg.procedures:
        soft = procedure == "soft_bon"  # selects on the calibration against the pool's samples
        selection = (pool_calibration(policy_scores, reference_scores),
                     pool_calibration(reference_scores, reference_scores)) if soft else None
        for n in ((1,) if procedure == "sampling" else tuple(dict.fromkeys(cfg.ns))):
            rows.append(bootstrap_win_rate(policy_scores, reference_scores, procedure, n,
                                           num_resamples=cfg.bootstrap, confidence=cfg.confidence,
                                           seed=cfg.seed, lam=cfg.lam if soft else None,
                                           selection=selection))
    return rows


def markdown_table(rows, *, title: str, notes: list[str], confidence: float) -> str:
    label = {"sampling": "sampling", "bon": "best-of-N", "won": "worst-of-N",
             "soft_bon": "soft best-of-N"}
    pct = f"{confidence:.0%}"
    lines = [f"# {title}", "", *notes, "",
             f"| procedure | N | win rate vs reference | {pct} interval | prompts |",
             "|---|---:|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {label[r.procedure]} | {r.n} | {r.win_rate:.4f} | "
                     f"[{r.ci_low:.4f}, {r.ci_high:.4f}] | {r.num_prompts} |")
    return "\n".join(lines) + "\n"


def _resolve_reference(cfg: EvalConfig, meta: dict) -> str:
    ref_source = cfg.reference or meta.get("model")
    if ref_source is None:
        raise JobInputError("the pool does not name its model; pass --reference MODEL")
    try:
        return resolve_model_source(ref_source)
    except IapoError as err:
        if cfg.reference is not None:
            raise
        raise JobInputError(f"the pool's model {ref_source!r} cannot be loaded from here ({err}); "
                            "pass --reference MODEL") from None


def _same_source(a: str, b: str) -> bool:
    return a == b or Path(a).resolve() == Path(b).resolve()


def run(cfg: EvalConfig) -> dict:
    import jax

    from iapo_jax.decoding.engine import decode_texts, sample
    from iapo_jax.evaluation.kl import sample_kl
    from iapo_jax.evaluation.paired import paired_rows, paired_table
    from iapo_jax.rewards.calibration import ReferencePool
    from iapo_jax.rewards.spec import RewardSpecError, check_fits
    from iapo_jax.runtime.jsonable import to_jsonable

    check_config(cfg)
    with job_context("eval", cfg) as ctx:
        pool_dir = pool_directory(cfg.pool)
        pool = ReferencePool.load(pool_dir)
        ctx.add_data("reference_pool", path=pool_dir)
        spec = reward_of(cfg, pool.meta)
        s = settings(cfg, pool.meta)
        check_subset_sizes(cfg, pool.num_samples)
        policy_source = resolve_model_source(cfg.policy)
        baseline_source = resolve_model_source(cfg.baseline) if cfg.baseline else None
        ref_source = _resolve_reference(cfg, pool.meta)
        try:
            check_fits(spec, policy_source)
        except RewardSpecError as err:
            raise JobInputError(str(err)) from None
        reward = build_reward(spec)
        ctx.fingerprint_model("policy", policy_source)
        if baseline_source is not None:
            ctx.fingerprint_model("baseline", baseline_source)
        if ref_source != policy_source:
            ctx.fingerprint_model("reference", ref_source)
        record_reward(ctx, "reward", spec)
        prompts = list(pool.prompts[:cfg.num_prompts])
        reference_scores = pool.scores[:len(prompts)]

        with ctx.timer("load_model"):
            model, tokenizer = load_model_and_tokenizer(policy_source, cfg.dtype)
            ref_model = model if _same_source(ref_source, policy_source) else \
                load_model_and_tokenizer(ref_source, cfg.dtype)[0]
            check_same_vocabulary(model, ref_model, "reference model")
            baseline = None
            if baseline_source is not None:
                baseline = ref_model if _same_source(baseline_source, ref_source) else \
                    load_model_and_tokenizer(baseline_source, cfg.dtype)[0]
                check_same_vocabulary(model, baseline, "baseline policy")
        mesh = decoding_mesh(cfg.data)
        if mesh is not None:
            ctx.set_mesh(mesh)
        # A stream of its own: with the pool's seed, the policy would otherwise reuse the very
        # uniforms that drew the reference samples, and the two sides would not be independent.
        key = jax.random.fold_in(ctx.key(cfg.seed), EVAL_STREAM)
        bucket = prompt_bucket(tokenizer, prompts)
        n = cfg.samples
        rows = len(prompts) * n
        plan = PromptPlan.make(len(prompts), cfg.batch_prompts)
        # The k1 estimate is unbiased only for samples drawn from pi itself (no filters, T = 1).
        unfiltered = s["temperature"] == 1.0 and s["top_k"] == 0 and s["top_p"] == 1.0

        def draw(which, stream_key, desc: str) -> dict:
            """Samples of one policy on the pool's prompts: texts, scores [P, n], KL and timing."""
            def sample_batch(batch: list[str], batch_id: int) -> dict:
                out = sample(which, batch, max_new_tokens=s["max_new_tokens"], n=n,
                             key=jax.random.fold_in(stream_key, batch_id), temperature=s["temperature"],
                             top_k=s["top_k"], top_p=s["top_p"], tokenizer=tokenizer,
                             ref_model=ref_model, mesh=mesh, prompt_buckets=(bucket,))
                b = len(batch)
                return {"tokens": np.asarray(out.tokens).reshape(b, n, -1),
                        "lengths": np.asarray(out.lengths).reshape(b, n),
                        "logprobs": np.asarray(out.logprobs).reshape(b, n, -1),
                        "ref_logprobs": np.asarray(out.ref_logprobs).reshape(b, n, -1)}

            start = time.perf_counter()
            with ctx.timer("sampling"):
                out = run_batches(prompts, plan, sample_batch,
                                  progress=lambda it: ctx.progress(it, desc=desc, unit="batch"))
            seconds = time.perf_counter() - start
            lengths = out["lengths"].reshape(rows)
            texts = decode_texts(tokenizer, out["tokens"].reshape(rows, -1), lengths)
            with ctx.timer("scoring"):
                scores = np.asarray(reward.score([p for p in prompts for _ in range(n)], list(texts)),
                                    np.float64)
            mask = np.arange(out["logprobs"].shape[-1])[None, :] < lengths[:, None]
            logp = out["logprobs"].reshape(rows, -1)
            ref_logp = out["ref_logprobs"].reshape(rows, -1)
            kl, kl_se = (sample_kl(logp, ref_logp, mask, samples_per_prompt=n) if unfiltered
                         else (math.nan, math.nan))  # SE clustered by prompt
            return {"texts": texts, "lengths": lengths, "scores": scores, "kl": kl, "kl_se": kl_se,
                    "seq_logp": (logp * mask).sum(-1), "seq_ref": (ref_logp * mask).sum(-1),
                    "seconds": seconds}

        main = draw(model, key, "eval: sampling")
        policy_scores = main["scores"].reshape(len(prompts), n)
        kl, kl_se = main["kl"], main["kl_se"]
        other = None
        if baseline is not None:  # its own stream, so the two policies' samples are independent
            other = draw(baseline, jax.random.fold_in(key, BASELINE_STREAM), "eval: baseline")

        results = win_rate_rows(policy_scores, reference_scores, cfg)
        kl_note = (f"- KL(policy || reference) = {kl:.4f} ± {kl_se:.4f} nats per response (k1)"
                   if unfiltered else "- KL not estimated: samples were filtered (temperature, "
                                      "top-k or top-p), so they are not draws from the policy")
        notes = [(f"- policy: `{cfg.policy}`; reference samples: pool `{pool_dir}` "
                  f"({pool.num_samples} per prompt, reward `{spec}`)"),
                 (f"- {n} policy samples per prompt, {len(prompts)} prompts, up to "
                  f"{s['max_new_tokens']} new tokens, temperature {s['temperature']:g}; ties count 1/2"),
                 (f"- mean reward: policy {policy_scores.mean():.4f}, reference "
                  f"{reference_scores.mean():.4f}"),
                 kl_note]
        table = markdown_table(results, title="Inference-time win rates", notes=notes,
                               confidence=cfg.confidence)
        paired = []
        if other is not None:
            baseline_scores = other["scores"].reshape(len(prompts), n)
            paired = paired_rows(policy_scores, baseline_scores, reference_scores, cfg.procedures,
                                 cfg.ns, num_resamples=cfg.bootstrap, confidence=cfg.confidence,
                                 seed=cfg.seed, lam=cfg.lam)
            table += (f"\n## Policy against baseline `{cfg.baseline}`\n\n"
                      f"- mean reward: baseline {baseline_scores.mean():.4f}; KL(baseline || reference) "
                      f"= {other['kl']:.4f} ± {other['kl_se']:.4f}\n"
                      "- difference: W(policy) - W(baseline) against the pool, prompts resampled "
                      "jointly; W(policy > baseline): the two policies' own samples head to head\n\n"
                      + paired_table(paired, cfg.confidence))
        write_text(ctx.run_dir / TABLE_FILE, table)
        write_text(ctx.run_dir / JSON_FILE, json.dumps(
            to_jsonable({"settings": s, "kl": kl, "kl_se": kl_se,
                         "win_rates": [r.as_dict() for r in results],
                         **({"baseline": {"kl": other["kl"], "kl_se": other["kl_se"], "paired": paired}}
                            if other is not None else {})}), indent=1))

        def sample_rows(d: dict):
            return ({"prompt_index": i // n, "prompt": prompts[i // n], "sample": i % n,
                     "response": d["texts"][i], "num_tokens": int(d["lengths"][i]),
                     "reward": float(d["scores"][i]), "logprob": float(d["seq_logp"][i]),
                     "ref_logprob": float(d["seq_ref"][i])} for i in range(rows))

        write_jsonl(ctx.run_dir / SAMPLES_FILE, sample_rows(main))
        outputs = [("samples", SAMPLES_FILE), ("win_rates", JSON_FILE)]
        if other is not None:
            write_jsonl(ctx.run_dir / BASELINE_SAMPLES, sample_rows(other))
            outputs.append(("baseline_samples", BASELINE_SAMPLES))
        for name, file in outputs:
            ctx.fingerprint_output(name, file)
        if ctx.is_main:
            print(table)

        seconds = main["seconds"] + (other["seconds"] if other is not None else 0.0)
        tokens = main["lengths"].sum() + (other["lengths"].sum() if other is not None else 0)
        metrics: dict = {"prompts": len(prompts), "samples_per_prompt": n,
                         "mean_reward": float(policy_scores.mean()),
                         "reference_mean_reward": float(reference_scores.mean()),
                         "kl": kl, "kl_se": kl_se,
                         "tokens_per_s": float(tokens / max(seconds, 1e-9))}
        for r in results:
            name = "sampling" if r.procedure == "sampling" else f"{r.procedure}_{r.n}"
            metrics[f"win_rate.{name}"] = r.win_rate
            metrics[f"ci_low.{name}"] = r.ci_low
            metrics[f"ci_high.{name}"] = r.ci_high
        if other is not None:
            metrics.update({"baseline.mean_reward": float(other["scores"].mean()),
                            "baseline.kl": other["kl"], "baseline.kl_se": other["kl_se"]})
            for r in paired:
                name = "sampling" if r["procedure"] == "sampling" else f"{r['procedure']}_{r['n']}"
                for key_ in ("baseline", "difference", "difference_ci_low", "difference_ci_high",
                             "head_to_head", "head_to_head_ci_low", "head_to_head_ci_high"):
                    metrics[f"{key_}.{name}" if key_ != "baseline" else f"baseline.win_rate.{name}"] = r[key_]
        return metrics


JOB = JobSpec(config=EvalConfig, run=run, reproduce_ignore=("*per_s",))
