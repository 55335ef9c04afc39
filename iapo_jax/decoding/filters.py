"""Per-call sampling parameters and the one-uniform-per-row token sampler.

Temperature, top-k, top-p and greedy are per-row arrays, so a new value is new data for a compiled
function, never a recompile. Filters follow transformers' order: temperature, then top-k, then top-p
on the renormalised top-k distribution.

Sampling draws ONE uniform per row and inverts the CDF of the (filtered) softmax. At full vocabulary
that is about 5x cheaper on CPU than `jax.random.categorical` (which draws a Gumbel per token), and a
plain `cumsum` over 49k entries is itself slow, so the CDF is built in two levels (block sums, then
one block). Sorting the vocabulary is the slowest piece of all (over a second per step at 64 rows on
a 2-core CPU), so filters use `lax.top_k` over a static `cap` of candidates and fall back to an exact
threshold search only for rows whose kept set may be larger than `cap`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax

DEFAULT_CAP = 256  # candidates that top-k / top-p see on the fast path
_BLOCK = 256  # block length of the two-level CDF


@struct.dataclass
class SamplingParams:
    """Per-row sampling settings; every field is a traced [B] array."""

    temperature: jax.Array  # float32, > 0 (rows with greedy=True ignore it)
    top_k: jax.Array  # int32; 0 = off
    top_p: jax.Array  # float32 in (0, 1]; 1 = off
    greedy: jax.Array  # bool

    @property
    def batch(self) -> int:
        return self.temperature.shape[0]

    def repeat(self, n: int) -> "SamplingParams":
        """Row b -> rows b*n .. b*n+n-1, matching `KVCache.repeat`."""
        return jax.tree.map(lambda x: jnp.repeat(x, n, axis=0), self)


def _per_row(name, value, batch, dtype):
    arr = np.asarray(value)
    if arr.ndim == 0:
        arr = np.full((batch,), arr)
    if arr.shape != (batch,):
        raise ValueError(f"{name} must be a scalar or have one value per row ({batch}), got shape "
                         f"{arr.shape}. Pass a scalar or a length-{batch} sequence.")
    if np.issubdtype(dtype, np.integer) and not np.all(np.equal(np.mod(arr, 1), 0)):
        raise ValueError(f"{name} must be whole numbers, got {value!r}.")
    return arr.astype(dtype)


def sampling_params(batch: int, *, temperature=1.0, top_k=0, top_p=1.0, greedy=False) -> SamplingParams:
    """Validate settings on the host and broadcast them to [batch]; temperature 0 means greedy."""
    temp = _per_row("temperature", temperature, batch, np.float32)
    k = _per_row("top_k", top_k, batch, np.int32)
    p = _per_row("top_p", top_p, batch, np.float32)
    g = _per_row("greedy", greedy, batch, bool)
    if not np.all(np.isfinite(temp)) or np.any(temp < 0):
        raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), got {temperature!r}.")
    if np.any(k < 0):
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k!r}.")
    if not np.all(np.isfinite(p)) or np.any(p <= 0) or np.any(p > 1):
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p!r}.")
    g = g | (temp == 0)
    temp = np.where(temp == 0, 1.0, temp).astype(np.float32)
    return SamplingParams(jnp.asarray(temp), jnp.asarray(k), jnp.asarray(p), jnp.asarray(g))


def _last_positive(w: jax.Array) -> jax.Array:
    """Index of the last strictly positive entry along the last axis (0 if none)."""
    idx = jnp.arange(w.shape[-1])
    return jnp.max(jnp.where(w > 0, idx, 0), axis=-1)


def _prefix_sums(w: jax.Array) -> jax.Array:
    """Inclusive prefix sums along the last axis (n <= a few hundred) as one triangular matmul:
    cheaper to compile and to run on CPU than `cumsum`'s reduce-window lowering."""
    n = w.shape[-1]
    upper = jnp.triu(jnp.ones((n, n), w.dtype))
    return jnp.matmul(w, upper, precision=lax.Precision.HIGHEST)


