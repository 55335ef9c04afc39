"""Sampling settings, lambda, scorer weights, keys and prompt lengths within a bucket are data:
changing them must not compile anything new. Counted with each jitted function's `_cache_size()`."""

import jax.numpy as jnp

from iapo_jax.decoding import best_of_n as bon_mod
from iapo_jax.decoding import blockwise as bw_mod
from iapo_jax.decoding import engine
from iapo_jax.decoding import token_cd as tcd_mod
from iapo_jax.decoding.scorers import PrefixFn

PROMPTS = [[5, 6, 7, 8], [9, 10, 11]]
SCORE = PrefixFn(lambda ids, mask: jnp.sum(jnp.where(mask, jnp.cos(ids * 0.37), 0.0), -1), "cos")
OTHER = PrefixFn(lambda ids, mask: jnp.sum(mask, -1).astype(jnp.float32), "length")


def _sizes(*fns):
    return [f._cache_size() for f in fns]


def test_sampling_settings_do_not_recompile(llama):
    fns = (engine.start_jit, engine.decode_jit, engine.ref_logprobs_jit)
    engine.sample(llama, PROMPTS, max_new_tokens=6, key=0, ref_model=llama)
    before = _sizes(*fns)
    for kw in [dict(temperature=0.3), dict(top_k=5), dict(top_p=0.5), dict(greedy=True),
               dict(temperature=[0.5, 2.0], top_k=[0, 3], top_p=[0.9, 1.0], greedy=[True, False]),
               dict(key=123), dict(max_new_tokens=[2, 7]), dict(stop_tokens=[[3, 4], [5]])]:
        kw = {"max_new_tokens": 6, **kw}
        engine.sample(llama, PROMPTS, ref_model=llama, **kw)
    # Other prompt lengths in the same prompt bucket, too.
    engine.sample(llama, [[7] * 12, [8]], max_new_tokens=5, ref_model=llama)
    assert _sizes(*fns) == before


def test_best_of_n_lambda_weights_and_blocks_do_not_recompile(llama):
    bon_mod.best_of_n(llama, PROMPTS, [SCORE, OTHER], n=3, max_new_tokens=8, key=0)
    tcd_mod.token_cd(llama, PROMPTS, [SCORE, OTHER], lam=1.0, k=4, max_new_tokens=8, key=0)
    bw_mod.blockwise_cd(llama, PROMPTS, [SCORE, OTHER], k=3, block_size=2, max_new_tokens=8, key=0)
    fns = (bon_mod.best_of_n_jit, tcd_mod.token_cd_jit, bw_mod.block_step_jit, bw_mod.start_states_jit)
    before = _sizes(*fns)
    for i, (lam, weights, temp) in enumerate([(0.0, [1.0, 0.0], 0.5), (5.0, [-2.0, 0.3], 1.5),
                                              ([0.5, 2.0], [0.1, 0.1], 1.0)]):
        bon_mod.best_of_n(llama, PROMPTS, [SCORE, OTHER], weights=weights, n=3, max_new_tokens=8, key=i,
                          temperature=temp, top_p=0.9)
        tcd_mod.token_cd(llama, PROMPTS, [SCORE, OTHER], weights=weights, lam=lam, k=4, max_new_tokens=8,
                         key=i, temperature=temp)
        bw_mod.blockwise_cd(llama, PROMPTS, [SCORE, OTHER], weights=weights, k=3, block_size=2,
                            max_new_tokens=8, key=i, temperature=temp, top_k=7)
    assert _sizes(*fns) == before
