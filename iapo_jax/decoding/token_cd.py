"""Token-level controlled decoding (CD paper, algorithms.md section 5).

At each step take the top-k tokens z of pi_ref (after temperature), score every extended prefix
[x, y^t, z] with the prefix scorer(s) in one batched call, and sample

    z ~ pi_ref(z | x, y^t) * exp(lambda * V([x, y^t, z]))   restricted to those k tokens,

with the same one-uniform inverse CDF as plain sampling. lambda (per row) and the scorer weights are
traced, so sweeping them never recompiles; lambda = 0 is plain top-k sampling with the same key.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from iapo_jax.decoding.engine import SampleOutput, decode_texts, open_frame, prepare_batch, trimmed_responses
from iapo_jax.decoding.filters import inverse_cdf
from iapo_jax.decoding.loop import DecodeRules, decode
from iapo_jax.decoding.scorers import as_scorer_set, candidate_values, commit_candidates, start_states
from iapo_jax.decoding.settings import FrameConfig, SamplingConfig, resolve_settings


def tilted_choice(kinds, states, weights, lam, k: int, ids, mask):
    """The token-CD pick, in the shape `loop.decode` expects (scorer caches live in state.aux)."""

    def choose(model, logits, s, rules: DecodeRules, u):
        params = rules.params
        scaled = logits / params.temperature[:, None]
        top_vals, top_idx = lax.top_k(scaled, k)
        values, aux = candidate_values(kinds, states, s.aux, ids, mask, s.tokens, s.lengths, s.step,
                                       s.positions, ~s.finished, top_idx)
        tilted = top_vals + lam[:, None] * jnp.einsum("s,sbk->bk", weights, values)
        m = jnp.max(tilted, -1)
        j, mass = inverse_cdf(jnp.exp(tilted - m[:, None]), u)
        j = jnp.where(params.greedy, jnp.argmax(tilted, -1), j).astype(jnp.int32)
        tok = jnp.take_along_axis(top_idx, j[:, None], 1)[:, 0]
        picked = jnp.take_along_axis(tilted, j[:, None], 1)[:, 0]
        lp = jnp.where(params.greedy, 0.0, picked - m - jnp.log(mass))
        raw = jnp.take_along_axis(logits, tok[:, None], 1)[:, 0] - jax.nn.logsumexp(logits, -1)
        return tok, lp, raw, commit_candidates(kinds, aux, j)

    return choose


@functools.partial(jax.jit, static_argnames=("kinds", "slots", "n"))
def _start_states_jit(kinds, states, ids, mask, *, slots: int, n: int):
    return start_states(kinds, states, ids, mask, slots, n)


@functools.partial(jax.jit, static_argnames=("graphdef", "kinds", "k"), donate_argnames=("ds",))
def token_cd_jit(graphdef, state, ds, rules: DecodeRules, ids, mask, kinds, states, weights, lam, until,
                 *, k: int):
    model = nnx.merge(graphdef, state)
    return decode(model, ds, rules, until, tilted_choice(kinds, states, weights, lam, k, ids, mask))


def token_cd(model, prompts, scorers, *, lam=1.0, k: int = 10, weights=None,
             sampling: SamplingConfig | None = None, frame: FrameConfig | None = None,
             **settings) -> SampleOutput:
    """Token-level CD over the top-k tokens of the base policy.

    lam: scalar or one per prompt (0 = plain top-k sampling). scorers: JAX prefix scorers
    (ValueModel, PrefixFn) or (scorer, weight) pairs; Python scorers would cost a host round trip
    per token and are rejected (use blockwise_cd). Returned logprobs are under the tilted
    distribution that was sampled; raw_logprobs under the unfiltered base policy.
    sampling / frame, or their fields as keywords: see ``decoding.settings`` and ``engine.sample``;
    the candidates are the k most likely tokens, so top_k and top_p do not apply.
    """
    sampling, frame = resolve_settings("token_cd", sampling, frame, settings, unused=("top_k", "top_p"))
    if int(k) < 1:
        raise ValueError(f"k (candidate tokens) must be at least 1, got {k}.")
    k = min(int(k), model.config.vocab_size)
    sset = as_scorer_set(scorers, weights)
    if sset.has_host:
        raise TypeError("token-level CD scores k candidates at every token inside the compiled loop; "
                        "Python scorers cannot run there. Use a ValueModel or PrefixFn, or blockwise_cd.")
    if any(kind == "reward" for kind, _ in sset.kinds):
        raise TypeError("token-level CD needs a prefix scorer (ValueModel or PrefixFn), not a reward model.")
    batch = prepare_batch(model, prompts, sampling, frame)
    rows = batch.ids.shape[0]
    lam_arr = np.asarray(lam, np.float32)
    lam_arr = np.full((batch.real_rows,), lam_arr) if lam_arr.ndim == 0 else lam_arr
    if lam_arr.shape != (batch.real_rows,) or not np.all(np.isfinite(lam_arr)):
        raise ValueError(f"lam must be a finite scalar or one finite value per prompt, got {lam!r}.")
    lam_arr = np.concatenate([lam_arr, np.zeros((rows - batch.real_rows,), np.float32)])
    f = open_frame(model, batch, frame)
    graphdef, state, ds, rules = f.graphdef, f.state, f.ds, f.rules
    sstates = _start_states_jit(sset.kinds, sset.states, batch.ids, batch.mask,
                                slots=batch.ids.shape[1] + batch.response_len, n=k)
    ds = ds.replace(aux=sstates)
    ds = token_cd_jit(graphdef, state, ds, rules, batch.ids, batch.mask, sset.kinds, sset.states,
                      sset.weights, jnp.asarray(lam_arr), batch.response_len, k=k)
    out = SampleOutput(**trimmed_responses(ds, batch.real_rows, batch.max_new_tokens))
    if frame.tokenizer is not None:
        out = out.replace(texts=decode_texts(frame.tokenizer, out.tokens, out.lengths))
    return out
