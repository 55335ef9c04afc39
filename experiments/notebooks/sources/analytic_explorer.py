"""Cells of analytic_explorer.ipynb (percent format; build with ../build_notebooks.py).

SMALL and MODEL come from the shared setup cell (setup_cell.py).
"""
# ruff: noqa: F821

# %% [markdown]
# # Analytic explorer: win rate against KL for reward transforms, N and procedures
#
# Calibrate a reward against the reference policy: u = C(x, y) is the fraction of pi_ref's
# responses to x that y beats. Under pi_ref, u is Uniform[0, 1] for *every* prompt. A policy that
# maximises E[Phi(u)] - beta KL(pi || pi_ref) is pi_ref tilted by exp(Phi(u) / beta), so on the
# u scale it is the density
#
# $$f(u) = \frac{e^{\Phi(u)/\beta}}{\int_0^1 e^{\Phi(v)/\beta}\,dv} \quad\text{on } [0, 1],$$
#
# the same for every prompt, model and reward. Its KL from pi_ref and its win rate against pi_ref
# when both are served by sampling, **best-of-N** (keep the best of N draws) or **worst-of-N**
# (keep the worst: the safety view) are one-dimensional integrals of f (InfAlign, arXiv 2412.19792).
# `iapo_jax.theory` computes them to about 1e-10, finds beta for a target KL, the best t of the
# exponential transforms, and the exact optimum over all policies. It runs in numpy: any runtime works.
#
# | transform | Phi(u) | good for |
# |---|---|---|
# | identity | u | calibrated RLHF |
# | log | log u | the best-of-N distillation target |
# | logit | log u - log(1 - u) | |
# | exp | exp(t u) | best-of-N (CTRL) |
# | negexp | -exp(-t u) | worst-of-N (CTRL) |
# | optimal | | the best any policy can do at that KL |

# %%
import matplotlib.pyplot as plt
from IPython.display import Markdown, display

from iapo_jax.theory import (
    FITS,
    analyse,
    analyse_density,
    markdown_table,
    transform_curves,
)

# SMALL runs a coarse version of every cell (the test suite); the full one takes about a minute.
KLS = [0.5, 1.5] if SMALL else [0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0]
NS = [2, 4] if SMALL else [1, 2, 4, 8, 16, 32]
N_FOR_CURVES = 4

# %% [markdown]
# ## One question, one answer
#
# "Serving best-of-4, tuned to KL 1 nat: what does each transform win?"

# %%
at_kl1 = [analyse("bon", 4, name, kl=1.0) for name in FITS["bon"]]
display(Markdown(markdown_table(at_kl1)))
best = analyse("bon", 4, "exp", kl=1.0)
print(f"exp with the best t = {best.t:.3g}: best-of-4 win rate {best.win_rate:.4f} "
      f"(single samples: {best.standard_win_rate:.4f}); beta = {best.beta:.3g}")

# %% [markdown]
# ## Win rate against KL, for each transform
#
# Left: served with best-of-N. Right: served with worst-of-N. Every curve starts at (0, 1/2),
# pi_ref against itself. The tuned exponential transform runs just under the exact optimum.

# %%
panels = [(proc, transform_curves(proc, N_FOR_CURVES, KLS)) for proc in ("bon", "won")]
fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
for ax, (proc, curves) in zip(axes, panels):
    for name, results in curves.items():
        # exp / negexp drawn wide: they run so close to the optimum that its dashes would hide them
        style = {"color": "k", "ls": "--"} if name == "optimal" else {"lw": 2.5 if name in ("exp", "negexp") else 1.2}
        ax.plot([0.0] + [r.kl for r in results], [0.5] + [r.win_rate for r in results], marker=".",
                label=f"{name} (best t)" if name in ("exp", "negexp") else name, **style)
    label = "best" if proc == "bon" else "worst"
    ax.set(xlabel="KL(pi || pi_ref) [nats]", ylabel=f"{label}-of-{N_FOR_CURVES} win rate",
           title=f"served with {label}-of-{N_FOR_CURVES}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## What the transforms do to the policy
#
# The tilted densities f(u) at KL 1: identity tilts linearly; exp piles mass at the very top of the
# reference's reward distribution, where best-of-N picks its responses; negexp instead drains the
# bottom, which is what worst-of-N exposes.

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
for ax, proc in zip(axes, ("bon", "won")):
    for name in FITS[proc]:
        result, density = analyse_density(proc, 4, name, kl=1.0)
        keep = (density.grid.u > 1e-3) & (density.grid.u < 1 - 1e-3)
        ax.plot(density.grid.u[keep], density.f[keep], label=f"{name} (t={result.t:.3g})" if result.t else name)
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.set(xlabel="calibrated reward u", ylabel="density f(u)", yscale="log", ylim=(1e-3, 1e2),
           title=f"tilted policies at KL 1, tuned for {'best' if proc == 'bon' else 'worst'}-of-4")
    ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## The effect of N
#
# At a fixed KL, how the best-of-N win rate moves with N, and how far the best t has to go: the
# larger N, the more only the very top of the reward distribution matters.

# %%
by_n = {name: [analyse("bon", n, name, kl=1.0) for n in NS] for name in ("identity", "log", "exp", "optimal")}
fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
for name, results in by_n.items():
    axes[0].plot(NS, [r.win_rate for r in results], "o-", label=name)
axes[0].set(xscale="log", xlabel="N", ylabel="best-of-N win rate at KL 1", title="win rate against N")
axes[0].set_xscale("log", base=2)
axes[0].legend(fontsize=8)
axes[1].plot(NS, [r.t for r in by_n["exp"]], "o-")
axes[1].set_xscale("log", base=2)
axes[1].set(xlabel="N", ylabel="best t of exp(t u)", title="best t at KL 1 against N")
fig.tight_layout()
plt.show()
display(Markdown(markdown_table([r for results in by_n.values() for r in results])))

# %% [markdown]
# ## Ask your own question
#
# Change the numbers and rerun the cell: `procedure` is sampling, bon or won; give a target `kl`
# (or `beta` instead); `t` fixes the exponential transforms' parameter (None: the best t).
# Settings that make no sense are rejected before any computation, with the fix in the message.

# %%
procedure, n, transform, kl, t = "won", 8, "negexp", 0.5, None
r = analyse(procedure, n, transform, kl=kl, t=t)
print(f"{transform} under {procedure} with N={n} at KL {r.kl:.3f}: win rate {r.win_rate:.4f}, "
      f"single-sample win rate {r.standard_win_rate:.4f}, t = {r.t}, log beta = {r.log_beta:.3f}")
try:
    analyse("bon", 4, "negexp", kl=1.0)
except ValueError as err:
    print("rejected:", err)

# %% [markdown]
# The same numbers from a shell: `iapo theory --procedure bon --n 4 --kl 1`, and the full
# tables with `python experiments/theory/win_rate_vs_kl.py --n 4`.
