"""Prefix scorers: CD-Q candidate states, exact vs top-k targets, FUDGE / CD-Q learning, decoding.

Candidate states are checked against plain full forward passes of explicitly built sequences.
Learning uses rollouts whose reward is fixed by the prompt (+1 or -1), so the true value of every
prefix is known (it equals the reward) and a constant predictor scores MSE 1: FUDGE must regress
it, CD-Q must propagate it from the final prefix back through its Bellman targets.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from iapo_jax.alignment import losses
from iapo_jax.alignment import prefix_scorer as ps
from iapo_jax.alignment.prefix_rollouts import (
    Rollouts,
    check_rollouts,
    concat_rollouts,
    load_rollouts,
    save_rollouts,
)
from iapo_jax.alignment.prefix_scorer_eval import mse_by_prefix_length
from iapo_jax.models import ValueModel, load_model
from iapo_jax.rewards.head_checkpoints import load_head_model, write_spec
from iapo_jax.models.finetune import head_of, project
from iapo_jax.runtime.checkpointing import Checkpointer

P, R = 12, 8


@pytest.fixture(scope="module")
def base(tiny_chat_llama_dir):
    return load_model(tiny_chat_llama_dir)


def prompt_valued_rollouts(rows, seed):
    """4 prompts with values +1, -1, +1, -1; random responses of random length; reward = value."""
    rng = np.random.default_rng(seed)
    prompts = np.random.default_rng(123).integers(0, 128, (4, P)).astype(np.int32)
    which = np.arange(rows) % 4
    mask = np.ones((rows, P), bool)
    mask[which == 1, :3] = False  # one prompt is shorter (left-padded)
    return Rollouts(prompt_ids=prompts[which], prompt_mask=mask,
                    tokens=rng.integers(0, 128, (rows, R)).astype(np.int32),
                    lengths=rng.integers(2, R + 1, rows).astype(np.int32),
                    rewards=np.array([1.0, -1.0, 1.0, -1.0], np.float32)[which])


@pytest.fixture(scope="module")
def data():
    return prompt_valued_rollouts(128, 0), prompt_valued_rollouts(32, 1)


def test_candidate_values_exact_and_top_vocabulary_targets_and_brute_force(base):
    """One compiled program: pi_ref's exact next-token distribution and its top-V truncation (the
    same tokens in another order), the values of every candidate continuation through the KV-cache
    scan, and the plain forward passes they must equal."""
    vocab = base.config.vocab_size
    vm = ValueModel.from_policy(base, nnx.Rngs(0), head_init_std=0.3)
    head = head_of(nnx.state(vm))
    r = prompt_valued_rollouts(3, 5)
    seq = jnp.concatenate([r.prompt_ids, r.tokens], 1)
    full_mask = jnp.concatenate([r.prompt_mask, np.ones_like(r.tokens, bool)], 1)

    @jax.jit
    def compute(prompt_ids, prompt_mask, tokens, lengths):
        exact_ids, exact_p = ps.next_token_distribution(base, prompt_ids, prompt_mask, tokens, lengths, None)
        top_ids, top_p = ps.next_token_distribution(base, prompt_ids, prompt_mask, tokens, lengths, vocab)
        h_cand, h_next = ps.candidate_hidden(vm.backbone, prompt_ids, prompt_mask, tokens, lengths,
                                             jnp.concatenate([exact_ids, top_ids], axis=-1))
        values = project(head, h_cand)
        logits = base(seq, full_mask)[:, P - 1:P - 1 + R]
        return (exact_p, top_p, values[..., :vocab], values[..., vocab:], h_cand[..., :vocab, :], h_next,
                ps.prefix_hidden(vm.backbone, prompt_ids, prompt_mask, tokens, lengths), logits, top_ids)

    exact_p, top_p, v_exact, v_top, h_exact, h_next, h_prefix, logits, top_ids = compute(
        r.prompt_ids, r.prompt_mask, r.tokens, r.lengths)
    real = np.arange(R)[None] < np.asarray(r.lengths)[:, None]
    # pi_ref's exact distribution is the softmax of the policy's own logits (in vocabulary order).
    np.testing.assert_allclose(np.asarray(exact_p)[real], np.asarray(jax.nn.softmax(logits, -1))[real], atol=1e-6)
    # CD-Q targets: the exact expectation and top-k with k = vocabulary agree.
    _, is_last = ps.prefix_masks(r.lengths, R)
    targets = [np.asarray(losses.cd_q_targets(ps.pad_last_prefix(v), ps.pad_last_prefix(p), jnp.asarray(r.rewards),
                                              is_last)) for v, p in ((v_exact, exact_p), (v_top, top_p))]
    np.testing.assert_allclose(targets[1], targets[0], atol=1e-5)
    assert not np.array_equal(np.asarray(top_ids)[0, 0], np.arange(vocab))  # really another order
    # Copy 0 of the scan follows the real response: its states are the full pass's prefix states.
    np.testing.assert_allclose(np.asarray(h_next)[real], np.asarray(h_prefix)[:, 1:][real], atol=1e-5)
    # Brute force: [prompt, y_1..y_t, z] as ordinary sequences, last position's state.
    picks = [(0, 0, 7), (0, 1, 100), (1, 2, 33), (2, 0, 135)]
    seqs = []
    for b, t, z in picks:
        prompt = np.asarray(r.prompt_ids[b])[np.asarray(r.prompt_mask[b])]
        seqs.append(np.concatenate([prompt, np.asarray(r.tokens[b, :t]), [z]]))
    width = max(len(x) for x in seqs)
    ids = np.stack([np.pad(x, (width - len(x), 0)) for x in seqs]).astype(np.int32)
    mask = np.stack([np.arange(width) >= width - len(x) for x in seqs])
    last = jax.jit(lambda i, m: vm.backbone.hidden(i, m)[:, -1])(ids, mask)
    want = np.stack([np.asarray(h_exact[b, t, z]) for b, t, z in picks])
    np.testing.assert_allclose(np.asarray(last), want, atol=1e-5)


@pytest.fixture(scope="module")
def fudge_trainer(base, data):
    train, held_out = data
    cfg = ps.ScorerTrainConfig(method="fudge", mode="head", steps=200, batch_size=32, learning_rate=5e-2,
                               warmup_steps=5, eval_batch_size=32)
    trainer = ps.PrefixScorerTrainer(cfg, ValueModel.from_policy(base, nnx.Rngs(0)), train, held_out)
    before = trainer.evaluate()
    trainer.train()
    return trainer, before


def test_fudge_learns_known_prefix_values(fudge_trainer):
    trainer, before = fudge_trainer
    after = trainer.evaluate(edges=(0, 1, 4))
    assert before["mse"] == pytest.approx(1.0) and after["baseline_mse"] == pytest.approx(1.0, abs=0.02)
    assert after["mse"] < 0.3, after  # known answer V = +-1 everywhere; a constant scores 1
    assert all(b["mse"] < 0.5 for b in after["buckets"]), after["buckets"]


def test_cdq_learns_known_prefix_values_by_bootstrapping(base, data):
    train, held_out = data
    cfg = ps.ScorerTrainConfig(method="cdq", top_k=8, mode="head", steps=200, batch_size=32,
                               learning_rate=5e-2, warmup_steps=5, eval_batch_size=32)
    trainer = ps.PrefixScorerTrainer(cfg, ValueModel.from_policy(base, nnx.Rngs(0)), train, held_out,
                                     reference=base)
    assert trainer.evaluate()["mse"] == pytest.approx(1.0)
    trainer.train()
    after = trainer.evaluate()
    # Only final prefixes see the reward; the empty prefix (t = 0) learns it through the targets.
    assert after["mse"] < 0.5, after
    assert after["buckets"][0]["mse"] < 0.5, after["buckets"]


def test_decoding_engine_scores_prefixes_as_training_does(fudge_trainer, data):
    """Blockwise CD scores each block through the engine's cached scorer path; it must report the
    values the scorer was trained on (same prompt layout, positions and prefix indexing)."""
    from iapo_jax.decoding.scorers import as_scorer_set, block_scores, start_states

    trainer, _ = fudge_trainer
    scorer = trainer.current_model()
    _, held_out = data
    r = held_out.take(np.arange(6))
    sset = as_scorer_set(scorer)

    @jax.jit
    def engine_values(states, ids, mask, tokens, lengths):
        ss = start_states(sset.kinds, states, ids, mask, P + R, 1)
        out = []
        for start in (0, 4):  # during decoding a row's length never runs past the current block
            v, ss = block_scores(sset.kinds, states, ss, ids, mask, tokens, jnp.minimum(lengths, start + 4),
                                 start, 4)
            out.append(v[0])
        return jnp.stack(out, 1)

    got = engine_values(sset.states, r.prompt_ids, r.prompt_mask, r.tokens, r.lengths)
    values = trainer.values(r)
    ends = np.minimum(np.asarray(r.lengths)[:, None], np.array([[4, 8]]))  # prefix length after each block
    np.testing.assert_allclose(np.asarray(got), np.take_along_axis(values, ends, 1), atol=1e-4)


def test_checkpoint_round_trip_and_reload_as_a_prefix_scorer(base, data, tmp_path, tiny_chat_llama_dir):
    train, held_out = data
    cfg = ps.ScorerTrainConfig(method="fudge", mode="head", steps=4, batch_size=8, learning_rate=1e-2,
                               eval_batch_size=32)
    with Checkpointer(tmp_path / "checkpoints", handle_sigterm=False) as ckpt:
        trainer = ps.PrefixScorerTrainer(cfg, ValueModel.from_policy(base, nnx.Rngs(0)), train, held_out,
                                         checkpointer=ckpt)
        trainer.train()
        fresh = ps.PrefixScorerTrainer(cfg, ValueModel.from_policy(base, nnx.Rngs(0)), train, held_out,
                                       checkpointer=ckpt)
        assert fresh.restore() == 4
    np.testing.assert_array_equal(fresh.values(held_out), trainer.values(held_out))
    write_spec(tmp_path, kind="value", base=str(tiny_chat_llama_dir), finetune=cfg.finetune, step=4)
    model, _, _ = load_head_model(tmp_path, kind="value")
    np.testing.assert_allclose(np.asarray(head_of(nnx.state(model))["head"]),
                               np.asarray(trainer.trainable["head"]), atol=0)


def test_rollouts_are_checked_and_round_trip(tmp_path):
    r = prompt_valued_rollouts(4, 0)
    path = save_rollouts(tmp_path / "r.npz", r)
    back = load_rollouts(path)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(r)):
        np.testing.assert_array_equal(a, b)
    short = Rollouts(r.prompt_ids[:, 4:], r.prompt_mask[:, 4:], r.tokens, r.lengths, r.rewards)
    both = concat_rollouts([r, short])
    assert both.prompt_ids.shape == (8, P) and not both.prompt_mask[4:, :4].any()
    with pytest.raises(ValueError, match="NaN"):
        check_rollouts(r.replace(rewards=np.array([1, np.nan, 0, 0], np.float32)))
    with pytest.raises(ValueError, match="lengths"):
        check_rollouts(r.replace(lengths=np.array([1, 2, 3, R + 1], np.int32)))
    right_padded = r.prompt_mask.copy()
    right_padded[0, -1] = False
    with pytest.raises(ValueError, match="left-padded"):
        check_rollouts(r.replace(prompt_mask=right_padded))


def test_mse_by_prefix_length_on_a_hand_example():
    values = np.array([[0.0, 1.0, 1.0, 9.0], [2.0, 2.0, 0.0, 0.0]])
    rewards, lengths = np.array([1.0, 0.0]), np.array([2, 1])
    out = mse_by_prefix_length(values, rewards, lengths, edges=(0, 1, 2))
    # real prefixes: row 0 t=0..2 -> errors 1, 0, 0; row 1 t=0..1 -> 4, 4
    assert out["prefixes"] == 5 and out["mse"] == pytest.approx(9 / 5)
    assert [(b["t_from"], b["prefixes"], b["mse"]) for b in out["buckets"]] == [(0, 2, 2.5), (1, 2, 2.0), (2, 1, 0.0)]
    assert out["baseline_mse"] == pytest.approx((3 * 0.25 + 2 * 0.25) / 5)
    with pytest.raises(ValueError, match="edges"):
        mse_by_prefix_length(values, rewards, lengths, edges=(1, 2))


def test_bad_scorer_settings_are_rejected(base, data):
    train, _ = data
    vm = ValueModel.from_policy(base, nnx.Rngs(0))
    with pytest.raises(ValueError, match="reference"):
        ps.PrefixScorerTrainer(ps.ScorerTrainConfig(method="cdq"), vm, train)
    with pytest.raises(ValueError, match="method"):
        ps.PrefixScorerTrainer(ps.ScorerTrainConfig(method="td"), vm, train)
    with pytest.raises(ValueError, match="top_k"):
        ps.PrefixScorerTrainer(ps.ScorerTrainConfig(method="cdq", top_k=0), vm, train, reference=base)
    with pytest.raises(TypeError, match="ValueModel"):
        ps.PrefixScorerTrainer(ps.ScorerTrainConfig(), base, train)


class FirstCharacterParity:
    """+1 when the response's first character has an even code, -1 when odd, 0 when empty."""

    name = "first_character_parity"

    def score(self, prompts, responses):
        return np.array([0.0 if not r else (1.0 if ord(r[0]) % 2 == 0 else -1.0) for r in responses],
                        np.float32)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fudge", "cdq"])
