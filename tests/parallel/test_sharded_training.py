"""The CTRL train step and the cached forward pass, sharded on 8 virtual CPU devices, against the
unsharded program on one device.

Reference: the plain (mesh=None) jit on one device, itself tied to transformers' logits by
test_model_parity. Sharding changes only the order of float32 reductions, so results must agree
to float32 rounding: loss and gradient norm within 1e-5 relative or 1e-6 absolute (the absolute
part for metrics that can be near zero, such as the KL of a policy still equal to pi_ref, where
reordered sums differ by ~1e-8 and a relative test would depend on the CPU's vector width),
every gradient leaf within 1e-5 of that leaf's largest entry, hidden states and KV caches within
1e-5 absolute. Parameters after one AdamW step agree within 5e-6 absolute, 5% of the learning
rate: AdamW's first update is lr * g / (|g| + eps), which turns rounding-level changes of
gradients near eps = 1e-8 into changes of a few percent of lr, while a wrong shard would move
parameters by about lr (1e-4).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from iapo_jax.alignment.ctrl_step import RolloutBatch, StepOptions, make_train_step
from iapo_jax.decoding.cache_sharding import constrain_cache, shard_cache
from iapo_jax.parallel.mesh import make_mesh, shard_batch, shard_params
from iapo_jax.parallel.sharded_step import check_batch_divides, shard_train_state

MESH_SHAPES = [(8, 1, 1), (2, 4, 1), (2, 2, 2)]
ROWS, PROMPT, RESPONSE = 8, 8, 8
LR = 1e-4


def _mesh(shape):
    return make_mesh(*shape, devices=jax.devices()[: int(np.prod(shape))])


def capture_grads() -> optax.GradientTransformation:
    """Passes updates through unchanged and keeps the last ones in its state: the step's exact
    gradients come back inside opt_state, from the very program that trains."""
    return optax.GradientTransformation(
        init=lambda params: jax.tree.map(jnp.zeros_like, params),
        update=lambda updates, state, params=None: (updates, updates),
    )


def _optimizer():
    return optax.chain(capture_grads(), optax.clip_by_global_norm(1.0), optax.adamw(LR))


def _rollout(vocab: int) -> RolloutBatch:
    rng = np.random.default_rng(0)
    prompt_len = rng.integers(3, PROMPT + 1, ROWS)
    prompt_mask = np.arange(PROMPT)[None, :] >= (PROMPT - prompt_len)[:, None]  # left padded
    prompt_ids = np.where(prompt_mask, rng.integers(3, vocab, (ROWS, PROMPT)), 0)
    lengths = rng.integers(2, RESPONSE + 1, ROWS)
    tokens = rng.integers(3, vocab, (ROWS, RESPONSE))
    # Old log-probs near a random model's (log 1/V): PPO ratios on both sides of the clip range.
    old = np.log(1.0 / vocab) + rng.normal(0, 0.3, (ROWS, RESPONSE))
    ref = np.log(1.0 / vocab) + rng.normal(0, 0.3, (ROWS, RESPONSE))
    return RolloutBatch(
        prompt_ids=jnp.asarray(prompt_ids, jnp.int32), prompt_mask=jnp.asarray(prompt_mask),
        tokens=jnp.asarray(tokens, jnp.int32), lengths=jnp.asarray(lengths, jnp.int32),
        advantages=jnp.asarray(rng.normal(size=ROWS), jnp.float32),
        old_logp=jnp.asarray(old, jnp.float32), ref_logp=jnp.asarray(ref, jnp.float32),
    )


OPTS = StepOptions(kl_in_loss=True, kl_estimator="k2", use_clip=True)
SCALARS = (jnp.float32(0.1), jnp.float32(0.2))  # beta, clip epsilon


def _host(tree):
    return jax.tree.map(lambda x: np.asarray(x), nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree)


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    import iapo_jax

    return iapo_jax.load_model(tiny_llama_dir)


@pytest.fixture(scope="module")
def sharded_step(model):
    """step_for(shape) -> (mesh, compiled sharded step): each mesh's program is compiled once."""
    graphdef, _ = nnx.split(model)
    optimizer, steps = _optimizer(), {}

    def step_for(shape):
        if shape not in steps:
            mesh = _mesh(shape)
            steps[shape] = mesh, make_train_step(graphdef, optimizer, OPTS, mesh=mesh)
        return steps[shape]

    return step_for


def _placed_state(model, mesh):
    _, state = nnx.split(model)
    trainable, _, opt_state = shard_train_state(state, None, _optimizer().init(state), mesh)
    return trainable, opt_state


