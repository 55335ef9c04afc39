"""Multi-process runs: two local JAX processes with 4 CPU devices each form one 8-device mesh.

They take a few SGD steps on a linear model (parameters FSDP-sharded, batch split by process) and
save a checkpoint together; the losses, the parameters and the restored checkpoint must match the
same steps run by this single process on its 8 virtual devices.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from iapo_jax.parallel import distributed
from iapo_jax.parallel.distributed import initialize_distributed

TRAIN = textwrap.dedent(
    '''
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from iapo_jax.parallel.mesh import make_mesh, shard_batch, shard_params

    ROWS, FEATURES, OUT, STEPS, LR = 16, 8, 4, 3, 0.1

    def data():
        rng = np.random.default_rng(0)
        x = rng.normal(size=(ROWS, FEATURES)).astype(np.float32)
        y = (x @ rng.normal(size=(FEATURES, OUT))).astype(np.float32)
        return x, y

    def train(checkpoint_dir=None):
        mesh = make_mesh(data=4, fsdp=2, tensor=1)
        with nnx.use_eager_sharding(False):
            w = nnx.Param(jnp.asarray(np.random.default_rng(1).normal(size=(FEATURES, OUT)), jnp.float32),
                          out_sharding=("embed", "mlp"))
        params = shard_params(nnx.State({"w": w}), mesh)
        x, y = data()
        per_process = ROWS // jax.process_count()
        rows = slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)
        xb, yb = shard_batch((x[rows], y[rows]), mesh)  # each process feeds its own rows

        @jax.jit
        def step(p, xb, yb):
            loss_fn = lambda q: jnp.mean((xb @ q["w"] - yb) ** 2)
            loss, g = jax.value_and_grad(loss_fn)(p)
            return jax.tree.map(lambda a, b: a - LR * b, p, g), loss

        state = nnx.to_pure_dict(params)
        losses = []
        for _ in range(STEPS):
            state, loss = step(state, xb, yb)
            losses.append(float(loss))
        if checkpoint_dir is not None:
            from iapo_jax.runtime.checkpointing import Checkpointer
            nnx.replace_by_pure_dict(params, state)
            with Checkpointer(checkpoint_dir) as ckpt:  # every process takes part
                ckpt.save(STEPS, model=params, rng=jax.random.key(3), data_position={"row": ROWS})
        from jax.experimental import multihost_utils
        w = np.asarray(multihost_utils.process_allgather(state["w"], tiled=True))
        return losses, w
    '''
)

WORKER = textwrap.dedent(
    '''
    import json, sys
    from iapo_jax.parallel.distributed import initialize_distributed
    port, pid, out_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    info = initialize_distributed(coordinator=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    import jax
    assert jax.device_count() == 8 and jax.local_device_count() == 4, jax.devices()
    from train_linear import train
    losses, w = train(checkpoint_dir=out_dir + "/ckpt")
    if jax.process_index() == 0:
        with open(out_dir + "/result.json", "w") as fh:
            json.dump({"losses": losses, "w": w.tolist(), "source": info.source,
                       "processes": jax.process_count()}, fh)
    '''
)


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def train_module(tmp_path):
    (tmp_path / "train_linear.py").write_text(TRAIN)
    (tmp_path / "worker.py").write_text(WORKER)
    namespace = {"__name__": "train_linear"}
    exec(compile(TRAIN, str(tmp_path / "train_linear.py"), "exec"), namespace)
    return namespace


@pytest.mark.multiprocess
def test_two_processes_match_one_process(tmp_path, train_module):
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(tmp_path),
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    for name in ("IAPO_COORDINATOR", "IAPO_NUM_PROCESSES", "IAPO_PROCESS_ID", "JAX_COORDINATOR_ADDRESS"):
        env.pop(name, None)
    procs = [
        subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), str(port), str(i), str(tmp_path)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for i in range(2)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=300))
    finally:
        for proc in procs:
            proc.kill()
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["processes"] == 2 and result["source"] == "arguments"

    losses, w = train_module["train"]()  # the same steps in this process, 8 local devices
    # Cross-process all-reduces may sum in another order than in-process ones: allow float32 noise.
    np.testing.assert_allclose(result["losses"], losses, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(result["w"]), w, rtol=1e-6, atol=1e-7)

    # The checkpoint both processes wrote restores here, onto a single-process mesh.
    import jax
    from flax import nnx

    from iapo_jax.parallel.mesh import abstract_params, make_mesh
    from iapo_jax.runtime.checkpointing import Checkpointer

    with nnx.use_eager_sharding(False):
        target = nnx.State({"w": nnx.Param(jax.numpy.zeros(w.shape), out_sharding=("embed", "mlp"))})
    with Checkpointer(tmp_path / "ckpt", handle_sigterm=False) as ckpt:
        restored = ckpt.restore(model=abstract_params(target, make_mesh(2, 2, 2)))
    assert restored.step == 3 and restored.data_position == {"row": 16}
    np.testing.assert_array_equal(np.asarray(restored.model["w"].get_value()), np.asarray(result["w"], np.float32))


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("IAPO_COORDINATOR", "IAPO_NUM_PROCESSES", "IAPO_PROCESS_ID",
                 "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(distributed, "_cluster_detected", lambda: False)
    return monkeypatch


def test_single_process_is_a_no_op(clean_env):
    info = initialize_distributed()
    assert (info.process_id, info.num_processes, info.source) == (0, 1, "single")
    assert initialize_distributed(num_processes=1).source == "single"


def test_incomplete_or_bad_settings_are_rejected(clean_env):
    clean_env.setenv("IAPO_COORDINATOR", "10.0.0.2:1234")
    with pytest.raises(ValueError, match="missing num_processes, process_id"):
        initialize_distributed()
    clean_env.setenv("IAPO_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="IAPO_NUM_PROCESSES='two' must be an integer"):
        initialize_distributed()
    with pytest.raises(ValueError, match="needs a port"):
        initialize_distributed("10.0.0.2", 2, 0)
    with pytest.raises(ValueError, match="process_id must be in"):
        initialize_distributed("10.0.0.2:1234", 2, 2)


def test_refuses_once_the_backend_is_in_use(clean_env):
    import jax

    jax.devices()  # this test process has already used its backend
    with pytest.raises(RuntimeError, match="call it first"):
        initialize_distributed("127.0.0.1:1234", 2, 0)
