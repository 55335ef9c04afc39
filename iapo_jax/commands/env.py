"""``iapo env``: show what this machine offers JAX and check that a sharded step runs on it.

Records the environment (the run record does that for every job), then fits a small least-squares
model by gradient descent with the batch sharded over a ('data', 'fsdp', 'tensor') mesh. The data
and initial weights come from the seed, so the logged losses are a deterministic fingerprint of the
numerics: ``iapo reproduce`` on this job is the cheapest end-to-end check of a machine.
"""

from __future__ import annotations

import dataclasses

from iapo_jax.commands import JobSpec
from iapo_jax.commands.common import job_context


@dataclasses.dataclass(frozen=True)
class EnvConfig:
    """Print devices and run a sharded least-squares smoke test."""

    seed: int = 0
    """PRNG seed for the synthetic data and the initial weights."""
    steps: int = 5
    """Gradient-descent steps (each one is logged)."""
    batch: int = 64
    """Rows of synthetic data; must divide over data x fsdp."""
    features: int = 16
    """Input features of the linear model."""
    lr: float = 0.1
    """Step size."""
    data: int = -1
    """Mesh 'data' axis size (-1: all devices left over)."""
    fsdp: int = 1
    """Mesh 'fsdp' axis size."""
    tensor: int = 1
    """Mesh 'tensor' axis size."""


def _loss(w, x, y):
    import jax.numpy as jnp

    return jnp.mean((x @ w - y) ** 2)


def run(cfg: EnvConfig) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from iapo_jax.parallel.mesh import make_mesh, replicated, shard_batch
    from iapo_jax.runtime.progress import print_table

    if cfg.steps < 1 or cfg.batch < 1 or cfg.features < 1:
        raise ValueError("steps, batch and features must be >= 1")
    with job_context("env", cfg) as ctx:
        mesh = make_mesh(cfg.data, cfg.fsdp, cfg.tensor)
        ctx.set_mesh(mesh)
        kx, kw, kn = jax.random.split(ctx.key(cfg.seed), 3)
        x = jax.random.normal(kx, (cfg.batch, cfg.features), jnp.float32)
        true_w = jnp.arange(1, cfg.features + 1, dtype=jnp.float32) / cfg.features
        y = x @ true_w + 0.01 * jax.random.normal(kn, (cfg.batch,), jnp.float32)
        ctx.add_data("synthetic", [x, y], rows=cfg.batch)
        x, y = shard_batch((x, y), mesh)
        w = jax.device_put(jax.random.normal(kw, (cfg.features,), jnp.float32), replicated(mesh))

        @jax.jit
        def step(w, x, y):
            loss, grad = jax.value_and_grad(_loss)(w, x, y)
            return w - cfg.lr * grad, loss

        with ctx.timer("fit"):
            for i in ctx.progress(range(cfg.steps), desc="env", unit="step"):
                w, loss = step(w, x, y)
                ctx.log(i, loss=float(loss))
        final = float(_loss(w, x, y))
        from iapo_jax.data.fingerprint import fingerprint

        ctx.fingerprint_output("weights", sha256=fingerprint(np.asarray(jax.device_get(w))))

        if ctx.is_main:
            facts = ctx.record.data
            print_table({
                "jax": facts["jax"]["version"],
                "backend": facts["jax"]["backend"],
                "devices": f"{jax.device_count()} x {', '.join(facts['jax']['device_kind'])}",
                "processes": facts["jax"]["process_count"],
                "mesh": " x ".join(f"{k}={v}" for k, v in mesh.shape.items()),
                "host cpu": f"{facts['host']['cpu_model']} ({facts['host']['cpu_count']} cores)",
                "python": facts["python"]["version"],
            }, title="environment")
        return {"final_loss": final, "weight_error": float(jnp.linalg.norm(w - true_w))}


JOB = JobSpec(config=EnvConfig, run=run)
