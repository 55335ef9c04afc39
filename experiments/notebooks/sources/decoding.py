"""Cells of decoding.ipynb (percent format; build with ../build_notebooks.py).

SMALL and MODEL come from the shared setup cell (setup_cell.py).
"""
# ruff: noqa: F821

# %% [markdown]
# # Controlled decoding side by side: best-of-N, blockwise CD and token-level CD
#
# Three ways to steer a frozen model `pi_ref` towards a reward at inference time, on the same chat
# prompts, with the same reward (VADER sentiment, a packaged scorer nobody here wrote; the SMALL test
# settings reward the response length instead):
#
# | method | what happens per prompt | KL(pi \|\| pi_ref) |
# |---|---|---|
# | **best-of-N** | sample N full responses, keep the highest-reward one | at most log N - (N-1)/N |
# | **blockwise CD** | K candidate blocks of M tokens, keep the best prefix, repeat | at most (log K - (K-1)/K) L/M |
# | **token-level CD** | sample each token from pi_ref(z) exp(lambda V([x, y, z])) over the top-k tokens | estimated from samples |
#
# V is a *prefix scorer*: here a CD-FUDGE value model (pi_ref's backbone with a scalar head trained
# to predict the final reward from every prefix), trained below. Blockwise CD also takes
# a plain Python scorer on strings, so we run it with VADER itself on the partial responses too.
#
# Everything is compiled once per shape: every prompt is prefilled once and its KV cache shared by
# the N (or K) branches; lambda and the scorer weights are traced, so sweeping them never recompiles.

# %%
import time

import matplotlib.pyplot as plt
import numpy as np
from flax import nnx
from IPython.display import Markdown, display

import iapo_jax
from iapo_jax.alignment.prefix_rollouts import sample_rollouts
from iapo_jax.alignment.prefix_scorer import PrefixScorerTrainer, ScorerTrainConfig
from iapo_jax.data.prompts import load_chat_prompts
from iapo_jax.decoding.sampler import Sampler
from iapo_jax.evaluation.win_rates import bootstrap_win_rate
from iapo_jax.models.heads import ValueModel
from iapo_jax.rewards import get_reward
from iapo_jax.rewards.preference_pairs import prompt_bucket

if SMALL:  # the test suite: a tiny random model (no sentiment words: reward the length instead)
    REWARD, PROMPTS, REPEATS, MAX_NEW = "length", 3, 2, 8
    N, K, M, TOP_K, LAMBDAS, SCORER_STEPS = 2, 2, 4, 4, (0.0, 4.0), 5
else:
    REWARD, PROMPTS, REPEATS, MAX_NEW = "vader", 16, 4, 32
    N, K, M, TOP_K, LAMBDAS, SCORER_STEPS = 4, 4, 8, 10, (0.0, 5.0, 20.0), 300

model = iapo_jax.load_model(MODEL)
tokenizer = iapo_jax.load_tokenizer(MODEL, model=model)
reward = get_reward(REWARD)
prompts = load_chat_prompts("eval", limit=PROMPTS, seed=0)  # held-out chatterbot questions
rows = [p for p in prompts for _ in range(REPEATS)]  # REPEATS responses per prompt, one batch
train_prompts = load_chat_prompts("train", limit=len(rows), seed=0)  # for the prefix scorer below
# One prompt-length bucket for every call below, so calls of the same shape share one program.
bucket = prompt_bucket(tokenizer, prompts + train_prompts)
print(f"{model.config.family} model, {len(prompts)} prompts x {REPEATS} responses of <= {MAX_NEW} tokens")

# %% [markdown]
# ## The reference: plain sampling from pi_ref
#
# A `Sampler` keeps the model, tokenizer and default settings together. Every method below is
# scored by its **win rate against pi_ref**: the chance that its response beats a reference response
# to the same prompt (ties count one half). One call draws N independent responses per row: the
# first is the plain-sampling method's response, the other N - 1 form the reference pool. (N per
# row is also what best-of-N runs next, so both use one compiled program.)

# %%
sampler = Sampler(model, tokenizer, max_new_tokens=MAX_NEW, prompt_buckets=(bucket,))
t0 = time.perf_counter()
draws = sampler.sample(rows, n=N, key=100)
seconds = time.perf_counter() - t0
texts = np.asarray(draws.texts, dtype=object).reshape(len(rows), N)
ref_texts = list(texts[:, 1:].reshape(-1))
ref_scores = reward.score([p for p in rows for _ in range(N - 1)], ref_texts)
ref_scores = np.asarray(ref_scores).reshape(len(prompts), REPEATS * (N - 1))

results = {}  # method -> texts, scores [prompts, REPEATS], KL (and whether bound or estimate), seconds


def record(name, texts, seconds, kl, kl_kind):
    """Score a method's responses (REPEATS per prompt, prompt-major) and keep them for the table."""
    scores = np.asarray(reward.score(rows, list(texts))).reshape(len(prompts), REPEATS)
    results[name] = {"texts": list(texts), "scores": scores, "seconds": seconds, "kl": kl, "kl_kind": kl_kind}
    print(f"{name:30s} mean reward {scores.mean():+.3f}   ({seconds:.1f} s incl. any compilation)")


record("sampling (pi_ref)", texts[:, 0], seconds, 0.0, "exact")

# %% [markdown]
# ## Best-of-N
#
# One compiled program prefills each prompt once, decodes its N branches together, and a Python
# scorer (the reward on the decoded text) picks the winner. `component_scores` keeps every candidate's
# score, `kl_bound` the classic bound log N - (N-1)/N.

