"""Bradley-Terry reward models: pairs, tokenisation, the reward adapter, training, checkpoints.

Learning is checked on a synthetic preference with a known answer: responses are random strings
and the chosen one has more vowels (held-out accuracy is measured against that rule, on pairs the
model never saw). The adapter is checked against the model's own score of hand-built token rows.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from iapo_jax.alignment.optimizer import OptimizerConfig, make_optimizer
from iapo_jax.alignment.reward_model_training import (
    RewardModelTrainer,
    RewardTrainConfig,
    encode_preference_splits,
    pooled_features,
)
from iapo_jax.models import RewardModel, load_model, load_tokenizer
from iapo_jax.models.finetune import Finetune, head_of, project
from iapo_jax.rewards.head_checkpoints import (
    HeadModelError,
    load_head_model,
    write_spec,
)
from iapo_jax.rewards.preference_pairs import (
    Preference,
    load_pairs,
    pairs_from_scores,
    save_pairs,
)
from iapo_jax.rewards.registry import get_reward
from iapo_jax.rewards.reward_model import JaxRewardModel, score_arrays, sequence_ids
from iapo_jax.runtime.checkpointing import Checkpointer

LETTERS = np.array(list("abcdefghijklmnop"))


@pytest.fixture(scope="module")
def chat(tiny_chat_llama_dir):
    model = load_model(tiny_chat_llama_dir)
    return model, load_tokenizer(tiny_chat_llama_dir, model=model)


def vowel_pairs(n, seed):
    """n prompts, two random 8-letter responses each; the one with more vowels is chosen."""
    rng = np.random.default_rng(seed)
    prompts = [f"q{i}" for i in range(n)]
    responses = [["".join(rng.choice(LETTERS, 8)) for _ in range(2)] for _ in range(n)]
    scores = np.array([[sum(c in "aeio" for c in r) for r in row] for row in responses], float)
    return pairs_from_scores(prompts, responses, scores)[0]


@pytest.fixture(scope="module")
def vowel_data(chat):
    _, tok = chat
    (train, held_out), _ = encode_preference_splits(tok, [vowel_pairs(320, 0), vowel_pairs(160, 1)], 64)
    return train, held_out


def test_pairs_best_worst_and_all_skip_ties_and_keep_gaps():
    prompts = ["p0", "p1", "p2"]
    responses = [["a", "b", "c"], ["d", "e", "f"], ["g", "h", "i"]]
    scores = [[0.2, 0.9, 0.5], [1.0, 1.0, 1.0], [3.0, 3.0, 1.0]]
    pairs, stats = pairs_from_scores(prompts, responses, scores, "best_worst")
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [("p0", "b", "a"), ("p2", "g", "i")]
    assert pairs[0].gap == pytest.approx(0.7)
    assert (stats.pairs, stats.skipped_ties, stats.prompts_without_pair) == (2, 1, 1)
    pairs, stats = pairs_from_scores(prompts, responses, scores, "all")
    # p0: 3 pairs; p1: all tied; p2: g=h tie, g>i, h>i
    assert sorted((p.chosen, p.rejected) for p in pairs) == [("b", "a"), ("b", "c"), ("c", "a"),
                                                              ("g", "i"), ("h", "i")]
    assert stats.skipped_ties == 4
    with pytest.raises(ValueError, match="NaN"):
        pairs_from_scores(prompts, responses, [[0, 1, np.nan]] * 3)
    with pytest.raises(ValueError, match="pairing"):
        pairs_from_scores(prompts, responses, scores, "random")


def test_pairs_file_round_trip_and_bad_line(tmp_path):
    pairs = [Preference("hi", "good", "bad", 0.5),
             Preference(({"role": "user", "content": "x"},), "y", "z")]
    path = save_pairs(tmp_path / "pairs.jsonl", pairs)
    assert load_pairs(path) == pairs
    packed = save_pairs(tmp_path / "pairs.jsonl.gz", pairs)
    assert packed.read_bytes()[:2] == b"\x1f\x8b" and load_pairs(packed) == pairs  # gzip magic
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.jsonl", "pairs.jsonl.gz"]
    path.write_text(path.read_text() + '{"prompt": "p", "chosen": "c"}\n')
    with pytest.raises(ValueError, match="pairs.jsonl:3"):
        load_pairs(path)


def test_hh_rlhf_records_become_multi_turn_chat_pairs(chat):
    from iapo_jax.data.hh_rlhf_parse import parse_pair
    from iapo_jax.rewards.preference_pairs import pairs_from_records

    shared = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Bake bread?\n\nAssistant:"
    parsed = parse_pair({"chosen": shared + " Sure.", "rejected": shared + " No."})
    record = {"prompt": parsed.prompt, "chosen": parsed.chosen, "rejected": parsed.rejected,
              "messages": list(parsed.messages), "line": 1}  # as the grain pipeline yields it
    (pair,) = pairs_from_records([record])
    assert [m["role"] for m in pair.prompt] == ["user", "assistant", "user"]
    assert (pair.chosen, pair.rejected) == ("Sure.", "No.")
    _, tok = chat
    (seq,), _ = sequence_ids(tok, [pair.prompt], [pair.chosen], 256)
    text = tok.decode(seq)
    assert text.index("Hi") < text.index("Hello!") < text.index("Bake bread?") < text.index("Sure.")
    assert text.endswith("assistant\nSure." + tok.eos_token)


def test_sequences_are_chat_prompt_response_end_and_cut_from_the_left(chat):
    _, tok = chat
    out = tok.apply_chat_template([{"role": "user", "content": "Hello?"}], add_generation_prompt=True,
                                  tokenize=True)
    prompt_ids = list(out["input_ids"] if hasattr(out, "keys") else out)
    resp_ids = tok("Fine.", add_special_tokens=False)["input_ids"]
    (seq,), cut = sequence_ids(tok, ["Hello?"], ["Fine."], max_length=256)
    assert seq == prompt_ids + resp_ids + [tok.eos_token_id] and cut == 0
    (short,), cut = sequence_ids(tok, ["Hello?"], ["Fine."], max_length=10)
    assert short == seq[-10:] and cut == 1  # the response and its end token survive


def test_mean_pooling_averages_real_tokens_only_and_last_reads_the_end(chat):
    from iapo_jax.models.heads import pool_hidden

    h = jax.random.normal(jax.random.key(0), (3, 5, 4))
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], bool)  # left, none, right pad
    expect = np.stack([np.asarray(h)[i][mask[i]].mean(0) for i in range(3)])
    np.testing.assert_allclose(pool_hidden(h, mask, "mean"), expect, rtol=1e-6)
    np.testing.assert_allclose(pool_hidden(h, mask, "last"), np.asarray(h)[[0, 1, 2], [4, 4, 1]])
    with pytest.raises(ValueError, match="pooling"):
        pool_hidden(h, mask, "max")
    with pytest.raises(ValueError, match="pooling"):
        RewardModel.from_policy(chat[0], nnx.Rngs(0), pooling="max")


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_head_projection_matches_reward_model_score(chat, pooling):
    model, tok = chat
    rm = RewardModel.from_policy(model, nnx.Rngs(0), head_init_std=0.5, pooling=pooling)
    (arrays,), _ = encode_preference_splits(tok, [vowel_pairs(6, 3)], 64)
    direct = score_arrays(rm, arrays.chosen_ids, arrays.chosen_mask, 4)
    feats = pooled_features(rm.backbone, arrays.chosen_ids, arrays.chosen_mask, batch_size=32,
                            pooling=pooling)
    np.testing.assert_allclose(np.asarray(project(head_of(nnx.state(rm)), feats)), direct, atol=1e-5)


def test_adapter_scores_text_like_the_model_scores_tokens(chat):
    model, tok = chat
    rm = RewardModel.from_policy(model, nnx.Rngs(1), head_init_std=0.5)
    prompts, responses = ["Up?", "Joke", "Hi"], ["meh", "no", "hello"]
    reward = JaxRewardModel(rm, tok, max_length=64, batch_size=4)
    got = reward.score(prompts, responses)
    # The same rows right-padded (the adapter left-pads), scored by the model directly.
    seqs, _ = sequence_ids(tok, prompts, responses, 64)
    ids, mask = np.zeros((3, 32), np.int32), np.zeros((3, 32), bool)
    for i, seq in enumerate(seqs):
        ids[i, :len(seq)], mask[i, :len(seq)] = seq, True
    np.testing.assert_allclose(got, score_arrays(rm, ids, mask, 4), atol=1e-5)
    assert got.dtype == np.float32 and got.shape == (3,)
    with pytest.raises(ValueError, match="2 prompts but 3 responses"):
        reward.score(prompts[:2], responses)
    with pytest.raises(TypeError, match="RewardModel"):
        JaxRewardModel(model, tok)


def test_optimizer_warms_up_then_decays_on_a_cosine():
    """With a constant gradient Adam's step is the learning rate itself: read the schedule off it."""
    opt = make_optimizer(OptimizerConfig(learning_rate=1.0, warmup_steps=4, end_fraction=0.1), 20)
    params = {"w": jnp.zeros(())}
    state = opt.init(params)
    steps = []
    for _ in range(21):
        updates, state = opt.update({"w": jnp.ones(())}, state, params)
        steps.append(-float(updates["w"]))
    expected = [t / 4 for t in range(4)] + [0.1 + 0.45 * (1 + np.cos(np.pi * (t - 4) / 16)) for t in range(4, 21)]
    np.testing.assert_allclose(steps, expected, atol=1e-4)
    with pytest.raises(ValueError, match="learning_rate"):
        make_optimizer(OptimizerConfig(learning_rate=0.0), 10)


