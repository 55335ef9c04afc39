"""Early-pruned best-of-N: survivors are full best-of-N's own branches, pruning keeps the top of a
prefix score, the compute count, and bad schedules rejected before any compute."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from iapo_jax.decoding.best_of_n import best_of_n
from iapo_jax.decoding.pruned_best_of_n import PruneSchedule, pruned_best_of_n
from iapo_jax.decoding.scorers import PrefixFn

N, R = 8, 12
PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16, 17]]


def _sines(ids, mask):
    return jnp.sum(jnp.where(mask, jnp.sin(ids.astype(jnp.float32) * 1.618 + 0.3), 0.0), -1)


def _cosines(ids, mask):
    return jnp.sum(jnp.where(mask, jnp.cos(ids.astype(jnp.float32) * 0.7), 0.0), -1)


REWARD = PrefixFn(_sines, "sines")
PREFIX = PrefixFn(_cosines, "cosines")  # deliberately not the reward: pruning can lose the best


def _np_score(fn, prompt, tokens):
    seq = np.asarray(list(prompt) + list(tokens), np.float32)
    return float(fn(jnp.asarray(seq)[None], jnp.ones((1, len(seq)), bool))[0])


@pytest.fixture(scope="module")
def full(llama):
    return best_of_n(llama, PROMPTS, REWARD, n=N, max_new_tokens=R, key=4)


def test_no_schedule_is_full_best_of_n(llama, full):
    out = pruned_best_of_n(llama, PROMPTS, REWARD, PREFIX, n=N, schedule="none", max_new_tokens=R, key=4)
    np.testing.assert_array_equal(out.tokens, full.tokens)
    np.testing.assert_array_equal(out.lengths, full.lengths)
    np.testing.assert_allclose(out.scores, full.scores, atol=1e-5)
    np.testing.assert_array_equal(out.chosen, full.chosen)
    np.testing.assert_array_equal(out.branch, np.tile(np.arange(N), (3, 1)))
    np.testing.assert_array_equal(out.generated_tokens, np.asarray(full.lengths).sum(1))


def test_survivors_are_full_branches_chosen_by_the_prefix_score(llama, full):
    """Two checkpoints: after 3 tokens keep 4 of 8, after 6 keep 2. Every survivor must equal full
    best-of-N's branch of the same index, the kept branches must be the top of the prefix score
    recomputed from full best-of-N's own tokens, and the served one the best survivor."""
    out = pruned_best_of_n(llama, PROMPTS, REWARD, PREFIX, n=N, schedule="3:4,6:2", max_new_tokens=R,
                           key=4)
    assert out.tokens.shape == (3, 2, R) and out.branch.shape == (3, 2)
    full_tokens, full_len = np.asarray(full.tokens), np.asarray(full.lengths)
    branch = np.asarray(out.branch)
    for b, prompt in enumerate(PROMPTS):
        np.testing.assert_array_equal(np.asarray(out.tokens)[b], full_tokens[b, branch[b]])
        alive = np.arange(N)
        for cols, keep, logged in zip((3, 6), (4, 2), out.prefix_scores):
            pre = np.array([_np_score(_cosines, prompt, full_tokens[b, i, :min(cols, full_len[b, i])])
                            for i in alive])
            np.testing.assert_allclose(np.asarray(logged)[b], pre, atol=1e-4)
            alive = np.sort(alive[np.argsort(-pre, kind="stable")[:keep]])
        np.testing.assert_array_equal(branch[b], alive)
    scores = np.asarray(out.scores)
    np.testing.assert_array_equal(out.chosen, scores.argmax(1))
    np.testing.assert_allclose(scores, np.take_along_axis(np.asarray(full.scores), branch, 1), atol=1e-5)
    gen = np.asarray(out.generated_tokens)
    assert np.all(gen <= full_len.sum(1)) and np.all(gen >= np.asarray(out.lengths).sum(1))
    steps_full = R * 3 * N
    assert out.decoded_rows <= 3 * (3 * N + 3 * 4 + (R - 6) * 2) < steps_full


def test_generated_tokens_count_each_branch_up_to_its_pruning(llama, full):
    out = pruned_best_of_n(llama, PROMPTS, REWARD, PREFIX, n=N, schedule="5:3", max_new_tokens=R, key=4)
    full_len = np.asarray(full.lengths)
    branch = np.asarray(out.branch)
    for b in range(3):
        kept = set(branch[b].tolist())
        expect = sum(full_len[b, i] if i in kept else min(full_len[b, i], 5) for i in range(N))
        assert out.generated_tokens[b] == expect


def test_worst_of_n_prunes_the_highest(llama):
    full = best_of_n(llama, PROMPTS, REWARD, n=N, max_new_tokens=R, key=5, worst=True)
    out = pruned_best_of_n(llama, PROMPTS, REWARD, REWARD, n=N, schedule="4:2", max_new_tokens=R, key=5,
                           worst=True)
    pre = np.asarray(out.prefix_scores[0])
    branch = np.asarray(out.branch)
    for b in range(3):
        np.testing.assert_array_equal(branch[b], np.sort(np.argsort(pre[b], kind="stable")[:2]))
    np.testing.assert_array_equal(out.chosen, np.asarray(out.scores).argmin(1))
    np.testing.assert_array_equal(out.best_tokens,
                                  np.asarray(full.tokens)[np.arange(3), np.asarray(out.best_branch)])