def test_full_fine_tuning_learns_first_token_values(base, tiny_chat_llama_dir, method):
    """On-policy rollouts (pi_ref's top 8, which CD-Q also bootstraps over), reward = the first
    response character's parity: V = that sign for every t >= 1, which takes attention to learn."""
    from iapo_jax.alignment.prefix_rollouts import sample_rollouts
    from iapo_jax.models import load_tokenizer

    tok = load_tokenizer(tiny_chat_llama_dir, model=base)
    prompts = ["Hi", "Yo?", "Hm.", "Ok!"]
    r, _, _ = sample_rollouts(base, tok, prompts * 40, FirstCharacterParity(), n=4, max_new_tokens=R,
                              key=0, top_k=8, prompts_per_batch=40)
    train, held_out = r.take(np.arange(576)), r.take(np.arange(576, 640))
    cfg = ps.ScorerTrainConfig(method=method, top_k=8, mode="full", steps=200, batch_size=32,
                               learning_rate=3e-3, warmup_steps=10)
    trainer = ps.PrefixScorerTrainer(cfg, ValueModel.from_policy(base, nnx.Rngs(0)), train, held_out,
                                     reference=base)
    trainer.train()
    after = trainer.evaluate(edges=(0, 1, 2, R))
    later = [b for b in after["buckets"] if b["t_from"] >= 1]
    assert all(b["mse"] < 0.5 * b["baseline_mse"] for b in later), after["buckets"]