@pytest.fixture(scope="module")
def reference_step(model):
    """One unsharded step (mesh=None): metrics, gradients, updated parameters."""
    graphdef, state = nnx.split(model)
    optimizer = _optimizer()
    trainable = jax.tree.map(jnp.copy, state)
    opt_state = optimizer.init(trainable)
    step = make_train_step(graphdef, optimizer, OPTS)
    batch = _rollout(model.config.vocab_size)
    trainable, opt_state, metrics = step(trainable, None, opt_state, batch, *SCALARS)
    return {"metrics": {k: float(v) for k, v in metrics.items()}, "grads": _host(opt_state[0]),
            "params": _host(trainable)}


def _flat(tree):
    return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.slow
@pytest.mark.parametrize("shape", MESH_SHAPES)
def test_ctrl_step_matches_one_device_on_every_mesh(shape, model, reference_step, sharded_step):
    mesh, step = sharded_step(shape)
    trainable, opt_state = _placed_state(model, mesh)
    trainable, opt_state, metrics = step(trainable, None, opt_state, _rollout(model.config.vocab_size),
                                         *SCALARS)

    ref = reference_step
    for name in ("loss", "pg_loss", "kl_loss_estimate", "entropy", "grad_norm"):
        np.testing.assert_allclose(float(metrics[name]), ref["metrics"][name], rtol=1e-5, atol=1e-6,
                                   err_msg=name)
    assert float(metrics["clip_fraction"]) == ref["metrics"]["clip_fraction"]
    assert 0.0 < ref["metrics"]["clip_fraction"] < 1.0  # both PPO branches are exercised

    grads, want = _flat(_host(opt_state[0])), _flat(ref["grads"])
    worst = max(np.max(np.abs(grads[k] - g)) / np.max(np.abs(g)) for k, g in want.items())
    assert worst < 1e-5, f"largest gradient difference {worst:.2e} of the leaf's scale on {shape}"
    params, want = _flat(_host(trainable)), _flat(ref["params"])
    moved = max(np.max(np.abs(params[k] - p)) for k, p in want.items())
    assert moved < 0.05 * LR, f"parameters differ by {moved:.2e} after one step on {shape}"
    print(f"mesh {shape}: loss rel diff "
          f"{abs(float(metrics['loss']) / ref['metrics']['loss'] - 1):.1e}, grad_norm rel diff "
          f"{abs(float(metrics['grad_norm']) / ref['metrics']['grad_norm'] - 1):.1e}, "
          f"max grad diff {worst:.1e} (of leaf scale), max param diff {moved:.1e}")

    # The state really is sharded, and stays so after the donated update.
    up, mu_up = trainable["layers"]["up"][...], opt_state[2][0].mu["layers"]["up"][...]
    _, fsdp, tensor = shape
    want = NamedSharding(mesh, P(None, "fsdp" if fsdp > 1 else None, "tensor" if tensor > 1 else None))
    assert up.sharding.is_equivalent_to(want, 3) and mu_up.sharding.is_equivalent_to(want, 3)
    if shape == (2, 2, 2):
        assert not up.sharding.is_fully_replicated
        assert up.addressable_shards[0].data.shape == (2, 32, 64)  # a quarter of [2, 64, 128]


@pytest.mark.slow
def test_sharded_step_runs_again_without_recompiling(model, sharded_step):
    """The donated, sharded outputs are valid inputs for the next step: one program, two steps."""
    mesh, step = sharded_step((2, 2, 2))
    trainable, opt_state = _placed_state(model, mesh)
    batch = _rollout(model.config.vocab_size)
    losses = []
    for _ in range(2):
        trainable, opt_state, metrics = step(trainable, None, opt_state, batch, *SCALARS)
        losses.append(float(metrics["loss"]))
    [program] = step.programs.values()
    assert program._cache_size() == 1  # the second call reused the first call's program
    assert losses[1] < losses[0]  # the same batch again: one AdamW step lowered its loss


def test_rollout_rows_must_divide_the_data_axes(model, sharded_step):
    mesh, step = sharded_step((2, 2, 2))
    trainable, opt_state = _placed_state(model, mesh)
    batch = jax.tree.map(lambda x: x[:6], _rollout(model.config.vocab_size))
    with pytest.raises(ValueError, match=r"6 rows .* multiple of 4"):
        step(trainable, None, opt_state, batch, *SCALARS)
    with pytest.raises(ValueError, match=r"rollout batch of 6 rows .*data=2 x fsdp=2"):
        check_batch_divides(6, mesh, "rollout batch")


# ----------------------------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------------------------