class CharTokenizer:
    eos_token_id = 2
    chat_template = None

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(0x100 + int(i)) for i in ids)


def test_python_prefix_scorer_on_partial_text_equals_jax_path(llama):
    """The reward on the partial text (a host scorer) prunes exactly as the same JAX function."""

    def on_text(prompts, responses):  # the prompt adds a constant per prompt, so it is left out
        return [float(np.sum(np.cos(np.array([ord(c) - 0x100 for c in r], np.float32) * 0.7)))
                for r in responses]

    a = pruned_best_of_n(llama, PROMPTS, REWARD, PREFIX, n=N, schedule="4:3", max_new_tokens=R, key=6)
    b = pruned_best_of_n(llama, PROMPTS, REWARD, on_text, n=N, schedule="4:3", max_new_tokens=R, key=6,
                         tokenizer=CharTokenizer())
    np.testing.assert_array_equal(a.branch, b.branch)
    np.testing.assert_array_equal(a.tokens, b.tokens)


def test_value_model_prefix_scorer_on_its_cache_equals_a_fresh_forward(llama):
    """A value model reads only the new columns at each checkpoint (its prompt prefilled once per
    prompt); its values must equal the value model run from scratch on prompt + prefix."""
    from iapo_jax.decoding.scorers import as_scorer_set, final_scores
    from iapo_jax.models.heads import ValueModel

    value = ValueModel.from_policy(llama, nnx.Rngs(0), head_init_std=1.0)
    full = best_of_n(llama, PROMPTS, REWARD, n=4, max_new_tokens=8, key=1)
    out = pruned_best_of_n(llama, PROMPTS, REWARD, value, n=4, schedule="2:3,5:2", max_new_tokens=8, key=1)
    sset = as_scorer_set(value)
    full_tokens, full_len = np.asarray(full.tokens), np.asarray(full.lengths)
    alive = [np.arange(4)] * 3
    for cols, keep, logged in zip((2, 5), (3, 2), out.prefix_scores):
        for b, prompt in enumerate(PROMPTS):
            rows = alive[b]
            n = len(rows)
            ids = jnp.asarray([prompt] * n, jnp.int32)
            fresh = final_scores(sset.kinds, sset.states, ids, jnp.ones_like(ids, bool),
                                 jnp.asarray(full_tokens[b, rows, :cols]), jnp.minimum(full_len[b, rows], cols))[0]
            np.testing.assert_allclose(np.asarray(logged)[b], fresh, atol=1e-4)
            alive[b] = np.sort(rows[np.argsort(-np.asarray(logged)[b], kind="stable")[:keep]])
    np.testing.assert_array_equal(out.branch, np.stack(alive))


@pytest.mark.slow
def test_sharded_equals_unsharded(llama):
    from jax.sharding import Mesh

    mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
    a = pruned_best_of_n(llama, PROMPTS, REWARD, PREFIX, n=N, schedule="3:4,6:2", max_new_tokens=R, key=4)
    b = pruned_best_of_n(llama, PROMPTS, REWARD, PREFIX, n=N, schedule="3:4,6:2", max_new_tokens=R, key=4,
                         mesh=mesh)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.branch, b.branch)
    np.testing.assert_array_equal(a.chosen, b.chosen)


def test_schedule_from_fractions():
    s = PruneSchedule.from_fractions(16, [8, 16, 24], 0.5)
    assert s == PruneSchedule((8, 16, 24), (8, 4, 2)) and str(s) == "8:8,16:4,24:2"
    assert PruneSchedule.from_fractions(3, [4], 0.1).keep == (1,)


@pytest.mark.parametrize(
    "schedule, message",
    [
        ("8:0", "at least 1 branch"),
        ("4:2,8:3", "must not grow"),
        ("4:9", "must not grow"),
        ("8:4,4:2", "increasing"),
        ("0:4", "increasing"),
        ("12:4", "not before the response length 12"),
        ("20:2", "not before the response length"),
        ("8-4", "not TOKENS:KEEP"),
        ("8:4,", "not TOKENS:KEEP"),
    ],
)
def test_bad_schedules_before_compute(llama, schedule, message, monkeypatch):
    from iapo_jax.decoding import engine
    from iapo_jax.decoding import pruned_best_of_n as mod

    def no_compute(*a, **k):
        raise AssertionError("compute started before validation")

    monkeypatch.setattr(engine, "start_jit", no_compute)
    monkeypatch.setattr(mod, "prepare_batch", no_compute)
    with pytest.raises(ValueError, match=message):
        pruned_best_of_n(llama, PROMPTS, REWARD, PREFIX, n=N, schedule=schedule, max_new_tokens=R)
