"""Checkpointer: round trip, keep-last-k, best-by-metric, corrupt fallback, other mesh, preemption.

The preemption tests run a small training loop in a child process, kill it (SIGKILL) or ask it to
stop (SIGTERM), resume it, and require the final parameters to equal an uninterrupted run bit for
bit on CPU.
"""

import os
import signal
import subprocess
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from iapo_jax.parallel.mesh import abstract_params, make_mesh, replicated, shard_params
from iapo_jax.runtime.checkpointing import (
    CheckpointFallbackWarning,
    Checkpointer,
    IncompatibleCheckpointError,
    NoCheckpointError,
)


class Small(nnx.Module):
    def __init__(self, din=8, dout=16, *, rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (din, dout)), out_sharding=("embed", "mlp"))
        self.b = nnx.Param(jax.random.normal(rngs.params(), (dout,)))


def _state(din=8, dout=16, seed=0):
    with nnx.use_eager_sharding(False):
        return nnx.state(Small(din, dout, rngs=nnx.Rngs(seed)), nnx.Param)


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _step_dirs(directory):
    return sorted(int(p) for p in os.listdir(directory) if p.isdigit())


def _assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_restores_every_item_exactly(tmp_path):
    state = _state()
    tx = optax.adam(1e-2)
    opt_state = tx.init(state)
    grads = jax.tree.map(jnp.ones_like, state)
    _, opt_state = tx.update(grads, opt_state, state)  # non-trivial moments and count
    key = jax.random.split(jax.random.key(7))[1]
    position = b'{"next_index": 17}'  # grain's iterator.get_state() returns bytes
    with Checkpointer(tmp_path, handle_sigterm=False) as ckpt:
        assert ckpt.save(3, model=state, opt_state=opt_state, rng=key, data_position=position,
                         config={"lr": 0.01, "layers": (2, 3)}, extra={"epoch": 1})
        restored = ckpt.restore(model=_abstract(state), opt_state=_abstract(opt_state))
    assert restored.step == 3
    _assert_trees_equal(restored.model, state)
    _assert_trees_equal(restored.opt_state, opt_state)
    assert isinstance(restored.model, nnx.State)
    np.testing.assert_array_equal(jax.random.key_data(restored.rng), jax.random.key_data(key))
    # the restored key draws the same numbers as the saved one
    np.testing.assert_array_equal(jax.random.uniform(restored.rng, (4,)), jax.random.uniform(key, (4,)))
    assert restored.data_position == position
    assert restored.config == {"lr": 0.01, "layers": [2, 3]}
    assert restored.meta["extra"] == {"epoch": 1}


def test_keeps_only_the_last_k(tmp_path):
    state = _state()
    with Checkpointer(tmp_path, keep_last=2, handle_sigterm=False) as ckpt:
        for step in range(1, 7):
            ckpt.save(step, model=state)
        ckpt.wait()
        assert ckpt.all_steps() == [5, 6]
    assert _step_dirs(tmp_path) == [5, 6]


@pytest.mark.parametrize("mode, best", [("max", 2), ("min", 5)])
def test_keeps_the_best_by_metric(tmp_path, mode, best):
    state = _state()
    scores = {1: 0.3, 2: 0.9, 3: 0.5, 4: 0.4, 5: 0.1, 6: 0.6}
    with Checkpointer(tmp_path, keep_last=1, best_metric="score", best_mode=mode,
                      handle_sigterm=False) as ckpt:
        for step, score in scores.items():
            ckpt.save(step, model=state, metrics={"score": score})
        ckpt.wait()
        assert ckpt.best_step() == best
        assert ckpt.all_steps() == sorted({best, 6})
        with pytest.raises(ValueError, match="metrics="):
            ckpt.save(7, model=state)


def test_maybe_save_follows_the_interval(tmp_path):
    state = _state()
    with Checkpointer(tmp_path, keep_last=10, save_every=3, handle_sigterm=False) as ckpt:
        saved = [s for s in range(10) if ckpt.maybe_save(s, model=state)]
    assert saved == [0, 3, 6, 9]


@pytest.mark.parametrize("damage", ["truncate", "delete_metadata", "partial_tmp"])
def test_unreadable_latest_falls_back_with_a_warning(tmp_path, damage):
    states = {step: _state(seed=step) for step in (1, 2)}
    with Checkpointer(tmp_path, handle_sigterm=False) as ckpt:
        for step, state in states.items():
            ckpt.save(step, model=state)
    latest = tmp_path / "2" / "model"
    if damage == "truncate":
        for root, _, files in os.walk(latest / "d"):
            for name in files:
                path = os.path.join(root, name)
                with open(path, "r+b") as fh:
                    fh.truncate(os.path.getsize(path) // 2)
    elif damage == "delete_metadata":
        os.remove(latest / "_METADATA")
    else:  # a save that died before orbax committed it
        os.rename(tmp_path / "2", tmp_path / "2.orbax-checkpoint-tmp-1234")

    with Checkpointer(tmp_path, handle_sigterm=False) as ckpt:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            restored = ckpt.restore(model=_abstract(states[1]))
    assert restored.step == 1
    _assert_trees_equal(restored.model, states[1])
    fallbacks = [w for w in caught if issubclass(w.category, CheckpointFallbackWarning)]
    if damage == "partial_tmp":
        assert not fallbacks  # orbax never lists an uncommitted step
    else:
        assert len(fallbacks) == 1 and "step 2" in str(fallbacks[0].message)


def test_restore_onto_a_different_mesh(tmp_path):
    assert len(jax.devices()) == 8
    saved_on = make_mesh(8, 1, 1)
    state = shard_params(_state(), saved_on)
    opt_state = optax.sgd(0.1, momentum=0.9).init(state)
    with Checkpointer(tmp_path, handle_sigterm=False) as ckpt:
        ckpt.save(1, model=state, opt_state=opt_state)
    target_mesh = make_mesh(2, 2, 2)
    target = abstract_params(_state(), target_mesh)
    opt_target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated(target_mesh)), opt_state)
    with Checkpointer(tmp_path, handle_sigterm=False) as ckpt:
        restored = ckpt.restore(model=target, opt_state=opt_target)
    w = restored.model["w"].get_value()
    assert w.sharding.mesh.shape == target_mesh.shape
    assert w.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert w.addressable_shards[0].data.shape == (4, 8)
    _assert_trees_equal(restored.model, state)


