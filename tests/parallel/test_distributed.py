"""Multi-process runs: two local JAX processes with 4 CPU devices each form one 8-device mesh.

They take three CTRL train steps (the project's RLOO / PPO-clip step with a k3 KL term) on a tiny
Llama, parameters and Adam moments sharded over fsdp x tensor, each process feeding its own half of
the rollout rows, and save a checkpoint together. The losses, the parameters and the restored
checkpoint must match the same steps run by this single process on its 8 virtual devices, within
float32 rounding of the cross-process reductions.
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
    import jax, jax.numpy as jnp, numpy as np, optax
    from flax import nnx
    import iapo_jax
    from iapo_jax.alignment.ctrl_step import RolloutBatch, StepOptions, make_train_step
    from iapo_jax.parallel.mesh import make_mesh
    from iapo_jax.parallel.sharded_step import shard_train_state

    ROWS, PROMPT, RESPONSE, STEPS = 8, 8, 6, 3
    OPTS = StepOptions(kl_in_loss=True, kl_estimator="k2", use_clip=True)

    def rollout(vocab):
        rng = np.random.default_rng(0)
        prompt_len = rng.integers(3, PROMPT + 1, ROWS)
        mask = np.arange(PROMPT)[None, :] >= (PROMPT - prompt_len)[:, None]
        logp = lambda: (np.log(1.0 / vocab) + rng.normal(0, 0.3, (ROWS, RESPONSE))).astype(np.float32)
        return dict(prompt_ids=np.where(mask, rng.integers(3, vocab, (ROWS, PROMPT)), 0).astype(np.int32),
                    prompt_mask=mask, tokens=rng.integers(3, vocab, (ROWS, RESPONSE)).astype(np.int32),
                    lengths=rng.integers(2, RESPONSE + 1, ROWS).astype(np.int32),
                    advantages=rng.normal(size=ROWS).astype(np.float32), old_logp=logp(), ref_logp=logp())

    def train(model_dir, checkpoint_dir=None):
        mesh = make_mesh(data=2, fsdp=2, tensor=2)
        model = iapo_jax.load_model(model_dir)
        graphdef, state = nnx.split(model)
        optimizer = optax.adamw(1e-3)
        trainable, _, opt_state = shard_train_state(state, None, optimizer.init(state), mesh)
        step = make_train_step(graphdef, optimizer, OPTS, mesh=mesh)
        per_process = ROWS // jax.process_count()
        rows = slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)
        batch = RolloutBatch(**{k: v[rows] for k, v in rollout(model.config.vocab_size).items()})  # own rows
        losses = []
        for _ in range(STEPS):
            trainable, opt_state, metrics = step(trainable, None, opt_state, batch, jnp.float32(0.1),
                                                 jnp.float32(0.2))
            losses.append([float(metrics[k]) for k in ("loss", "grad_norm", "kl_loss_estimate")])
        if checkpoint_dir is not None:
            from iapo_jax.runtime.checkpointing import Checkpointer
            with Checkpointer(checkpoint_dir) as ckpt:  # every process takes part
                ckpt.save(STEPS, model=trainable, opt_state=opt_state, rng=jax.random.key(3),
                          data_position={"row": ROWS})
        from jax.experimental import multihost_utils
        params = {jax.tree_util.keystr(p): np.asarray(multihost_utils.process_allgather(v, tiled=True))
                  for p, v in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(trainable))}
        return losses, params
    '''
)

WORKER = textwrap.dedent(
    '''
    import json, sys
    from iapo_jax.parallel.distributed import initialize_distributed
    port, pid, out_dir, model_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    info = initialize_distributed(coordinator=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    import jax
    assert jax.device_count() == 8 and jax.local_device_count() == 4, jax.devices()
    from train_ctrl import train
    losses, params = train(model_dir, checkpoint_dir=out_dir + "/ckpt")
    if jax.process_index() == 0:
        with open(out_dir + "/result.json", "w") as fh:
            json.dump({"losses": losses, "params": {k: v.tolist() for k, v in params.items()},
                       "source": info.source, "processes": jax.process_count()}, fh)
    '''
)


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def train_module(tmp_path):
    (tmp_path / "train_ctrl.py").write_text(TRAIN)
    (tmp_path / "worker.py").write_text(WORKER)
    namespace = {"__name__": "train_ctrl"}
    exec(compile(TRAIN, str(tmp_path / "train_ctrl.py"), "exec"), namespace)
    return namespace


@pytest.mark.multiprocess
def test_two_processes_match_one_process(tmp_path, train_module, tiny_llama_dir):
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(tmp_path),
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    for name in ("IAPO_COORDINATOR", "IAPO_NUM_PROCESSES", "IAPO_PROCESS_ID", "JAX_COORDINATOR_ADDRESS"):
        env.pop(name, None)
    procs = [
        subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), str(port), str(i), str(tmp_path),
                          str(tiny_llama_dir)],
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

    losses, params = train_module["train"](tiny_llama_dir)  # the same steps here, 8 local devices
    # Cross-process all-reduces may sum in another order than in-process ones: allow float32 noise.
    np.testing.assert_allclose(result["losses"], losses, rtol=1e-5, atol=1e-6)  # the first KL is ~0
    assert losses[-1][0] != losses[0][0]  # the steps really changed the policy
    worst = max(float(np.max(np.abs(np.asarray(result["params"][k], np.float32) - v))) for k, v in params.items())
    print(f"two processes vs one: loss/grad_norm/kl {result['losses'][-1]} vs {losses[-1]}, max param diff {worst:.1e}")
    assert worst < 1e-5  # 1% of the learning rate

    # The checkpoint both processes wrote restores here, onto a single-process mesh of another shape.
    import iapo_jax
    from flax import nnx

    from iapo_jax.parallel.mesh import abstract_params, make_mesh
    from iapo_jax.runtime.checkpointing import Checkpointer

    target = abstract_params(nnx.state(iapo_jax.load_model(tiny_llama_dir)), make_mesh(8, 1, 1))
    with Checkpointer(tmp_path / "ckpt", handle_sigterm=False) as ckpt:
        restored = ckpt.restore(model=target)
    assert restored.step == 3 and restored.data_position == {"row": 8}
    import jax
    for path, value in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(restored.model)):
        np.testing.assert_array_equal(np.asarray(value), np.asarray(result["params"][jax.tree_util.keystr(path)],
                                                                     np.float32))


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
