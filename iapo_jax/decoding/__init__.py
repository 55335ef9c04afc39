"""Compiled decoding: sampling, best-of-N / worst-of-N, blockwise and token-level controlled decoding.

Import from the modules (the package re-exports nothing, so that `best_of_n` and `token_cd` stay
modules rather than being shadowed by their functions):

    from iapo_jax.decoding.engine import sample, generate
    from iapo_jax.decoding.sampler import Sampler       # one method per mode below
    from iapo_jax.decoding.best_of_n import best_of_n
    from iapo_jax.decoding.blockwise import blockwise_cd
    from iapo_jax.decoding.token_cd import token_cd
    from iapo_jax.decoding.scorers import PrefixFn

    out = sample(model, ["Hi!"], tokenizer=tok, max_new_tokens=32, temperature=0.7, top_p=0.9)
"""