def test_incompatible_target_and_missing_checkpoints_raise(tmp_path):
    with Checkpointer(tmp_path, handle_sigterm=False) as ckpt:
        with pytest.raises(NoCheckpointError, match="without --resume"):
            ckpt.restore(model=_abstract(_state()))
        ckpt.save(1, model=_state(8, 16))
        with pytest.raises(IncompatibleCheckpointError, match=r"model/w has shape \(8, 16\).*\(8, 32\)"):
            ckpt.restore(model=_abstract(_state(8, 32)))
        with pytest.raises(NoCheckpointError):
            ckpt.restore(model=_abstract(_state()), step=5)
    with pytest.raises(ValueError, match="keep_last"):
        Checkpointer(tmp_path / "x", keep_last=0)


# A training loop that checkpoints every step; run as a child process and killed or stopped.
TRAIN_SCRIPT = textwrap.dedent(
    '''
    import sys, time
    import jax, jax.numpy as jnp, numpy as np, optax
    from iapo_jax.runtime.checkpointing import Checkpointer

    def batch_at(position):
        rng = np.random.default_rng(position)  # the data stream is a function of its position
        x = rng.normal(size=(16, 4)).astype(np.float32)
        return x, x @ np.arange(1.0, 5.0, dtype=np.float32)

    def train(directory, steps, resume, pause=0.0, handle_sigterm=True):
        params = {"w": jnp.zeros((4,)), "b": jnp.zeros(())}
        tx = optax.adam(0.05)
        opt_state, key, position, start = tx.init(params), jax.random.key(0), 0, 0
        ckpt = Checkpointer(directory, keep_last=2, handle_sigterm=handle_sigterm, async_save=True)
        if resume and ckpt.latest_step() is not None:
            abstract = lambda t: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), t)
            r = ckpt.restore(model=abstract(params), opt_state=abstract(opt_state))
            params, opt_state, key, position, start = r.model, r.opt_state, r.rng, r.data_position, r.step + 1

        def loss_fn(p, x, y, noise):
            return jnp.mean((x @ p["w"] + p["b"] + noise - y) ** 2)

        @jax.jit
        def step_fn(params, opt_state, key, x, y):
            key, sub = jax.random.split(key)
            noise = 0.01 * jax.random.normal(sub, y.shape)  # uses the PRNG state every step
            grads = jax.grad(loss_fn)(params, x, y, noise)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, key

        for step in range(start, steps):
            x, y = batch_at(position)
            params, opt_state, key = step_fn(params, opt_state, key, x, y)
            position += 1
            ckpt.maybe_save(step, model=params, opt_state=opt_state, rng=key, data_position=position)
            print(f"step {step}", flush=True)
            if ckpt.should_stop:
                print(f"stopped {step}", flush=True)
                break
            time.sleep(pause)
        ckpt.close()
        return params

    if __name__ == "__main__":
        train(sys.argv[1], int(sys.argv[2]), resume=sys.argv[3] == "resume", pause=float(sys.argv[4]))
    '''
)
STEPS = 12


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    path = tmp_path_factory.mktemp("trainer") / "train_loop.py"
    path.write_text(TRAIN_SCRIPT)
    namespace = {"__name__": "train_loop"}
    exec(compile(TRAIN_SCRIPT, str(path), "exec"), namespace)
    reference = namespace["train"](str(path.parent / "uninterrupted"), STEPS, resume=False,
                                   handle_sigterm=False)
    return path, namespace["train"], reference


def _start(script, directory, mode, pause):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.Popen(
        [sys.executable, str(script), str(directory), str(STEPS), mode, str(pause)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def _wait_for_step(proc, step):
    for line in proc.stdout:
        if line.strip() == f"step {step}":
            return
    raise AssertionError(f"child ended before step {step}: {proc.stderr.read()[-2000:]}")


def test_sigkill_mid_run_then_resume_matches_uninterrupted(trainer, tmp_path):
    script, train, reference = trainer
    proc = _start(script, tmp_path, "fresh", pause=0.3)
    try:
        _wait_for_step(proc, 4)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert 0 < len(_step_dirs(tmp_path)) <= 2  # something was saved, not everything
    resumed = train(str(tmp_path), STEPS, resume=True, handle_sigterm=False)
    _assert_trees_equal(resumed, reference)


def test_sigterm_saves_a_final_checkpoint_and_exits_cleanly(trainer, tmp_path):
    script, train, reference = trainer
    proc = _start(script, tmp_path, "fresh", pause=0.3)
    try:
        _wait_for_step(proc, 2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-2000:]
    stopped = int(out.split("stopped ")[1].split()[0])
    assert stopped < STEPS - 1
    assert max(_step_dirs(tmp_path)) == stopped
    assert "SIGTERM" in err
    resumed = train(str(tmp_path), STEPS, resume=True, handle_sigterm=False)
    _assert_trees_equal(resumed, reference)