# %%
t0 = time.perf_counter()
bon = sampler.best_of_n(rows, reward, n=N, key=2)
record(f"best-of-{N}", bon.best_texts, time.perf_counter() - t0, bon.kl_bound, "bound")

# %% [markdown]
# ## Blockwise CD with the reward itself on partial responses
#
# K continuations of M tokens from the shared prefix, the best prefix under the scorer is kept and
# copied into every branch, and so on until the responses end. A Python scorer sees
# (prompts, partial responses) as strings between compiled block steps.

# %%
t0 = time.perf_counter()
blk_reward = sampler.blockwise(rows, reward, k=K, block_size=M, key=3)
record(f"blockwise K={K} M={M} ({reward.name})", blk_reward.texts, time.perf_counter() - t0,
       float(np.mean(blk_reward.kl_bound)), "bound")

# %% [markdown]
# ## A CD-FUDGE prefix scorer
#
# Sample rollouts from pi_ref on *training* prompts, score them with the reward, and fit a value
# head on pi_ref's frozen backbone so that V([x, y^t]) predicts r(x, y) from every prefix y^t
# (mode `head`: hidden states are computed once, then only 1 + d parameters train).

# %%
# As many prompts as `rows` and N samples each: the program compiled above, when the prompts fit its bucket.
rollouts, _, _ = sample_rollouts(model, tokenizer, train_prompts, reward, n=N, max_new_tokens=MAX_NEW,
                                 key=4, prompts_per_batch=len(rows))
cfg = ScorerTrainConfig(method="fudge", mode="head", steps=SCORER_STEPS, batch_size=16,
                        learning_rate=1e-3, warmup_steps=min(10, SCORER_STEPS))
trainer = PrefixScorerTrainer(cfg, ValueModel.from_policy(model, nnx.Rngs(0)), rollouts)
before = trainer.evaluate(trainer.train_data)["mse"]  # the training rollouts: features are cached
history = trainer.train()
after = trainer.evaluate(trainer.train_data)["mse"]
value_model = trainer.current_model()
print(f"{rollouts.size} rollouts; mean squared error of V(prefix) to the final reward {before:.4f} -> {after:.4f}")

# %% [markdown]
# ## Blockwise CD and token-level CD with the learned scorer
#
# With a JAX scorer, blockwise CD runs scoring and selection inside the compiled program. Token-level
# CD scores the top-k next tokens of every row at every step; lambda = 0 is plain top-k sampling.
# For token-level CD the KL is estimated from the samples: sum_t log q(y_t) - log pi_ref(y_t), where
# q is the distribution each token was drawn from; the top-k cut counts too (lambda = 0 is top-k
# sampling, not pi_ref itself), which is large when pi_ref spreads its mass over many tokens.

# %%
t0 = time.perf_counter()
blk_fudge = sampler.blockwise(rows, value_model, k=K, block_size=M, key=3)
record(f"blockwise K={K} M={M} (FUDGE)", blk_fudge.texts, time.perf_counter() - t0,
       float(np.mean(blk_fudge.kl_bound)), "bound")

for lam in LAMBDAS:  # lambda is traced: only the first call compiles
    t0 = time.perf_counter()
    out = sampler.token_cd(rows, value_model, lam=lam, k=TOP_K, key=5)
    mask = np.arange(out.tokens.shape[1])[None, :] < np.asarray(out.lengths)[:, None]
    kl = float(np.mean(np.sum((np.asarray(out.logprobs) - np.asarray(out.raw_logprobs)) * mask, -1)))
    record(f"token CD top-{TOP_K} lambda={lam:g}", out.texts, time.perf_counter() - t0, kl, "estimate")

# %% [markdown]
# ## Side by side

# %%
KL_MARK = {"exact": "", "bound": "<= ", "estimate": "~ "}
lines = ["| method | mean reward | win rate vs pi_ref [95% CI] | KL (nats) | seconds |", "|---|---|---|---|---|"]
for name, r in results.items():
    w = r["win_rate"] = bootstrap_win_rate(r["scores"], ref_scores, "sampling", 1, seed=0)
    lines.append(f"| {name} | {r['scores'].mean():+.3f} | {w.win_rate:.3f} [{w.ci_low:.3f}, {w.ci_high:.3f}] "
                 f"| {KL_MARK[r['kl_kind']]}{r['kl']:.2f} | {r['seconds']:.1f} |")
display(Markdown("\n".join(lines)))

fig, axes = plt.subplots(1, 2, figsize=(12, 4))
names = list(results)
wins = [results[n]["win_rate"] for n in names]
axes[0].barh(names, [w.win_rate for w in wins],
             xerr=[[w.win_rate - w.ci_low for w in wins], [w.ci_high - w.win_rate for w in wins]])
axes[0].axvline(0.5, color="grey", ls="--", lw=0.8)
axes[0].invert_yaxis()
axes[0].set_xlabel(f"win rate against pi_ref ({reward.name})")
token = [results[n] for n in names if n.startswith("token CD")]
axes[1].plot([r["kl"] for r in token], [r["win_rate"].win_rate for r in token], "o-", label="token CD (lambda sweep)")
for n in names:
    if results[n]["kl_kind"] == "bound":  # best-of-N and blockwise, placed at their KL bound
        axes[1].plot(results[n]["kl"], results[n]["win_rate"].win_rate, "s", label=n)
axes[1].set_xlabel("KL (nats): bound for best-of-N / blockwise, estimate for token CD")
axes[1].set_ylabel("win rate against pi_ref")
axes[1].legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## What the responses look like (first prompt)

# %%
print("PROMPT:", prompts[0], "\n")
for name, r in results.items():
    print(f"[{name}]  reward {r['scores'][0, 0]:+.3f}\n  {r['texts'][0]!r}\n")