def _prefill_then_decode(graphdef, state, ids, mask, next_ids, cache, mesh):
    """Prefill a left-padded prompt, then one decode step; the cache layout is pinned on a mesh."""
    model = nnx.merge(graphdef, state)
    pin = (lambda c: constrain_cache(c, mesh)) if mesh is not None else (lambda c: c)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    h1, cache = model.forward_cached(ids, positions, mask, pin(cache))
    cache = pin(cache)
    step_pos = positions[:, -1:] + 1
    h2, cache = model.forward_cached(next_ids, step_pos, jnp.ones_like(next_ids, bool), cache)
    return h1, h2, pin(cache)


_forward = jax.jit(_prefill_then_decode, static_argnames=("graphdef", "mesh"))


def test_forward_cached_with_a_sharded_cache_equals_unsharded(model):
    batch = _rollout(model.config.vocab_size)
    ids, mask = batch.prompt_ids, batch.prompt_mask
    next_ids = batch.tokens[:, :1]
    graphdef, state = nnx.split(model)
    cache = model.init_cache(ROWS, PROMPT + 4)
    want = _forward(graphdef, state, ids, mask, next_ids, cache, None)

    mesh = _mesh((2, 2, 2))
    sharded_cache = shard_cache(cache, mesh)
    spec = P(None, ("data", "fsdp"), None, "tensor", None)  # rows over 4, the 2 KV heads over 2
    assert sharded_cache.k.sharding.spec == spec
    got = _forward(graphdef, shard_params(state, mesh), shard_batch(ids, mesh), shard_batch(mask, mesh),
                   shard_batch(next_ids, mesh), sharded_cache, mesh)
    h1, h2, out_cache = got
    for array in (out_cache.k, out_cache.v):
        assert array.sharding.is_equivalent_to(NamedSharding(mesh, spec), 5)
    assert out_cache.valid.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"), None)), 2)
    # Each device holds an eighth of the cache, not a copy of it.
    assert out_cache.k.addressable_shards[0].data.shape == (2, 2, PROMPT + 4, 1, 16)
    diffs = {
        "prefill hidden": np.max(np.abs(np.asarray(h1) - np.asarray(want[0]))),
        "decode hidden": np.max(np.abs(np.asarray(h2) - np.asarray(want[1]))),
        "cache k": np.max(np.abs(np.asarray(out_cache.k) - np.asarray(want[2].k))),
        "cache v": np.max(np.abs(np.asarray(out_cache.v) - np.asarray(want[2].v))),
    }
    print("forward_cached on (2,2,2), max abs diffs:", {k: f"{v:.1e}" for k, v in diffs.items()})
    for name, diff in diffs.items():
        assert diff < 1e-5, (name, diff)
    np.testing.assert_array_equal(np.asarray(out_cache.valid), np.asarray(want[2].valid))
    assert int(out_cache.index) == int(want[2].index) == PROMPT + 1


def test_cache_heads_that_do_not_divide_stay_whole():
    """3 KV heads on tensor=2 cannot split: they stay whole, rows are still split."""
    from iapo_jax.models.kv_cache import KVCache

    mesh = _mesh((2, 2, 2))
    cache = shard_cache(KVCache.zeros(2, 8, 4, 3, 4), mesh)
    assert cache.k.sharding.spec == P(None, ("data", "fsdp"), None, None, None)
    only_data = shard_cache(KVCache.zeros(2, 8, 4, 2, 4), mesh, batch_axes=("data",))
    assert only_data.k.sharding.spec == P(None, "data", None, "tensor", None)


# ----------------------------------------------------------------------------------------------
# The CTRL trainer with a mesh
# ----------------------------------------------------------------------------------------------


class _LetterReward:
    name = "letters"

    def score(self, prompts, responses):
        return np.array([sum(c.isalpha() for c in r) for r in responses], np.float32)


def _trainer(directory, mesh, prompts_per_step=4, lora_rank=0):
    import iapo_jax
    from iapo_jax.alignment.ctrl import CTRLTrainer
    from iapo_jax.alignment.ctrl_config import CTRLConfig

    policy, reference = iapo_jax.load_model(directory), iapo_jax.load_model(directory)
    tokenizer = iapo_jax.load_tokenizer(directory)
    cfg = CTRLConfig(transform="raw", beta=0.1, samples_per_prompt=2, prompts_per_step=prompts_per_step,
                     steps=2, max_new_tokens=8, learning_rate=1e-3, seed=3, lora_rank=lora_rank)
    prompts = [f"say something about {w}" for w in ("cats", "rain", "maps", "tea")]
    return CTRLTrainer(cfg, policy, reference, tokenizer, _LetterReward(), None, prompts, mesh=mesh)


