"""Reward-model and prefix-scorer training sharded on 8 virtual CPU devices, against one device.

The reference is the same trainer with mesh=None. Sharding only reorders float32 reductions, so
per-step losses agree within 1e-5 relative and parameters after two AdamW steps within 10% of the
learning rate (AdamW's first updates are lr * g / (|g| + eps): rounding-level gradient changes near
eps move a parameter by a few percent of lr, a wrong shard by about lr); held-out metrics within
1e-5.
"""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from iapo_jax.alignment import prefix_scorer as ps
from iapo_jax.alignment.prefix_rollouts import Rollouts
from iapo_jax.alignment.reward_model_training import PairArrays, RewardModelTrainer, RewardTrainConfig
from iapo_jax.models import RewardModel, ValueModel, load_model
from iapo_jax.parallel.mesh import make_mesh

LR = 1e-3
W, PROMPT, RESPONSE = 16, 8, 6


def _mesh(shape):
    return make_mesh(*shape, devices=jax.devices()[: int(np.prod(shape))])


@pytest.fixture(scope="module")
def base(tiny_chat_llama_dir):
    return load_model(tiny_chat_llama_dir)


def _pairs(n, seed) -> PairArrays:
    rng = np.random.default_rng(seed)

    def rows():
        length = rng.integers(4, W + 1, n)
        mask = np.arange(W)[None, :] >= (W - length)[:, None]
        return np.where(mask, rng.integers(3, 128, (n, W)), 0).astype(np.int32), mask

    (ci, cm), (ri, rm) = rows(), rows()
    return PairArrays(ci, cm, ri, rm, rng.uniform(0, 1, n).astype(np.float32))


def _rollouts(n, seed) -> Rollouts:
    rng = np.random.default_rng(seed)
    return Rollouts(prompt_ids=rng.integers(3, 128, (n, PROMPT)).astype(np.int32),
                    prompt_mask=np.ones((n, PROMPT), bool),
                    tokens=rng.integers(3, 128, (n, RESPONSE)).astype(np.int32),
                    lengths=rng.integers(2, RESPONSE + 1, n).astype(np.int32),
                    rewards=rng.normal(size=n).astype(np.float32))


def _max_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _compare(make, steps=2):
    """Train one trainer per mesh for `steps`; the sharded one must track the one-device one."""
    plain, sharded = make(None), make("mesh")
    for _ in range(steps):
        want, got = plain.train_step(), sharded.train_step()
        for name in ("loss", "grad_norm"):
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, err_msg=name)
    assert _max_diff(sharded.trainable, plain.trainable) < 0.1 * LR
    return plain, sharded


@pytest.mark.parametrize("mode, shape", [("full", (2, 2, 2)), ("head", (8, 1, 1))])
def test_reward_model_training_on_a_mesh_matches_one_device(base, mode, shape):
    train, held_out = _pairs(32, 0), _pairs(16, 1)
    cfg = RewardTrainConfig(steps=2, batch_size=8, mode=mode, learning_rate=LR, warmup_steps=0)

    def make(mesh):
        rm = RewardModel.from_policy(base, nnx.Rngs(0), head_init_std=0.3)  # a live head: backbone gradients
        return RewardModelTrainer(cfg, rm, train, held_out, mesh=_mesh(shape) if mesh else None)

    plain, sharded = _compare(make)
    want, got = plain.evaluate(), sharded.evaluate()
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
    assert got["pairwise_accuracy"] == want["pairwise_accuracy"]
    if mode == "full":  # the weights really are split over fsdp and tensor
        up = sharded.trainable["backbone"]["layers"]["up"][...]
        assert up.sharding.spec == P(None, "fsdp", "tensor") and not up.sharding.is_fully_replicated


def test_cdq_scorer_training_on_a_mesh_matches_one_device(base):
    train, held_out = _rollouts(16, 0), _rollouts(8, 1)
    cfg = ps.ScorerTrainConfig(method="cdq", top_k=8, mode="full", steps=2, batch_size=8, learning_rate=LR,
                               warmup_steps=0, eval_batch_size=8)

    def make(mesh):
        vm = ValueModel.from_policy(base, nnx.Rngs(0), head_init_std=0.3)
        return ps.PrefixScorerTrainer(cfg, vm, train, held_out, reference=base,
                                      mesh=_mesh((2, 4, 1)) if mesh else None)

    plain, sharded = _compare(make)
    np.testing.assert_allclose(sharded.evaluate()["mse"], plain.evaluate()["mse"], rtol=1e-5)


def test_batches_that_do_not_divide_the_mesh_are_refused_before_compute(base):
    mesh = _mesh((2, 2, 2))  # 4 data-parallel shards
    with pytest.raises(ValueError, match=r"batch_size of 6 rows .* 4 data-parallel shards"):
        RewardModelTrainer(RewardTrainConfig(batch_size=6, mode="head"), RewardModel.from_policy(base, nnx.Rngs(0)),
                           _pairs(8, 0), mesh=mesh)
    with pytest.raises(ValueError, match=r"batch_size of 6 rows"):
        ps.PrefixScorerTrainer(ps.ScorerTrainConfig(batch_size=6, mode="head"),
                               ValueModel.from_policy(base, nnx.Rngs(0)), _rollouts(8, 0), mesh=mesh)