def test_train_scorer_rejects_bad_options_before_loading_anything():
    from iapo_jax.commands.job_inputs import JobInputError
    from iapo_jax.commands.train_scorer import TrainScorerConfig, check_config

    for bad, match in ((dict(cd_k=0), "cd-k"), (dict(top_k=-1), "top-k"), (dict(method="fudge", top_k=3), "CD-Q"),
                       (dict(bucket_edges=(1, 4)), "bucket-edges"), (dict(block_size=0), "block-size"),
                       (dict(mode="lora", lora_rank=0), "lora_rank")):
        with pytest.raises(JobInputError, match=match):
            check_config(TrainScorerConfig(**bad))


@pytest.mark.slow
def test_train_scorer_job_trains_evaluates_and_the_scorer_decodes(tiny_chat_llama_dir, tmp_path):
    from iapo_jax.commands import load_job
    from iapo_jax.commands.common import run_job
    from iapo_jax.commands.job_inputs import load_prefix_scorer
    from iapo_jax.commands.train_scorer import TrainScorerConfig

    cfg = TrainScorerConfig(model=str(tiny_chat_llama_dir), reward="length", method="cdq", top_k=4,
                            num_prompts=4, samples_per_prompt=2, eval_prompts=3, eval_samples=2,
                            max_new_tokens=8, steps=5, batch_size=4, mode="head", eval_every=0,
                            cd_k=2, block_size=4, cd_samples=1, reference_samples=2, bootstrap=100)
    ctx = run_job(load_job("train-scorer"), cfg, run_dir=tmp_path / "sc")
    m = ctx.record.data["metrics"]
    assert m["train_rollouts"] == 8 and m["eval_rollouts"] == 6 and m["steps"] == 5
    assert 0 <= m["blockwise_ci_low"] <= m["blockwise_win_rate"] <= m["blockwise_ci_high"] <= 1
    assert "eval_mse_t0_1" in m and m["blockwise_kl_bound_mean"] > 0
    scorer = load_prefix_scorer(tmp_path / "sc", load_model(tiny_chat_llama_dir))
    assert isinstance(scorer, ValueModel)


@pytest.mark.slow
def test_trained_scorer_drives_blockwise_cd_with_the_values_it_was_trained_on(base, fudge_trainer):
    from iapo_jax.decoding.blockwise import blockwise_cd

    trainer, _ = fudge_trainer
    scorer = trainer.current_model()
    prompts = [[72, 105, 33], [79, 107, 63, 33, 32]]
    out = blockwise_cd(base, prompts, scorer, k=2, block_size=4, max_new_tokens=8, key=3)
    # Re-score the decoded responses the way training scores rollouts.
    width = 16  # the prompt bucket blockwise_cd used
    ids = np.stack([np.pad(p, (width - len(p), 0)) for p in prompts]).astype(np.int32)
    mask = np.stack([np.arange(width) >= width - len(p) for p in prompts])
    values = ps.prefix_values(scorer, jnp.asarray(ids), jnp.asarray(mask), out.tokens, out.lengths)
    final = np.take_along_axis(np.asarray(values), np.asarray(out.lengths)[:, None], 1)[:, 0]
    np.testing.assert_allclose(np.asarray(out.scores), final, atol=1e-4)
