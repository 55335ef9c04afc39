"""Run a sampling function over many prompts: split over processes, then into fixed-size batches.

Every batch has the same number of prompts and the same prompt bucket, so the decoding programs
compile once per job (the last batch is padded with copies of a real prompt, whose outputs are
dropped). With several processes (a TPU pod, multi-host GPUs) each process samples a contiguous
block of the prompts on its own devices and the per-prompt results are gathered, so every process
ends with all of them in prompt order; only process 0 writes files.

Batch b of process p uses the key ``fold_in(key, p * batches_per_process + b)``: a rerun with the
same seed, batch size, device and process counts draws the same samples.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class PromptPlan:
    """How ``num_prompts`` prompts are cut into per-process blocks and batches of ``batch``."""

    num_prompts: int
    batch: int
    process_index: int = 0
    process_count: int = 1

    @classmethod
    def make(cls, num_prompts: int, batch_prompts: int) -> PromptPlan:
        import jax

        if num_prompts < 1:
            raise ValueError("no prompts to sample from; give at least one prompt")
        per_process = math.ceil(num_prompts / jax.process_count())
        return cls(num_prompts, min(batch_prompts, per_process), jax.process_index(),
                   jax.process_count())

    @property
    def per_process(self) -> int:
        return math.ceil(self.num_prompts / self.process_count)

    @property
    def batches_per_process(self) -> int:
        return math.ceil(self.per_process / self.batch)

    def local_prompts(self, prompts: Sequence) -> list:
        """This process's block, padded to whole batches with copies of a real prompt."""
        start = self.process_index * self.per_process
        block = list(prompts[start:start + self.per_process]) or [prompts[0]]
        size = self.batches_per_process * self.batch
        return block + [block[-1]] * (size - len(block))

    def batches(self, prompts: Sequence) -> list[tuple[int, list]]:
        """(global batch id, prompts) for each of this process's batches."""
        local = self.local_prompts(prompts)
        first = self.process_index * self.batches_per_process
        return [(first + b, local[b * self.batch:(b + 1) * self.batch])
                for b in range(self.batches_per_process)]


def gather_rows(local: np.ndarray, plan: PromptPlan) -> np.ndarray:
    """This process's per-prompt rows -> all prompts' rows, in prompt order, on every process."""
    local = np.asarray(local)[:plan.per_process]
    if plan.process_count > 1:
        from jax.experimental import multihost_utils

        local = np.asarray(multihost_utils.process_allgather(local, tiled=True))
    return local[:plan.num_prompts]


def run_batches(prompts: Sequence, plan: PromptPlan,
                sample_batch: Callable[[list, int], Mapping[str, np.ndarray]],
                progress: Callable | None = None) -> dict[str, np.ndarray]:
    """Call ``sample_batch(prompts, batch_id)`` on each batch; its arrays have one leading row per
    prompt. Returns the arrays of all prompts (concatenated over batches and processes)."""
    parts: dict[str, list[np.ndarray]] = {}
    batches = plan.batches(prompts)
    for batch_id, batch in (progress(batches) if progress else batches):
        for name, value in sample_batch(batch, batch_id).items():
            arr = np.asarray(value)
            if arr.shape[:1] != (len(batch),):
                raise ValueError(f"{name}: expected one row per prompt ({len(batch)}), got {arr.shape}")
            parts.setdefault(name, []).append(arr)
    return {name: gather_rows(np.concatenate(arrs), plan) for name, arrs in parts.items()}


def prompt_bucket(tokenizer, prompts: Sequence[str]) -> int:
    """The one prompt bucket that holds every prompt after the chat template."""
    from iapo_jax.decoding.buckets import PROMPT_BUCKETS, bucket_for
    from iapo_jax.decoding.inputs import tokenize_prompts

    ids, _ = tokenize_prompts(list(prompts), tokenizer, chat=True)
    return bucket_for(max(len(i) for i in ids), PROMPT_BUCKETS, "prompt")


def decoding_mesh(data: int):
    """A ('data', 'fsdp', 'tensor') mesh over ``data`` of this process's devices (-1: all) for
    splitting decode rows, or None for one device."""
    import jax

    from iapo_jax.parallel.mesh import make_mesh

    local = jax.local_devices()
    size = len(local) if data == -1 else int(data)
    if not 1 <= size <= len(local):
        raise ValueError(f"--data {data} asks for {size} devices but this process has {len(local)}; "
                         f"use a count from 1 to {len(local)}, or -1 for all")
    return None if size == 1 else make_mesh(size, 1, 1, devices=local[:size])
