"""Cells of ctrl.ipynb (percent format; build with ../build_notebooks.py).

SMALL and MODEL come from the shared setup cell (setup_cell.py).
"""
# ruff: noqa: F821

# %% [markdown]
# # A small CTRL run: inference-aware alignment for best-of-N
#
# If a policy will be served with **best-of-N** (draw N responses, keep the one the reward likes
# best), the RLHF objective "maximise the expected reward" is the wrong one: what matters is how
# often the *best of N* beats the reference's best of N. InfAlign (arXiv 2412.19792) shows that
# after **calibrating** the reward against the reference policy (u = C(x, y) = the fraction of
# reference responses to x that y beats, uniform on [0, 1] under pi_ref) and **transforming** it
# with Phi(u) = exp(t u), KL-regularised RL (**CTRL**) comes within a few tenths of a point of the
# best possible best-of-N win rate at a given KL, for any prompt, model and reward.
#
# This notebook runs the whole pipeline as one recorded job, the same one `iapo compare` runs:
#
# 1. **calibrate**: sample reference pools from pi_ref for training and held-out prompts;
# 2. **train** CTRL (exp transform, t from the analytic tool) and its baselines (calibrated RLHF =
#    identity transform; raw-reward RLHF) from the same start, seeds and KL target;
# 3. **evaluate** fresh samples on held-out prompts: win rates against pi_ref under sampling and
#    best-of-N, with bootstrap intervals, and the sample KL;
# 4. **predict** each method's win rate at its measured KL with the closed form, beside the measurement.
#
# Then we look under the hood: a `CTRLTrainer` driven step by step on the same calibration pool.

# %%
import io
import json
import time
from pathlib import Path

import matplotlib.pyplot as plt
from flax import nnx
from IPython.display import Image, Markdown, display

import iapo_jax
from iapo_jax.alignment.ctrl import CTRLTrainer
from iapo_jax.commands import load_job
from iapo_jax.commands.common import run_job
from iapo_jax.data.prompts import load_chat_prompts
from iapo_jax.evaluation.comparison import CompareConfig
from iapo_jax.rewards import ReferencePool, get_reward
from iapo_jax.runtime.metrics import read_metrics
from iapo_jax.theory import win_rate_curve


