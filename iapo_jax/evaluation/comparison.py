"""Train CTRL and its baselines from one reference policy and compare them as they are served.

The pipeline behind `iapo compare` and `iapo quickstart`:
1. calibrate: reference pools of the training prompts (for C_hat) and of held-out prompts (the
   reference side of every evaluation), sampled once from pi_ref and scored with the reward;
2. train each method (CTRL with the procedure's transform, calibrated RLHF, raw-reward RLHF, the
   best-of-N distillation target) from pi_ref with the same data, seeds and KL target;
3. evaluate: fresh samples of every policy on the held-out prompts; inference-time win rates
   W^T(pi > pi_ref) for T = sampling, BoN_N and WoN_N (the unbiased N-subset estimator) with
   bootstrap intervals over prompts, and the sample KL with its by-prompt standard error;
4. predict: the analytic tool's win rate of the same transform at the measured KL;
5. report: a markdown table, a JSON file and a plot in the run directory, and each trained policy
   in HF format under policies/<name> (where `iapo generate`, `eval`, `calibrate` and `ctrl` load
   it).
With `betas` or `sweep_kls` set, step 2 trains every method once per sweep point at a fixed beta
and step 5 adds win rate vs KL curves and a matched-KL table (evaluation.kl_sweep).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np

from iapo_jax.alignment.ctrl_config import DEFAULT_REWARD_FLOOR_NATS, CTRLConfig
from iapo_jax.evaluation.judges import judge_scores, judged_row, judged_table, served_win_rate
from iapo_jax.evaluation.paired import differences_table, method_differences
from iapo_jax.evaluation.predicted_win_rate import predicted_win_rate

# method -> (transform for best-of-N deployments, transform for worst-of-N deployments)
METHODS = {
    "ctrl": ("exp", "negexp"),
    "calibrated": ("identity", "identity"),
    "raw": ("raw", "raw"),
    "bon-distill": ("log", "log"),
    "optimal": ("optimal", "optimal"),  # the exact optimum's tilt log f*(u), solved at target_kl
}


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    """CTRL against its baselines at a matched KL target, evaluated under best-/worst-of-N."""

    model: str = "smollm2-135m-instruct"
    """Reference model: HF directory, .gguf file, 'smollm2-135m-instruct', or a ctrl run
    directory (its trained policy)."""
    dtype: str = "float32"
    """Parameter and compute dtype (float32 or bfloat16)."""
    reward: str = "vader"
    """Reward spec: a packaged scorer (vader, textblob, harmlessness, length[:key=value]), an
    `iapo train-rm` or `iapo train-scorer` run directory, or a weighted sum (0.7*vader+0.3*RUN)."""
    judges: tuple[str, ...] = ()
    """Reward specs that only judge, never train: the reference's and every policy's held-out
    samples are rescored with each, with win rates and paired differences per judge. They check a
    learned training reward for over-optimisation (--reward runs/rm1 --judges vader textblob)."""
    procedure: str = "bon"
    """Deployment procedure: bon (best-of-N), won (worst-of-N) or soft_bon (soft best-of-N, --lam)."""
    deploy_n: int = 4
    """N of the deployment procedure (also the N the CTRL transform is tuned for)."""
    lam: float | None = None
    """soft_bon's selection temperature on the calibrated reward (required with soft_bon only)."""
    methods: tuple[str, ...] = ("ctrl", "calibrated")
    """Methods to train: ctrl, calibrated, raw, bon-distill, optimal (the exact optimal transform,
    solved at target_kl, or at each KL of sweep_kls)."""
    train_prompts: int = 16
    """Training prompts (chatterbot-corpus train split)."""
    eval_prompts: int = 16
    """Held-out prompts (eval split) for the win rates."""
    pool_size: int = 16
    """Reference samples per training prompt for calibration (m)."""
    eval_samples: int = 16
    """Samples per held-out prompt for each policy and for the reference."""
    eval_ns: tuple[int, ...] = (1, 2, 4, 8)
    """N values at which BoN/WoN win rates are reported."""
    steps: int = 10
    """RL steps per method."""
    prompts_per_step: int = 8
    samples_per_prompt: int = 4
    max_new_tokens: int = 24
    learning_rate: float = 1e-5
    warmup_steps: int | None = None
    """Linear learning-rate warmup (optimizer updates) of every method; unset = 10% of steps, at
    least 1: the first updates from pi_ref rest on one batch's advantages and on Adam moments of
    a single gradient, and a full-rate first step can move the policy far past the KL target.
    (The schedule starts at rate 0, so the first update only primes Adam's moments.)"""
    beta: float = 0.1
    """Initial KL weight (adapted towards target_kl)."""
    target_kl: float | None = 1.0
    """Per-sequence KL target shared by all methods (matched-KL comparison); None = fixed beta."""
    kl_controller: Literal["proportional", "predictive"] = "proportional"
    """How beta is adapted towards target_kl (see alignment.kl_control): 'proportional' is Ziegler
    et al.'s rule; 'predictive' acts on the smoothed KL extrapolated ahead, keeps beta within 10x
    of its start and the reward floor no higher than the start puts it."""
    kl_controller_gain: float | None = None
    """The controller's gain; unset = 0.5 for proportional, 0.05 for predictive."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """Learning rate after warmup: constant, or a cosine decay to 0 over the steps (the policy
    settles, so the KL it ends at moves less from step to step)."""
    betas: tuple[float, ...] = ()
    """Beta sweep: train every method once per beta, beta held fixed (win rate vs KL curves)."""
    sweep_kls: tuple[float, ...] = ()
    """Beta sweep by KL: each method gets, per value, the beta whose KL-optimal policy has that KL
    for its own transform (the analytic tool), held fixed. Exclusive with betas."""
    t: float | None = None
    """CTRL transform parameter; unset = the analytic tool's best t for (procedure, N, target_kl)."""
    lora_rank: int = 0
    """0 = full fine-tuning; r > 0 = LoRA."""
    reward_floor_nats: float | None = DEFAULT_REWARD_FLOOR_NATS
    """Every calibrated method's reward is floored at max(Phi) - this * beta (None: no floor);
    see CTRLConfig.reward_floor_nats."""
    seed: int = 0
    """Seed of prompt order, sampling and initialisation."""
    save_policies: bool = True
    """Save each trained policy (HF format) under policies/<name> in the run directory."""
    probe_every: int = 0
    """Learning curves: every this many steps (and at the last), evaluate the policy on the held-out
    prompts with probe_samples fresh samples each; the win rate, its KL and the analytic tool's
    prediction at that KL go to the metrics and to learning_curves.md/.png (0 = off)."""
    probe_samples: int = 8
    """Samples per held-out prompt at each probe (at least deploy_n)."""
    pools_from: str | None = None
    """An earlier compare run directory whose calibration and evaluation pools this run reuses
    instead of sampling them (its model, dtype, reward, prompts, pool sizes, max_new_tokens and
    seed must equal this run's): methods added later are then paired with that run's
    (experiments/ctrl/join_runs.py)."""

    def validate(self) -> "CompareConfig":
        if self.procedure not in ("bon", "won", "soft_bon"):
            raise ValueError(f"procedure must be bon or won, or soft_bon with lam (got {self.procedure!r})")
        if self.procedure == "soft_bon" and (self.betas or self.sweep_kls):
            raise ValueError("beta sweeps do not cover soft_bon yet; drop betas / sweep_kls or use bon")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"unknown methods {unknown}; choose from {sorted(METHODS)}")
        if "optimal" in self.methods and (self.betas or not (self.sweep_kls or self.target_kl)):
            raise ValueError("method optimal is solved at a KL: set target_kl, or sweep by KL with "
                             "sweep_kls (not betas), or drop optimal from methods")
        if self.deploy_n < 1 or min(self.eval_ns, default=0) < 1:
            raise ValueError("deploy_n and every eval_ns value must be at least 1")
        for name in ("train_prompts", "eval_prompts", "pool_size", "eval_samples"):
            if getattr(self, name) < 2:
                raise ValueError(f"{name} must be at least 2 (got {getattr(self, name)})")
        if self.eval_samples % self.samples_per_prompt or self.pool_size % self.samples_per_prompt:
            raise ValueError("pool_size and eval_samples must be multiples of samples_per_prompt "
                             "(sampling reuses one compiled program)")
        if self.betas and self.sweep_kls:
            raise ValueError("set either betas or sweep_kls for a beta sweep, not both")
        for name in ("betas", "sweep_kls"):
            bad = [v for v in getattr(self, name) if not v > 0]
            if bad:
                raise ValueError(f"every {name} value must be positive (got {bad[0]}); e.g. 0.25 0.5 1.0")
        top = max(self.eval_ns + (self.deploy_n,))
        if self.eval_samples < top:
            raise ValueError(f"eval_samples ({self.eval_samples}) must be at least the largest N of "
                             f"eval_ns and deploy_n ({top}): the unbiased best-/worst-of-N win rate "
                             "draws N distinct samples per side; raise eval_samples or lower N")
        if self.probe_every < 0:
            raise ValueError(f"probe_every must be >= 0 (0 = no learning curves), got {self.probe_every}")
        if self.probe_every and self.probe_samples < max(2, self.deploy_n):
            raise ValueError(f"probe_samples ({self.probe_samples}) must be at least deploy_n "
                             f"({self.deploy_n}) and 2: the probe's best-/worst-of-N win rate draws "
                             "N distinct samples")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0 (got {self.warmup_steps}); or leave it unset "
                             "for 10% of steps")
        if len(set(self.judges)) != len(self.judges):
            raise ValueError(f"judges must be distinct (got {list(self.judges)})")
        from iapo_jax.rewards.spec import parse_reward_spec

        for judge in self.judges:  # names, options and paths; RewardSpecError is a ValueError
            parse_reward_spec(judge, flag="--judges")
        self.ctrl_config("ctrl" if "ctrl" in self.methods else self.methods[0]).validate()
        return self

    @property
    def resolved_warmup_steps(self) -> int:
        """warmup_steps, or 10% of steps (at least 1) when unset."""
        if self.warmup_steps is not None:
            return int(self.warmup_steps)
        return max(1, round(0.1 * self.steps))

    @property
    def is_sweep(self) -> bool:
        return bool(self.betas or self.sweep_kls)

    @property
    def resolved_kl_controller_gain(self) -> float | None:
        if self.kl_controller_gain is None and self.kl_controller == "proportional":
            return 0.5  # this job's long-standing default (its records rerun with it)
        return self.kl_controller_gain

    def ctrl_config(self, method: str, beta: float | None = None, t: float | None = None,
                    optimal_kl: float | None = None) -> CTRLConfig:
        """The method's trainer settings; a given beta (a sweep point) is held fixed, and the
        optimal transform of a sweep point is solved at that point's KL (optimal_kl)."""
        bon, won = METHODS[method]
        fixed = beta is not None
        return CTRLConfig(
            transform=won if self.procedure == "won" else bon,  # soft_bon: best-of-N's transforms
            t=(t if t is not None else self.t) if method == "ctrl" else None,
            procedure=self.procedure, deploy_n=self.deploy_n, lam=self.lam,
            beta=beta if fixed else self.beta,
            target_kl=None if fixed else self.target_kl, kl_controller=self.kl_controller,
            kl_controller_gain=self.resolved_kl_controller_gain, lr_schedule=self.lr_schedule,
            samples_per_prompt=self.samples_per_prompt, prompts_per_step=self.prompts_per_step,
            steps=self.steps, learning_rate=self.learning_rate,
            warmup_steps=self.resolved_warmup_steps, lora_rank=self.lora_rank,
            max_new_tokens=self.max_new_tokens, seed=self.seed, reward_floor_nats=self.reward_floor_nats,
            optimal_kl=optimal_kl if method == "optimal" else None,
        )