def test_head_training_learns_a_known_preference(chat, vowel_data):
    model, _ = chat
    train, held_out = vowel_data
    cfg = RewardTrainConfig(steps=120, batch_size=32, mode="head", learning_rate=3e-2, warmup_steps=5)
    trainer = RewardModelTrainer(cfg, RewardModel.from_policy(model, nnx.Rngs(0)), train, held_out)
    before = trainer.evaluate()
    assert before["pairwise_accuracy"] == pytest.approx(0.5)  # a zero head ties every pair (ties count one half)
    trainer.train()
    after = trainer.evaluate()
    # Held-out pairs, never trained on; the rule (more vowels wins) must be recovered.
    assert after["pairwise_accuracy"] >= 0.85, after
    assert after["loss"] < before["loss"] - 0.2
    rc, rr = trainer.pair_scores(held_out)  # scores passed in give the same read-out, in order
    assert trainer.evaluate(held_out, (rc, rr)) == after
    assert trainer.evaluate(held_out, (rr, rc))["pairwise_accuracy"] == pytest.approx(1 - after["pairwise_accuracy"])


def _train_save_and_restore(cfg, model, data, ckpt_dir, pooling="last"):
    """Train cfg.steps steps with a checkpointer; a fresh trainer must restore exactly that state."""
    train, held_out = data
    with Checkpointer(ckpt_dir, handle_sigterm=False) as ckpt:
        trainer = RewardModelTrainer(cfg, RewardModel.from_policy(model, nnx.Rngs(0), pooling=pooling),
                                     train, held_out, checkpointer=ckpt)
        history = trainer.train()
        ckpt.wait()
        assert ckpt.all_steps() == [cfg.steps]
        fresh = RewardModelTrainer(cfg, RewardModel.from_policy(model, nnx.Rngs(0), pooling=pooling),
                                   train, held_out, checkpointer=ckpt)
        assert fresh.restore() == cfg.steps
    for a, b in zip(jax.tree.leaves((trainer.trainable, trainer.opt_state)),
                    jax.tree.leaves((fresh.trainable, fresh.opt_state)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    return trainer, history


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_checkpoint_round_trip_and_reload_as_a_reward(chat, vowel_data, tmp_path, tiny_chat_llama_dir,
                                                      pooling):
    model, tok = chat
    cfg = RewardTrainConfig(steps=3, batch_size=8, mode="head", learning_rate=1e-2, warmup_steps=1)
    trainer, _ = _train_save_and_restore(cfg, model, vowel_data, tmp_path / "checkpoints", pooling)
    write_spec(tmp_path, kind="reward", base=str(tiny_chat_llama_dir), finetune=cfg.finetune, step=3,
               max_length=64, pooling=pooling)
    reloaded = get_reward("reward_model", path=tmp_path, batch_size=4)
    texts = (["Up?", "Hi"], ["abcde", "ponm"])
    trained = JaxRewardModel(trainer.current_model(), tok, max_length=64, batch_size=4)
    np.testing.assert_allclose(reloaded.score(*texts), trained.score(*texts), atol=1e-5)
    assert np.ptp(trained.score(*texts)) > 0  # the head moved
    with pytest.raises(HeadModelError, match="value"):
        load_head_model(tmp_path, kind="value")
    spec = json.loads((tmp_path / "head_model.json").read_text())
    (tmp_path / "head_model.json").write_text(json.dumps({**spec, "pooling": "max"}))
    with pytest.raises(HeadModelError, match="unknown pooling 'max'"):
        load_head_model(tmp_path)
    (tmp_path / "head_model.json").write_text(json.dumps({"kind": "reward"}))
    with pytest.raises(HeadModelError, match="lacks"):
        load_head_model(tmp_path)


@pytest.mark.slow
def test_lora_steps_checkpoint_and_reload_as_a_reward(chat, vowel_data, tmp_path, tiny_chat_llama_dir):
    model, tok = chat
    cfg = RewardTrainConfig(steps=3, batch_size=8, mode="lora", lora_rank=2, learning_rate=1e-2,
                            warmup_steps=1)
    # A fresh trainer restores the same LoRA factors, head and optimizer state.
    trainer, history = _train_save_and_restore(cfg, model, vowel_data, tmp_path / "checkpoints")
    assert len(history) == 3 and all(np.isfinite(h["loss"]) for h in history)
    assert float(jnp.abs(trainer.trainable["lora"]["backbone/layers/q"][1]).sum()) > 0  # B moved
    write_spec(tmp_path, kind="reward", base=str(tiny_chat_llama_dir), finetune=cfg.finetune, step=3,
               max_length=64)
    _, _, spec = load_head_model(tmp_path, kind="reward")
    assert spec["finetune"] == Finetune("lora", 2, 16.0).as_dict()
    reloaded = get_reward("reward_model", path=tmp_path, batch_size=4)
    texts = (["Up?", "Hi"], ["abcde", "ponm"])
    trained = JaxRewardModel(trainer.current_model(), tok, max_length=64, batch_size=4)
    np.testing.assert_allclose(reloaded.score(*texts), trained.score(*texts), atol=1e-5)
    with pytest.raises(HeadModelError, match="value"):
        load_head_model(tmp_path, kind="value")
    (tmp_path / "head_model.json").write_text(json.dumps({"kind": "reward"}))
    with pytest.raises(HeadModelError, match="lacks"):
        load_head_model(tmp_path)


def test_bad_training_settings_are_rejected_before_compute(chat, vowel_data):
    model, _ = chat
    train, _ = vowel_data
    rm = RewardModel.from_policy(model, nnx.Rngs(0))
    for bad, match in ((dict(mode="adapter"), "training mode"), (dict(mode="lora", lora_rank=0), "lora_rank"),
                       (dict(steps=0), "steps"), (dict(center_coef=-1.0), "center_coef"),
                       (dict(warmup_steps=-1), "warmup_steps")):
        with pytest.raises(ValueError, match=match):
            RewardModelTrainer(RewardTrainConfig(**bad), rm, train)
    with pytest.raises(TypeError, match="RewardModel"):
        RewardModelTrainer(RewardTrainConfig(), model, train)


@pytest.mark.slow
def test_full_fine_tuning_learns_a_known_preference(chat, vowel_data):
    model, _ = chat
    train, held_out = vowel_data
    cfg = RewardTrainConfig(steps=40, batch_size=32, mode="full", learning_rate=5e-3, warmup_steps=5,
                            margin=0.5, center_coef=0.01)
    trainer = RewardModelTrainer(cfg, RewardModel.from_policy(model, nnx.Rngs(0)), train, held_out)
    trainer.train()
    assert trainer.evaluate()["pairwise_accuracy"] >= 0.9


def test_train_rm_rejects_bad_options_before_loading_anything():
    from iapo_jax.commands.job_inputs import JobInputError
    from iapo_jax.commands.train_rm import TrainRMConfig, check_config

    for bad, match in ((dict(samples_per_prompt=1), "samples-per-prompt"), (dict(pairs="file"), "pairs-file"),
                       (dict(pairs="hh-rlhf"), "hh-rlhf-dir"), (dict(mode="lora", lora_rank=0), "lora_rank"),
                       (dict(steps=0), "steps"), (dict(max_length=4), "max-length"),
                       (dict(data=2, fsdp=2, batch_size=6), r"--batch-size 6 does not divide over --data 2 x --fsdp 2"),
                       (dict(tensor=0), "--tensor must be a positive")):
        with pytest.raises(JobInputError, match=match):
            check_config(TrainRMConfig(**bad))


@pytest.mark.slow
def test_train_rm_job_samples_pairs_trains_and_saves_a_usable_reward(tiny_chat_llama_dir, tmp_path):
    from iapo_jax.commands import load_job
    from iapo_jax.commands.common import run_job
    from iapo_jax.commands.train_rm import TrainRMConfig

    cfg = TrainRMConfig(model=str(tiny_chat_llama_dir), scorer="length", num_prompts=6, eval_prompts=4,
                        samples_per_prompt=3, max_new_tokens=12, pairing="all", steps=5, batch_size=4,
                        mode="head", eval_every=0, batch_prompts=4, data=2, fsdp=2, tensor=2)
    ctx = run_job(load_job("train-rm"), cfg, run_dir=tmp_path / "rm")
    assert ctx.record.data["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}  # trained sharded
    metrics = ctx.record.data["metrics"]
    assert metrics["train_pairs"] > 0 and metrics["eval_pairs"] > 0 and metrics["steps"] == 5
    assert 0 <= metrics["eval_pairwise_accuracy"] <= 1 and ctx.record.data["checkpoints"] == [5]
    assert metrics["train_eval_pairs"] == min(metrics["train_pairs"], 1024)
    assert len(load_pairs(tmp_path / "rm" / "pairs_train.jsonl")) == metrics["train_pairs"]
    reward = get_reward("reward_model", path=tmp_path / "rm")
    assert np.isfinite(reward.score(["Hi"], ["there"])).all()


def test_training_fit_is_measured_on_a_fixed_sample_of_distinct_pairs(vowel_data):
    from iapo_jax.commands.train_rm import _training_sample

    train, _ = vowel_data
    assert _training_sample(train, train.size, 0) is train
    a, b = _training_sample(train, 5, 0), _training_sample(train, 5, 0)
    assert a.size == 5 and np.array_equal(a.chosen_ids, b.chosen_ids)  # the same pairs every time
    pairs = {(tuple(c), tuple(r)) for c, r in zip(np.asarray(a.chosen_ids), np.asarray(a.rejected_ids))}
    assert len(pairs) == 5  # drawn without replacement
    assert pairs <= {(tuple(c), tuple(r)) for c, r in zip(np.asarray(train.chosen_ids),
                                                           np.asarray(train.rejected_ids))}