def inverse_cdf(weights: jax.Array, u: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Draw index i with probability weights[i] / sum(weights), one uniform u in [0, 1) per row.

    weights [B, n] are non-negative and unnormalised. Returns (index [B], total [B]). Rounding can
    only move the pick between neighbours; it never lands on a zero-weight entry.
    """
    b, n = weights.shape
    if n <= _BLOCK:
        cdf = _prefix_sums(weights)
        total = cdf[:, -1]
        i = jnp.sum(cdf <= (u * total)[:, None], axis=-1)
        return jnp.minimum(i, _last_positive(weights)), total
    pad = (-n) % _BLOCK
    blocks = jnp.pad(weights, ((0, 0), (0, pad))).reshape(b, -1, _BLOCK)
    block_mass = blocks.sum(-1)  # [B, nb]
    block_cdf = _prefix_sums(block_mass)
    total = block_cdf[:, -1]
    target = u * total
    blk = jnp.minimum(jnp.sum(block_cdf <= target[:, None], axis=-1), _last_positive(block_mass))
    before = jnp.where(blk > 0, jnp.take_along_axis(block_cdf, jnp.maximum(blk - 1, 0)[:, None], 1)[:, 0], 0.0)
    inside = jnp.take_along_axis(blocks, blk[:, None, None], axis=1)[:, 0]  # [B, BLOCK]
    cdf = _prefix_sums(inside)
    j = jnp.sum(cdf <= (target - before)[:, None], axis=-1)
    j = jnp.minimum(j, _last_positive(inside))
    return blk * _BLOCK + j, total


def _ordered_key(x: jax.Array) -> jax.Array:
    """Map float32 to uint32 so that integer order equals float order (for an exact bisection)."""
    i = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.where(i >> 31 == 1, ~i, i | jnp.uint32(1 << 31))


def _largest_threshold(keys: jax.Array, ok) -> jax.Array:
    """Largest uint32 t per row with ok(t) true; ok must be monotone and true at t = 0."""
    lo = jnp.zeros(keys.shape[:1], jnp.uint32)
    hi = jnp.full(keys.shape[:1], 0xFFFFFFFF, jnp.uint32)

    def body(_, bounds):
        lo, hi = bounds
        gap = hi - lo
        mid = lo + (gap >> 1) + (gap & 1)  # upper middle without overflow
        good = ok(mid)
        return jnp.where(good, mid, lo), jnp.where(good, hi, mid - 1)

    lo, _ = lax.fori_loop(0, 32, body, (lo, hi))  # 32 halvings of a 2**32 range: exact
    return lo


def _threshold_filter(scaled: jax.Array, e: jax.Array, params: SamplingParams) -> jax.Array:
    """Exact top-k / top-p keep-mask over the whole vocabulary without sorting it."""
    v = scaled.shape[-1]
    keys = _ordered_key(scaled)
    k = jnp.where((params.top_k <= 0) | (params.top_k > v), v, params.top_k)
    # top-k: the k-th largest key is the largest t with count(keys >= t) >= k.
    tk = _largest_threshold(keys, lambda t: jnp.sum(keys >= t[:, None], -1) >= k)
    in_k = keys >= tk[:, None]
    mass_k = jnp.sum(jnp.where(in_k, e, 0.0), -1)
    # top-p: the smallest head of the top-k distribution with mass >= p.
    need = params.top_p * mass_k
    tp = _largest_threshold(
        keys, lambda t: jnp.sum(jnp.where(in_k & (keys >= t[:, None]), e, 0.0), -1) >= need)
    return in_k & (keys >= tp[:, None])


def _topc_filter(top_vals, params: SamplingParams, full_mass, m, vocab: int):
    """Keep-mask over the top-`cap` candidates (sorted descending) and, per row, whether that mask
    is the exact filter (the kept set fits inside the candidates)."""
    cap = top_vals.shape[-1]
    rank = jnp.arange(cap)[None, :]
    k_on = (params.top_k > 0) & (params.top_k <= cap)
    k_off = (params.top_k <= 0) | (params.top_k >= vocab)
    keep = jnp.where(k_on[:, None], rank < params.top_k[:, None], True)
    w = jnp.where(keep, jnp.exp(top_vals - m[:, None]), 0.0)
    mass = jnp.where(k_on, w.sum(-1), full_mass)  # normaliser of the top-k distribution
    before = _prefix_sums(w) - w
    keep = keep & (before < (params.top_p * mass)[:, None])
    exact = k_on | (k_off & (w.sum(-1) >= params.top_p * full_mass))
    return keep, exact


def sample_next(logits: jax.Array, params: SamplingParams, u: jax.Array, *, cap: int = DEFAULT_CAP):
    """Sample one token per row.

    logits [B, V] (any float dtype), u [B] uniforms in [0, 1). Returns (token [B] int32,
    logprob [B] under the sampling policy after temperature and filters (0 for greedy rows),
    raw_logprob [B] under the unfiltered temperature-1 softmax).
    """
    logits = logits.astype(jnp.float32)
    b, v = logits.shape
    cap = min(cap, v)
    scaled = logits / params.temperature[:, None]
    m = jnp.max(scaled, -1)
    e = jnp.exp(scaled - m[:, None])
    full_idx, full_mass = inverse_cdf(e, u)
    full_lse = m + jnp.log(full_mass)
    has_filter = ((params.top_k > 0) & (params.top_k < v)) | (params.top_p < 1)

    def unfiltered():
        return full_idx, full_lse

    def filtered():
        top_vals, top_idx = lax.top_k(scaled, cap)
        keep, exact = _topc_filter(top_vals, params, full_mass, m, v)
        exact = exact | ~has_filter

        def fast():
            w = jnp.where(keep, jnp.exp(top_vals - m[:, None]), 0.0)
            j, mass = inverse_cdf(w, u)
            return jnp.take_along_axis(top_idx, j[:, None], 1)[:, 0], m + jnp.log(mass)

        def exact_search():
            kept = _threshold_filter(scaled, e, params)
            idx, mass = inverse_cdf(jnp.where(kept, e, 0.0), u)
            return idx, m + jnp.log(mass)

        if cap >= v:  # the candidates are the whole vocabulary: always exact
            idx, lse = fast()
        else:
            idx, lse = lax.cond(jnp.all(exact), fast, exact_search)
        return jnp.where(has_filter, idx, full_idx), jnp.where(has_filter, lse, full_lse)

    idx, lse = lax.cond(jnp.any(has_filter), filtered, unfiltered)
    # Greedy rows take the argmax; skipped (one pass over the vocabulary) when no row is greedy.
    idx = lax.cond(jnp.any(params.greedy), lambda: jnp.where(params.greedy, jnp.argmax(logits, -1), idx),
                   lambda: idx).astype(jnp.int32)
    picked_scaled = jnp.take_along_axis(scaled, idx[:, None], 1)[:, 0]
    logprob = jnp.where(params.greedy, 0.0, picked_scaled - lse)
    # Temperature 1 reuses the normaliser already computed; otherwise one more pass over the vocab.
    raw_lse = lax.cond(jnp.all(params.temperature == 1.0), lambda: full_lse,
                       lambda: jax.nn.logsumexp(logits, -1))
    raw_logprob = jnp.take_along_axis(logits, idx[:, None], 1)[:, 0] - raw_lse
    return idx, logprob, raw_logprob