def test_trainer_rejects_a_rollout_that_does_not_divide_before_compute(tiny_chat_llama_dir):
    with pytest.raises(ValueError, match=r"rollout batch .* 6 rows .* 4 data-parallel shards"):
        _trainer(tiny_chat_llama_dir, _mesh((2, 2, 2)), prompts_per_step=3)


@pytest.mark.slow
def test_trainer_step_on_a_mesh_matches_one_device(tiny_chat_llama_dir):
    """Sampling, scoring and the update of one CTRL step: same samples and metrics on (2,2,2)."""
    plain = _trainer(tiny_chat_llama_dir, None)
    sharded = _trainer(tiny_chat_llama_dir, _mesh((2, 2, 2)))
    want, got = plain.train_step(), sharded.train_step()
    assert got.texts == want.texts
    for name in ("grad_norm", "kl", "raw_reward", "entropy"):
        # The first step's policy is pi_ref: its KL is ~1e-8 of rounding, so it needs the atol.
        np.testing.assert_allclose(got.metrics[name], want.metrics[name], rtol=1e-5, atol=1e-6, err_msg=name)
    # Leave-one-out advantages sum to zero per prompt, so the loss is zero up to rounding (~1e-7).
    assert abs(got.metrics["loss"] - want.metrics["loss"]) < 1e-6
    up = sharded.trainable["layers"]["up"][...]
    assert up.sharding.spec == P(None, "fsdp", "tensor") and not up.sharding.is_fully_replicated
    diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(jax.tree.leaves(sharded.trainable), jax.tree.leaves(plain.trainable)))
    print(f"trainer step on (2,2,2): max param diff {diff:.1e}")
    assert diff < 0.05 * 1e-3  # 5% of the learning rate, as for the step above


def test_lora_trainer_on_a_mesh_matches_one_device(tiny_chat_llama_dir):
    """LoRA factors applied beside sharded frozen kernels: two steps (the second with B != 0) give
    the same samples, metrics and factors on (2,2,2) as on one device."""
    plain = _trainer(tiny_chat_llama_dir, None, lora_rank=4)
    sharded = _trainer(tiny_chat_llama_dir, _mesh((2, 2, 2)), lora_rank=4)
    for _ in range(2):
        want, got = plain.train_step(), sharded.train_step()
        assert got.texts == want.texts
        for name in ("grad_norm", "kl", "raw_reward"):
            np.testing.assert_allclose(got.metrics[name], want.metrics[name], rtol=1e-4, atol=1e-6,
                                       err_msg=name)
    b = [np.asarray(f[1]) for f in jax.tree.leaves(plain.trainable, is_leaf=lambda x: isinstance(x, tuple))]
    assert max(float(np.max(np.abs(x))) for x in b) > 0  # the factors moved
    for a, c in zip(jax.tree.leaves(sharded.trainable), jax.tree.leaves(plain.trainable)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=0.05 * 1e-3)  # 5% of one Adam step


def test_trainer_state_saved_on_one_mesh_resumes_on_another(tiny_chat_llama_dir, tiny_llama_dir, tmp_path):
    """A (2,2,2) run's checkpoint restores onto an (8,1,1) trainer, values equal and re-sharded;
    a checkpoint of another model config is refused with the shapes named."""
    from iapo_jax.runtime.checkpointing import Checkpointer, IncompatibleCheckpointError

    saver = _trainer(tiny_chat_llama_dir, _mesh((2, 2, 2)))
    saver.trainable = jax.tree.map(lambda x: x + 0.5, saver.trainable)  # differ from a fresh start
    saver.step = 3
    with Checkpointer(tmp_path / "a", handle_sigterm=False, async_save=False) as ckpt:
        ckpt.save(3, **saver.checkpoint_items())
        resumed = _trainer(tiny_chat_llama_dir, _mesh((8, 1, 1)))
        resumed.restore(ckpt.restore(model=resumed.trainable, opt_state=resumed.opt_state))
    assert resumed.step == 3
    for a, b in zip(jax.tree.leaves(resumed.trainable), jax.tree.leaves(saver.trainable)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    up = resumed.trainable["layers"]["up"][...]
    assert up.sharding.mesh.shape["data"] == 8 and up.sharding.is_fully_replicated  # fsdp=tensor=1

    import iapo_jax

    other = shard_params(nnx.state(iapo_jax.load_model(tiny_llama_dir)), _mesh((2, 2, 2)))  # vocab 256
    with (Checkpointer(tmp_path / "a", handle_sigterm=False) as ckpt,
          pytest.raises(IncompatibleCheckpointError, match=r"\(136, 64\).*\(256, 64\)")):
        ckpt.restore(model=other)