def show(fig):
    """Display a figure as PNG whatever pyplot's backend is (the job switches it to Agg to save its
    plot, which silences plt.show() in a notebook), then free it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    display(Image(data=buf.getvalue()))


if SMALL:  # the test suite: a tiny model, a few prompts, two RL steps
    cfg = CompareConfig(
        model=MODEL, reward="length",  # a tiny random model writes no sentiment words; length varies
        procedure="bon", deploy_n=2, methods=("ctrl", "calibrated"),
        train_prompts=4, eval_prompts=4, pool_size=4, eval_samples=4, eval_ns=(1, 2),
        steps=2, prompts_per_step=4, samples_per_prompt=2, max_new_tokens=8,
        learning_rate=1e-3, target_kl=1.0)
else:  # sized for a Colab GPU; on a laptop CPU try `iapo quickstart` instead
    cfg = CompareConfig(
        model=MODEL, reward="vader", procedure="bon", deploy_n=4, methods=("ctrl", "calibrated", "raw"),
        train_prompts=32, eval_prompts=32, pool_size=32, eval_samples=32, eval_ns=(1, 2, 4, 8),
        steps=40, prompts_per_step=16, samples_per_prompt=4, max_new_tokens=32,
        learning_rate=2e-5, target_kl=1.0)
cfg.validate()  # bad settings fail here, before any compute
RUN_DIR = Path("runs") / f"ctrl-notebook-{time.strftime('%Y%m%d-%H%M%S')}"
print(cfg)

# %% [markdown]
# ## Run the comparison as a recorded job
#
# `run_job` is what the `iapo` CLI does around every job: it opens the run directory, writes
# `manifest.json` (code version, packages, devices, config, seeds, data fingerprints, timings,
# final metrics), logs step metrics to `metrics.jsonl` and TensorBoard, and prints a summary.

# %%
ctx = run_job(load_job("compare"), cfg, run_dir=RUN_DIR, argv=["ctrl.ipynb"])
display(Markdown((RUN_DIR / "results.md").read_text()))

# %% [markdown]
# Each row: the KL from pi_ref (nats, mean ± standard error over held-out samples), the mean raw
# reward, the win rate against pi_ref for single samples and under best-of-N (95% bootstrap interval
# over prompts; ties count one half), and the analytic tool's prediction for that transform at the
# measured KL. The `reference` row is pi_ref against itself: exactly one half.

# %%
display(Image(filename=str(RUN_DIR / "win_rates.png")))

steps = read_metrics(RUN_DIR)
fig, axes = plt.subplots(1, 3, figsize=(15, 3.5))
for method in cfg.methods:
    rows = [r for r in steps if f"{method}/kl" in r]
    for ax, key in zip(axes, ("raw_reward", "kl", "beta")):
        ax.plot([r["step"] for r in rows], [r[f"{method}/{key}"] for r in rows], "o-", label=method)
for ax, title in zip(axes, ("mean raw reward of the rollouts", "KL(pi || pi_ref) per sequence",
                            "beta (adapted towards the KL target)")):
    ax.set_title(title)
    ax.set_xlabel("RL step")
    ax.legend()
fig.tight_layout()
show(fig)

# %% [markdown]
# ## Measured against the closed form
#
# On a calibrated reward, the win rate of a transform at a given KL does not depend on the prompt,
# the model or the reward: the curves below come from `iapo_jax.theory`, the points from this run.
# With few prompts and short training the points scatter; the ordering at equal KL is the claim.

# %%
results = json.loads((RUN_DIR / "results.json").read_text())
n = cfg.deploy_n
top = max([1.0] + [r["kl"] for r in results.values()]) * 1.3
kls = [top * (i + 1) / (4 if SMALL else 12) for i in range(4 if SMALL else 12)]
fig, ax = plt.subplots(figsize=(6.5, 4.2))
for transform, style in (("exp", "-"), ("identity", "--")):
    curve = win_rate_curve("bon", n, transform, kls)
    ax.plot([0.0] + [r.kl for r in curve], [0.5] + [r.win_rate for r in curve], style,
            label=f"{transform} (closed form)")
for method, r in results.items():
    w = r["win_rates"][f"bon@{n}"]
    ax.errorbar([r["kl"]], [w["win_rate"]], xerr=[[r["kl_se"]], [r["kl_se"]]],
                yerr=[[w["win_rate"] - w["ci_low"]], [w["ci_high"] - w["win_rate"]]], fmt="o", capsize=3,
                label=f"{method} (measured)")
ax.set_xlabel("KL(pi || pi_ref) [nats]")
ax.set_ylabel(f"best-of-{n} win rate against pi_ref")
ax.legend(fontsize=8)
ax.grid(alpha=0.3)
show(fig)

# %% [markdown]
# ## Under the hood: one CTRL trainer, step by step
#
# The job saved its calibration pools. `pool.calibrate(prompts, scores)` turns raw rewards into
# u in [0, 1] (mid-ranks: ties share their rank); the trainer applies Phi(u), rescaled onto [0, 1],
# folds in the KL penalty and takes a leave-one-out policy-gradient step on the sampled responses.

# %%
pool = ReferencePool.load(RUN_DIR / "pool_train")
prompts = list(pool.prompts)
print(f"pool: {pool.num_prompts} prompts x {pool.num_samples} reference samples")
print("reference scores of the first prompt:", pool.scores[0])
print("their calibrated values:", pool.calibrate(prompts[:1], pool.scores[:1]))

reference = iapo_jax.load_model(cfg.model)
tokenizer = iapo_jax.load_tokenizer(cfg.model, model=reference)
ctrl_cfg = cfg.ctrl_config("ctrl")  # the CTRLConfig the job trained with
trainer = CTRLTrainer(ctrl_cfg, nnx.clone(reference), reference, tokenizer, get_reward(cfg.reward), pool,
                      load_chat_prompts("train", limit=cfg.train_prompts, seed=cfg.seed),
                      probe_prompts=prompts[: min(8, len(prompts))])
print(f"transform {ctrl_cfg.transform}, t = {trainer.t:.3g} (the analytic tool's best t for "
      f"best-of-{ctrl_cfg.deploy_n} at KL {ctrl_cfg.target_kl})")
for _ in range(min(3, ctrl_cfg.steps)):
    m = trainer.train_step().metrics
    print(f"step {trainer.step}: raw reward {m['raw_reward']:+.3f}  calibrated {m['calibrated_reward']:.3f}  "
          f"KL {m['kl']:.3f}  beta {m['beta']:.4f}")
print(f"win rate of fresh samples on the probe prompts: {trainer.probe_win_rate():.3f}")

# %% [markdown]
# ## The run record
#
# Everything needed to rerun and check this experiment is in the run directory. From a shell,
# `iapo reproduce RUN_DIR` reruns the job from its record into a new directory and reports, metric
# by metric, whether the numbers match (exactly on the same machine type and device count).

# %%
record = json.loads((RUN_DIR / "manifest.json").read_text())
print("status:", record["status"], "| job:", record["job"])
git = (record["code"] or {}).get("git") or {}
print("code:", f"git {git.get('commit', '?')[:12]}{' + uncommitted changes' if git.get('dirty') else ''},",
      "package source sha256", (record["code"] or {}).get("source_sha256", "?")[:12])
print("jax:", {k: record["jax"][k] for k in ("version", "backend", "device_kind", "device_count")})
print("timings (s):", {k: round(v, 1) for k, v in record["timings"].items()})
print("files:", sorted(p.name for p in RUN_DIR.iterdir()))
print(f"\nreproduce with:  iapo reproduce {RUN_DIR}")
