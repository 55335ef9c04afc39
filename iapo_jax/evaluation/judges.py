"""Judges: rewards that rescore held-out samples without training on them.

A policy trained on a learned reward can win under it and lose under the scorer the reward
imitates (over-optimisation). A judge rescores the same samples; an inference-time procedure still
selects on the deployed reward, and the judge scores what it serves
(win_rates.per_prompt_win_rates with a selection key).
"""

from __future__ import annotations

import numpy as np

from iapo_jax.evaluation.win_rates import WinRate, bootstrap_win_rate, pool_calibration


def served_win_rate(scores, reference_scores, procedure: str, n: int, *, seed: int = 0,
                    lam: float | None = None, judged=None) -> WinRate:
    """Win rate against the reference with a bootstrap interval. The procedure selects on
    `scores` (soft_bon: on their calibration against the reference's); judged: (policy, reference)
    scores of a judge, which then decide the comparison."""
    a, b = (scores, reference_scores) if judged is None else judged
    if procedure == "soft_bon":
        selection = (pool_calibration(scores, reference_scores),
                     pool_calibration(reference_scores, reference_scores))
        return bootstrap_win_rate(a, b, procedure, n, seed=seed, lam=lam, selection=selection)
    selection = None if judged is None else (scores, reference_scores)
    return bootstrap_win_rate(a, b, procedure, n, seed=seed, selection=selection)


def judge_scores(judge, prompts, responses) -> np.ndarray:
    """[P, k] scores of a judge on k responses per prompt (prompt-major lists)."""
    from iapo_jax.rewards.base import check_scores

    texts = [t for row in responses for t in row]
    rep = [p for p, row in zip(prompts, responses) for _ in row]
    scores = check_scores(judge.score(rep, texts), len(texts), getattr(judge, "name", "judge"))
    return np.asarray(scores, np.float32).reshape(len(prompts), -1)


def judged_row(judged, judged_ref, scores, reference_scores, deployments, *, seed: int = 0,
               lam: float | None = None) -> dict:
    """A judge's view of one policy: its mean score, and the win rates under each (procedure, N)
    in `deployments`, each selecting on the training reward's scores."""
    rates = {f"{proc}@{n}": served_win_rate(scores, reference_scores, proc, n, seed=seed, lam=lam,
                                            judged=(judged, judged_ref)).as_dict()
             for proc, n in deployments}
    return {"mean_reward": float(np.mean(judged)), "win_rates": rates, "scores": np.asarray(judged).tolist()}


def judged_table(rows: dict[str, dict], judge: str, procedure: str, n: int, reward: str) -> str:
    """Markdown: every policy as one judge sees it."""
    fmt = lambda w: f"{w['win_rate']:.3f} [{w['ci_low']:.3f}, {w['ci_high']:.3f}]"  # noqa: E731
    lines = [f"Judged by {judge} (the deployment still selects on the training reward, {reward}):", "",
             f"| policy | mean {judge} | W (sampling) | W ({procedure.upper()}_{n}) |", "|---|---|---|---|"]
    for name, r in rows.items():
        j = r["judges"][judge]
        lines.append(f"| {name} | {j['mean_reward']:.3f} | {fmt(j['win_rates']['sampling@1'])} | "
                     f"{fmt(j['win_rates'][f'{procedure}@{n}'])} |")
    return "\n".join(lines) + "\n"
