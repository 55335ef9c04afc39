"""Exact quantities on an enumerable setting: response distributions, calibration, KL, win rates
under sampling / best-of-N / worst-of-N / soft best-of-N, and the KL-regularised optimum.

Everything is a sum over the complete response set, in float64 on the host: no sampling noise.
Rewards are tie-free, so the mid-rank calibration is C(y) = pi_ref(r < r(y)) + pi_ref(y) / 2.
Soft best-of-N selects on that exact calibration; its one-dimensional integral (below) is done by
Gauss-Legendre quadrature to ~1e-13, so it is exact for every purpose here.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from iapo_jax.decoding.reference import response_logprobs


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _all_logprobs(graphdef, state, prompt_ids, responses):
    model = nnx.merge(graphdef, state)
    p, y = prompt_ids.shape[0], responses.shape[0]
    mask = jnp.ones(prompt_ids.shape, bool)
    tokens = jnp.tile(responses, (p, 1))  # prompt-major: prompt b's Y responses in rows b*Y ..
    lengths = jnp.full((p * y,), responses.shape[1], jnp.int32)
    return response_logprobs(model, prompt_ids, mask, tokens, lengths).reshape(p, y, -1)


def token_log_probs(model, setting) -> np.ndarray:
    """log pi(y_t | x, y_<t) for every prompt, response and position: [P, Y, L] float32."""
    graphdef, state = nnx.split(model)
    return np.asarray(_all_logprobs(graphdef, state, jnp.asarray(setting.prompt_ids),
                                    jnp.asarray(setting.responses)))


def response_log_probs(model, setting) -> np.ndarray:
    """log pi(y | x) for every prompt and every response: [P, Y] float64, rows normalised."""
    lp = np.sum(token_log_probs(model, setting).astype(np.float64), axis=-1)
    # The enumeration is complete: renormalise away float32 rounding so each row sums to one.
    return lp - _logsumexp(lp)


def _logsumexp(x: np.ndarray) -> np.ndarray:
    top = np.max(x, axis=-1, keepdims=True)
    return top + np.log(np.sum(np.exp(x - top), axis=-1, keepdims=True))


def normalise_log(x: np.ndarray) -> np.ndarray:
    return x - _logsumexp(x)


def exact_calibration(ref_logp: np.ndarray, rewards: np.ndarray) -> np.ndarray:
    """C(x, y) = pi_ref(r < r(y) | x) + pi_ref(y | x) / 2 for tie-free rewards: [P, Y]."""
    p_ref = np.exp(ref_logp)
    order = np.argsort(rewards, axis=-1)
    sorted_p = np.take_along_axis(p_ref, order, axis=-1)
    below = np.cumsum(sorted_p, axis=-1) - sorted_p
    out = np.empty_like(p_ref)
    np.put_along_axis(out, order, below + 0.5 * sorted_p, axis=-1)
    return out


def kl_per_prompt(logp: np.ndarray, ref_logp: np.ndarray) -> np.ndarray:
    """KL(pi(.|x) || pi_ref(.|x)) for each prompt."""
    return np.sum(np.exp(logp) * (logp - ref_logp), axis=-1)


def _served(sorted_p: np.ndarray, procedure: str, n: int) -> np.ndarray:
    """pmf of the served response, responses sorted by reward ascending (last axis)."""
    cdf = np.clip(np.cumsum(sorted_p, axis=-1), 0.0, 1.0)
    prev = np.concatenate([np.zeros_like(cdf[..., :1]), cdf[..., :-1]], axis=-1)
    if procedure == "sampling" or n == 1:
        return sorted_p
    if procedure == "bon":
        return cdf**n - prev**n
    if procedure == "won":
        return (1.0 - prev) ** n - (1.0 - cdf) ** n
    raise ValueError(f"unknown procedure {procedure!r}; choose sampling, bon or won")


def soft_bon_served(p: np.ndarray, u: np.ndarray, n: int, lam: float) -> np.ndarray:
    """pmf of the response soft best-of-N serves: N i.i.d. draws from p, response i served with
    probability softmax(u / lam)_i. With a_y = exp((u_y - 1) / lam) in (0, 1] and 1/x =
    int_0^inf exp(-s x) ds:  q(y) = N p(y) a_y int_0^inf exp(-s a_y) M(s)^(N-1) ds,
    M(s) = sum_z p(z) exp(-s a_z). The integral runs over sigma = log s in [-40, 1/lam + 4]
    (beyond, the integrand is below e^-40 or exp(-e^4)), on unit-width 16-node panels."""
    if n == 1:
        return p
    x, w = np.polynomial.legendre.leggauss(16)
    edges = np.arange(-40.0, 1.0 / lam + 5.0)
    sigma = (edges[:-1, None] + 0.5 * (1.0 + x[None, :])).ravel()
    ws = np.tile(0.5 * w, edges.size - 1) * np.exp(sigma)  # ds = e^sigma d sigma
    a = np.exp((u - 1.0) / lam)  # [..., Y]
    decay = np.exp(-np.exp(sigma)[:, None, None] * a[None])  # [S, ..., Y]
    m = np.einsum("s...y,...y->s...", decay, p)
    inner = np.einsum("s,s...y,s...->...y", ws, decay, m ** (n - 1))
    return n * p * a * inner


def win_rate_per_prompt(logp, ref_logp, rewards, procedure: str = "sampling", n: int = 1,
                        lam: float | None = None) -> np.ndarray:
    """W(T(pi) > T(pi_ref) | x) exactly, for tie-free rewards: [P] (lam: soft_bon's temperature)."""
    order = np.argsort(rewards, axis=-1)
    if procedure == "soft_bon":
        u = exact_calibration(ref_logp, rewards)
        qa = np.take_along_axis(soft_bon_served(np.exp(logp), u, n, lam), order, axis=-1)
        qb = np.take_along_axis(soft_bon_served(np.exp(ref_logp), u, n, lam), order, axis=-1)
    else:
        qa = _served(np.take_along_axis(np.exp(logp), order, axis=-1), procedure, n)
        qb = _served(np.take_along_axis(np.exp(ref_logp), order, axis=-1), procedure, n)
    below_b = np.cumsum(qb, axis=-1) - qb
    return np.sum(qa * (below_b + 0.5 * qb), axis=-1)


def tilted(ref_logp: np.ndarray, phi: np.ndarray, beta: float) -> np.ndarray:
    """log of the KL-regularised optimum pi_ref * exp(Phi / beta) / Z for each prompt."""
    return normalise_log(ref_logp + phi / beta)


def beta_for_kl(ref_logp: np.ndarray, phi: np.ndarray, target_kl: float, tol: float = 1e-10,
                floor: Callable[[np.ndarray, float], np.ndarray] | None = None) -> float:
    """The beta whose optimum has mean KL (over prompts) equal to ``target_kl``: bisection in log beta.

    The optimum's KL falls monotonically as beta grows (from the KL of the argmax to zero). With
    ``floor(phi, beta)`` (a reward floor that moves with beta, as the trainer's does) the optimum
    is that of the floored reward; its log-weights (phi - top) / beta, floored at -nats, still
    fall as beta shrinks, so the KL stays monotone.
    """
    def kl_at(log_beta):
        beta = np.exp(log_beta)
        shaped = phi if floor is None else floor(phi, beta)
        return float(np.mean(kl_per_prompt(tilted(ref_logp, shaped, beta), ref_logp)))

    spread = float(np.max(phi) - np.min(phi))
    if not spread > 0:
        raise ValueError("the transformed reward is constant: no beta gives a positive KL")
    lo, hi = np.log(spread) - 40.0, np.log(spread) + 20.0
    if kl_at(lo) < target_kl:
        raise ValueError(f"target KL {target_kl} exceeds the largest reachable KL {kl_at(lo):.3f}")
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if kl_at(mid) > target_kl:
            lo = mid
        else:
            hi = mid
        if hi - lo < tol:
            break
    return float(np.exp(0.5 * (lo + hi)))
