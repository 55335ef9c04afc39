"""The decoding frame's two settings: a SamplingConfig / FrameConfig gives exactly what the same
keywords give, in every mode, and wrong settings fail before any compute."""

import jax.numpy as jnp
import numpy as np
import pytest

from iapo_jax.decoding.best_of_n import best_of_n
from iapo_jax.decoding.blockwise import blockwise_cd
from iapo_jax.decoding.engine import sample
from iapo_jax.decoding.scorers import PrefixFn
from iapo_jax.decoding.settings import FrameConfig, SamplingConfig, resolve_settings
from iapo_jax.decoding.token_cd import token_cd

PROMPTS = [[5, 6, 7, 8], [9, 10, 11]]
SINES = PrefixFn(lambda ids, mask: jnp.sum(jnp.where(mask, jnp.sin(ids * 1.618 + 0.3), 0.0), -1), "sines")


@pytest.mark.parametrize("mode", ["sample", "best_of_n", "blockwise", "token_cd"])
def test_configs_and_keywords_give_the_same_responses(llama, mode):
    keywords = dict(max_new_tokens=6, temperature=0.7, key=3)
    sampling = SamplingConfig(max_new_tokens=6, temperature=0.7, key=3)
    call = {"sample": lambda **kw: sample(llama, PROMPTS, n=2, **kw),
            "best_of_n": lambda **kw: best_of_n(llama, PROMPTS, SINES, n=3, **kw),
            "blockwise": lambda **kw: blockwise_cd(llama, PROMPTS, SINES, k=2, block_size=2, **kw),
            "token_cd": lambda **kw: token_cd(llama, PROMPTS, SINES, k=4, lam=0.5, **kw)}[mode]
    by_keywords = call(**keywords)
    by_config = call(sampling=sampling, frame=FrameConfig())
    overridden = call(sampling=SamplingConfig(max_new_tokens=6, temperature=0.7, key=99), key=3)
    for out in (by_config, overridden):
        np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(by_keywords.tokens))
        np.testing.assert_array_equal(np.asarray(out.lengths), np.asarray(by_keywords.lengths))


def test_wrong_settings_fail_by_name():
    with pytest.raises(TypeError, match="unexpected keyword.*temprature"):
        resolve_settings("sample", None, None, {"max_new_tokens": 4, "temprature": 0.5})
    with pytest.raises(TypeError, match="needs max_new_tokens"):
        resolve_settings("best_of_n", SamplingConfig(temperature=0.5), None, {})
    with pytest.raises(TypeError, match="does not apply top_p"):
        resolve_settings("token_cd", None, None, {"max_new_tokens": 4, "top_p": 0.9}, unused=("top_k", "top_p"))
    sampling, frame = resolve_settings("sample", None, FrameConfig(chat=False), {"max_new_tokens": [3, 4], "cap": 64})
    assert sampling.max_new_tokens == [3, 4] and frame.cap == 64 and frame.chat is False