MAX_ROWS_PER_CALL = 128  # rows decoded together: wide matmuls are faster per token on CPU


def samples_per_call(m: int, prompts: int, max_rows: int = MAX_ROWS_PER_CALL) -> int:
    """The largest divisor of m whose calls decode at most max_rows rows (at least 1 sample)."""
    return max(d for d in range(1, m + 1) if m % d == 0 and (d * prompts <= max_rows or d == 1))


def _procedures(cfg: CompareConfig) -> tuple[str, ...]:
    return ("sampling", "bon", "won") + (("soft_bon",) if cfg.procedure == "soft_bon" else ())


def _win_rate(policy_scores, pool_scores, proc: str, n: int, cfg: CompareConfig):
    """served_win_rate; soft_bon selects on the calibration against the evaluation pool."""
    return served_win_rate(policy_scores, pool_scores, proc, n, seed=cfg.seed, lam=cfg.lam)


def _judged_row(judged, judged_ref, policy_scores, pool_scores, cfg: CompareConfig) -> dict:
    deployments = (("sampling", 1), (cfg.procedure, cfg.deploy_n))
    return judged_row(judged, judged_ref, policy_scores, pool_scores, deployments, seed=cfg.seed, lam=cfg.lam)


def evaluate_policy(policy, reference, tokenizer, reward, eval_pool, cfg: CompareConfig, key,
                    samples: int | None = None, judges: dict | None = None) -> dict:
    """Win rates of fresh policy samples (`samples` per prompt, default cfg.eval_samples) against
    the reference pool, and the sample KL. judges: name -> (judge reward, its [P, m] scores of the
    reference's evaluation samples); each rescores the policy's samples (row['judges'])."""
    from iapo_jax.decoding.engine import sample
    from iapo_jax.evaluation.kl import per_prompt_kl, sample_kl

    import jax

    prompts = list(eval_pool.prompts)
    samples = samples or cfg.eval_samples
    per = samples_per_call(samples, len(prompts))
    scores, logp, ref_logp, masks, prompt_ids, texts = [], [], [], [], [], []
    for r in range(samples // per):
        out = sample(policy, prompts, max_new_tokens=cfg.max_new_tokens, n=per,
                     key=jax.random.fold_in(key, r), tokenizer=tokenizer, ref_model=reference)
        rep = [p for p in prompts for _ in range(per)]
        prompt_ids.append(np.repeat(np.arange(len(prompts)), per))  # each call: prompt-major rows
        scores.append(np.asarray(reward.score(rep, list(out.texts)), np.float32).reshape(len(prompts), per))
        texts.append(np.asarray(list(out.texts), dtype=object).reshape(len(prompts), per))
        lengths = np.asarray(out.lengths)
        masks.append(np.arange(out.tokens.shape[1])[None, :] < lengths[:, None])
        logp.append(np.asarray(out.raw_logprobs))
        ref_logp.append(np.asarray(out.ref_logprobs))
    policy_scores = np.concatenate(scores, axis=1)
    # Samples of one prompt share its KL level: the SE clusters by prompt.
    arrays = (np.concatenate(logp), np.concatenate(ref_logp), np.concatenate(masks))
    kl, kl_se = sample_kl(*arrays, prompt_ids=np.concatenate(prompt_ids))
    by_prompt = per_prompt_kl(*arrays, np.concatenate(prompt_ids))
    result = {"kl": kl, "kl_se": kl_se, "mean_reward": float(policy_scores.mean()), "win_rates": {},
              # how evenly the KL budget is spent over prompts, not only its mean
              "kl_by_prompt": {q: float(np.quantile(by_prompt, v)) for q, v in
                               (("p10", 0.1), ("median", 0.5), ("p90", 0.9))},
              "kl_per_prompt": by_prompt.tolist(),  # for paired read-outs at matched KL (sweeps)
              "scores": policy_scores.tolist()}  # for paired comparisons between methods
    for proc in _procedures(cfg):
        for n in ((1,) if proc == "sampling" else cfg.eval_ns):
            w = _win_rate(policy_scores, eval_pool.scores, proc, n, cfg)
            result["win_rates"][f"{proc}@{n}"] = w.as_dict()
    if judges:
        responses = np.concatenate(texts, axis=1).tolist()
        result["judges"] = {
            name: _judged_row(judge_scores(judge, prompts, responses), judged_ref, policy_scores,
                             eval_pool.scores, cfg)
            for name, (judge, judged_ref) in judges.items()}
    return result


def probe(trainer, method: str, t: float | None, reference, tokenizer, reward, eval_pool,
          cfg: CompareConfig, key, judges: dict | None = None) -> dict:
    """One learning-curve point: the policy's held-out win rates with probe_samples fresh samples
    per prompt (the same key at every probe, so the curve's noise is not resampled), its KL, and
    the analytic tool's win rate at that KL (the gap is prediction - measurement); with judges,
    each judge's win rate under the deployment too."""
    only_deployed = dataclasses.replace(cfg, eval_ns=(cfg.deploy_n,))
    row = evaluate_policy(trainer.current_policy(), reference, tokenizer, reward, eval_pool, only_deployed,
                          key, samples=cfg.probe_samples, judges=judges)
    deployed_key = f"{cfg.procedure}@{cfg.deploy_n}"
    deployed = row["win_rates"][deployed_key]["win_rate"]
    predicted = predicted_win_rate(method, cfg, row["kl"], t)
    point = {"step": trainer.step, "kl": row["kl"], "win_rate": deployed,
             "win_rate_sampling": row["win_rates"]["sampling@1"]["win_rate"], "predicted": predicted,
             "gap": None if predicted is None else predicted - deployed}
    if judges:
        point["judges"] = {name: j["win_rates"][deployed_key]["win_rate"] for name, j in row["judges"].items()}
    return point


def results_table(cfg: CompareConfig, rows: dict[str, dict]) -> str:
    """Markdown: one row per policy, win rates with 95% intervals, KL and the prediction."""
    proc, n = cfg.procedure, cfg.deploy_n
    head = (f"| policy | KL (nats) | KL by prompt: p10 / median / p90 | mean reward | W (sampling) | "
            f"W ({proc.upper()}_{n}) | predicted W ({proc.upper()}_{n}) at this KL |\n"
            "|---|---|---|---|---|---|---|\n")
    lines = []
    for name, r in rows.items():
        w1 = r["win_rates"]["sampling@1"]
        wn = r["win_rates"].get(f"{proc}@{n}")
        fmt = lambda w: f"{w['win_rate']:.3f} [{w['ci_low']:.3f}, {w['ci_high']:.3f}]"  # noqa: E731
        pred = r.get("predicted")
        spread = r.get("kl_by_prompt")
        spread = "–" if not spread else f"{spread['p10']:.2f} / {spread['median']:.2f} / {spread['p90']:.2f}"
        lines.append(
            f"| {name} | {r['kl']:.2f} ± {r['kl_se']:.2f} | {spread} | {r['mean_reward']:.3f} | {fmt(w1)} | "
            f"{fmt(wn) if wn else '–'} | {'–' if pred is None else f'{pred:.3f}'} |"
        )
    return head + "\n".join(lines) + "\n"


def plot_win_rates(cfg: CompareConfig, rows: dict[str, dict], path: Path) -> None:
    # A bare Figure, not pyplot: no global backend switch, so notebooks keep showing their plots.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for name, r in rows.items():
        ns = list(cfg.eval_ns)
        ws = [r["win_rates"][f"{cfg.procedure}@{n}"] for n in ns]
        mid = [w["win_rate"] for w in ws]
        err = [[m - w["ci_low"] for m, w in zip(mid, ws)], [w["ci_high"] - m for m, w in zip(mid, ws)]]
        ax.errorbar(ns, mid, yerr=err, marker="o", capsize=3, label=f"{name} (KL {r['kl']:.2f})")
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"N ({ {'bon': 'best', 'won': 'worst'}.get(cfg.procedure, 'soft best')}-of-N at inference)")
    ax.set_ylabel("win rate vs reference (same procedure)")
    ax.set_title(f"{cfg.reward} reward, {cfg.model}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


POLICIES_DIR = "policies"


def run_comparison(cfg: CompareConfig, ctx, log: Callable[[str], None] = print, *,
                   reward=None, model_source: str | None = None, judges: dict | None = None) -> dict[str, Any]:
    """Runs the whole pipeline inside a JobContext `ctx`; returns the flat final metrics.

    reward: the built reward (default: built from the cfg.reward spec); model_source: the resolved
    reference model (default: cfg.model); judges: cfg.judges' built rewards by spec (default:
    built from the specs).
    """
    import jax
    from flax import nnx

    import iapo_jax
    from iapo_jax.alignment.ctrl import CTRLTrainer
    from iapo_jax.alignment.trainer import Hook
    from iapo_jax.data.prompts import load_chat_prompts
    from iapo_jax.evaluation.reused_pools import load_pools_from
    from iapo_jax.rewards.spec import build_reward, parse_reward_spec

    cfg.validate()
    spec = parse_reward_spec(cfg.reward)
    if reward is None:  # fails fast when the rewards extra is missing
        reward = build_reward(spec)
    if judges is None:
        judges = {j: build_reward(parse_reward_spec(j)) for j in cfg.judges}
    source = model_source or cfg.model
    train = load_chat_prompts("train", limit=cfg.train_prompts, seed=cfg.seed)
    held_out = load_chat_prompts("eval", limit=cfg.eval_prompts, seed=cfg.seed)
    ctx.add_data("train_prompts", train)
    ctx.add_data("eval_prompts", held_out)
    key = ctx.key(cfg.seed)
    with ctx.timer("load"):
        reference = iapo_jax.load_model(source, dtype=cfg.dtype)
        tokenizer = iapo_jax.load_tokenizer(source)
    with ctx.timer("calibrate"):
        if cfg.pools_from:
            log(f"calibrate: the pools of {cfg.pools_from}")
            pool, eval_pool = load_pools_from(cfg, train, held_out)
        else:
            pool, eval_pool = _sample_pools(cfg, ctx, log, reference, tokenizer, reward, train, held_out, key)
        # Named like `iapo calibrate`'s pools, so `iapo eval` and `ctrl --pool-dir` can use them.
        meta = {"job": ctx.job, "model": source, "dtype": cfg.dtype, **spec.pool_meta(),
                "max_new_tokens": cfg.max_new_tokens, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                "seed": cfg.seed, "chat_template": True}
        pool = dataclasses.replace(pool, meta={**meta, "samples": cfg.pool_size})
        eval_pool = dataclasses.replace(eval_pool, meta={**meta, "samples": cfg.eval_samples})
        pool.save(ctx.run_dir / "pool_train")
        eval_pool.save(ctx.run_dir / "pool_eval")
        ctx.add_data("pool_train", pool.fingerprint())
        ctx.add_data("pool_eval", eval_pool.fingerprint())
    judged = {}
    if judges:
        with ctx.timer("judge_reference"):
            judged = {name: (judge, judge_scores(judge, eval_pool.prompts, eval_pool.responses))
                      for name, judge in judges.items()}
    rows: dict[str, dict] = {"reference": evaluate_reference(eval_pool, cfg, judged)}
    if cfg.is_sweep:
        from iapo_jax.evaluation.kl_sweep import sweep_points

        runs = [(p.name, cfg.ctrl_config(p.method, beta=p.beta, t=p.t, optimal_kl=p.kl), p)
                for p in sweep_points(cfg)]
    else:
        runs = [(m, cfg.ctrl_config(m), None) for m in cfg.methods]
    for name, mcfg, point in runs:
        method = point.method if point else name
        with ctx.timer(f"train_{name}"):
            policy = nnx.clone(reference)
            trainer = CTRLTrainer(mcfg, policy, reference, tokenizer, reward, pool, train)
            log(f"train {name}: transform {mcfg.transform}"
                + (f" (t = {trainer.t:.3g})" if trainer.t else "") + f", beta {mcfg.beta:.3g}"
                + (" fixed" if mcfg.target_kl is None else f" adapted to KL {mcfg.target_kl}")
                + f", {mcfg.steps} steps ({mcfg.warmup_steps} warmup)")
            curve = []

            def probe_point(step: int, metrics: dict, trainer=trainer, method=method, point=point) -> None:
                curve.append(probe(trainer, method, trainer.t if point else None, reference, tokenizer, reward,
                                   eval_pool, cfg, jax.random.fold_in(key, 7), judges=judged))
                metrics.update({f"probe_{k}": v for k, v in curve[-1].items()
                                if k not in ("step", "judges") and v is not None})
                metrics.update({f"probe_judge.{j}_win_rate": v for j, v in curve[-1].get("judges", {}).items()})

            hooks = [Hook(probe_point, every=cfg.probe_every)] if cfg.probe_every else []
            hooks.append(Hook(lambda step, metrics, name=name: ctx.log(
                step, **{f"{name}/{k}": v for k, v in metrics.items()})))
            trainer.fit(mcfg.steps, hooks, progress=lambda steps, name=name: ctx.progress(
                steps, desc=f"train {name}"))
        with ctx.timer(f"eval_{name}"):
            row = evaluate_policy(trainer.current_policy(), reference, tokenizer, reward, eval_pool, cfg,
                                  jax.random.fold_in(key, 100 + len(rows)), judges=judged)
        if cfg.save_policies and ctx.is_main:
            from iapo_jax.models.checkpoints import save_hf

            with ctx.timer("save_policies"):
                save_hf(trainer.current_policy(), ctx.run_dir / POLICIES_DIR / name, tokenizer)
            ctx.fingerprint_output(f"policy_{name}", f"{POLICIES_DIR}/{name}")
        row.update(method=method, t=trainer.t,
                   predicted=predicted_win_rate(method, cfg, row["kl"], trainer.t if point else None))
        if point:
            row.update(beta=point.beta, beta_for_kl=point.kl)
        if curve:
            row["curve"] = curve
        rows[name] = row
        del trainer, policy
    table, differences = write_results(cfg, rows, eval_pool.scores, ctx.run_dir, judged)
    log("\n" + table)
    metrics: dict[str, Any] = {}
    for name, r in rows.items():
        metrics[f"{name}.kl"] = r["kl"]
        for k, w in r["win_rates"].items():
            metrics[f"{name}.win_rate.{k}"] = w["win_rate"]
        for judge, jr in r.get("judges", {}).items():
            for k, w in jr["win_rates"].items():
                metrics[f"{name}.judge.{judge}.win_rate.{k}"] = w["win_rate"]
    for d in differences:
        key = f"{d['a']}-{d['b']}.{d['procedure']}@{d['n']}"
        if "judge" in d:
            key = f"judge.{d['judge']}.{key}"
        metrics[f"difference.{key}"] = d["difference"]
        metrics[f"minimum_detectable.{key}"] = d["minimum_detectable"]
    return metrics


def _sample_pools(cfg: CompareConfig, ctx, log, reference, tokenizer, reward, train, held_out, key):
    """The reference's calibration pool on the training prompts and its evaluation samples on the
    held-out prompts (separate draws)."""
    import jax

    from iapo_jax.rewards.pools import sample_reference_pool

    log(f"calibrate: {cfg.pool_size} reference samples x {len(train)} training prompts")
    pool = sample_reference_pool(reference, tokenizer, reward, train, m=cfg.pool_size,
                                 max_new_tokens=cfg.max_new_tokens, key=jax.random.fold_in(key, 1),
                                 per_call=samples_per_call(cfg.pool_size, len(train)),
                                 progress=lambda it: ctx.progress(it, desc="calibrate"))
    eval_pool = sample_reference_pool(reference, tokenizer, reward, held_out, m=cfg.eval_samples,
                                      max_new_tokens=cfg.max_new_tokens, key=jax.random.fold_in(key, 2),
                                      per_call=samples_per_call(cfg.eval_samples, len(held_out)),
                                      progress=lambda it: ctx.progress(it, desc="reference eval"))
    return pool, eval_pool


def write_results(cfg: CompareConfig, rows: dict[str, dict], reference_scores, out_dir: Path,
                  judged: dict | None = None) -> tuple[str, list[dict]]:
    """The run's report from its rows: results.md/.json, the paired differences between methods,
    learning curves, plots, and a sweep's matched-KL read-out. Returns the report's text and the
    differences. Also re-renders a report from joined runs' results.json.

    reference_scores: the reference's held-out evaluation scores [prompts, samples];
    judged: judge name -> (judge, its scores of those samples)."""
    out_dir = Path(out_dir)
    judged = judged or {}
    text = ""
    if cfg.is_sweep:
        from iapo_jax.evaluation.kl_sweep import write_sweep_report

        text = ("win rate at matched KL (interpolated along each sweep curve):\n"
                + write_sweep_report(cfg, rows, out_dir, reference_scores) + "\n")
    table = results_table(cfg, rows)
    differences = []
    if not cfg.is_sweep and len(cfg.methods) > 1:
        differences = compare_methods(cfg, rows, reference_scores)
        table += ("\nDifferences between methods: the same held-out prompts and reference samples, "
                  "prompts resampled jointly (paired bootstrap):\n\n" + differences_table(differences))
    for name, (_, judged_ref) in judged.items():
        table += "\n" + judged_table(rows, name, cfg.procedure, cfg.deploy_n, cfg.reward)
        if not cfg.is_sweep and len(cfg.methods) > 1:
            rows_j = compare_methods(cfg, rows, reference_scores, judge=(name, judged_ref))
            differences += [{**d, "judge": name} for d in rows_j]
            table += "\nDifferences between methods judged by " + name + ":\n\n" + differences_table(rows_j)
    (out_dir / "results.md").write_text(table)
    (out_dir / "results.json").write_text(json.dumps(rows, indent=2, default=float))
    if differences:
        (out_dir / "differences.json").write_text(json.dumps(differences, indent=2))
    if any("curve" in r for r in rows.values()):
        from iapo_jax.evaluation.learning_curves import write_learning_curves

        write_learning_curves(cfg, rows, out_dir)
    plot_win_rates(cfg, rows, out_dir / "win_rates.png")
    return text + table, differences


def compare_methods(cfg: CompareConfig, rows: dict[str, dict], reference_scores,
                    judge: tuple[str, np.ndarray] | None = None) -> list[dict]:
    """Paired differences between the trained methods under sampling and the deployment.

    judge: (name, its scores of the reference samples): the differences as that judge sees them,
    with the deployment selecting on the training reward."""
    trained = {name: r for name, r in rows.items() if name != "reference"}
    scores = {name: np.asarray(r["scores"]) for name, r in trained.items()}
    procedures = ("sampling", cfg.procedure)
    if judge is None:
        return method_differences(scores, reference_scores, procedures, (cfg.deploy_n,), seed=cfg.seed,
                                  lam=cfg.lam)
    name, judged_ref = judge
    judged = {m: np.asarray(r["judges"][name]["scores"]) for m, r in trained.items()}
    return method_differences(judged, judged_ref, procedures, (cfg.deploy_n,), seed=cfg.seed, lam=cfg.lam,
                              selection=(scores, reference_scores))


def evaluate_reference(eval_pool, cfg: CompareConfig, judged: dict | None = None) -> dict:
    """The reference against itself: KL 0 and win rates of exactly one half (a sanity row)."""
    rows = {}
    for proc in _procedures(cfg):
        for n in ((1,) if proc == "sampling" else cfg.eval_ns):
            rows[f"{proc}@{n}"] = _win_rate(eval_pool.scores, eval_pool.scores, proc, n, cfg).as_dict()
    out = {"kl": 0.0, "kl_se": 0.0, "mean_reward": float(eval_pool.scores.mean()), "win_rates": rows,
           "predicted": None, "t": None}
    if judged:
        out["judges"] = {name: _judged_row(ref, ref, eval_pool.scores, eval_pool.scores, cfg)
                         for name, (_, ref) in judged.items()}
    return out
