"""Scored rollouts for prefix-scorer training: prompts, sampled responses and their final rewards.

Rows are laid out as the decoding engine lays them out: the chat-templated prompt left-padded to
a common width, then the response tokens (the stop token included in ``lengths``). So the value a
trained scorer gives prefix [x, y^t] here is the value blockwise / token-level CD asks it for.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


@struct.dataclass
class Rollouts:
    prompt_ids: jax.Array  # [B, P] int32, left-padded
    prompt_mask: jax.Array  # [B, P] bool
    tokens: jax.Array  # [B, R] int32, padding after each row's length
    lengths: jax.Array  # [B] int32, the stop token included
    rewards: jax.Array  # [B] float32, r(x, y) of the whole response

    @property
    def size(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def response_len(self) -> int:
        return int(self.tokens.shape[1])

    def take(self, idx) -> "Rollouts":
        return jax.tree.map(lambda x: x[idx], self)

    def as_numpy(self) -> "Rollouts":
        return jax.tree.map(np.asarray, self)


def check_rollouts(r: Rollouts) -> Rollouts:
    """Shapes agree, lengths fit, rewards are finite; raises ValueError naming the problem."""
    b, p = np.shape(r.prompt_ids)
    if np.shape(r.prompt_mask) != (b, p) or np.shape(r.tokens)[0] != b or np.shape(r.lengths) != (b,) \
            or np.shape(r.rewards) != (b,):
        raise ValueError(f"rollout arrays disagree: prompt_ids {np.shape(r.prompt_ids)}, prompt_mask "
                         f"{np.shape(r.prompt_mask)}, tokens {np.shape(r.tokens)}, lengths "
                         f"{np.shape(r.lengths)}, rewards {np.shape(r.rewards)}; build them with "
                         "sample_rollouts or concat_rollouts")
    lengths = np.asarray(r.lengths)
    if b and (lengths.min() < 0 or lengths.max() > np.shape(r.tokens)[1]):
        raise ValueError(f"response lengths must lie in [0, {np.shape(r.tokens)[1]}]; got "
                         f"{lengths.min()}..{lengths.max()}")
    if b and not np.all(np.asarray(r.prompt_mask)[:, -1]):
        raise ValueError("prompts must be left-padded (every row's last prompt column is a real token)")
    if not np.all(np.isfinite(np.asarray(r.rewards))):
        raise ValueError("rollout rewards contain NaN/inf; fix the reward before training a scorer")
    return r


def concat_rollouts(parts: Sequence[Rollouts]) -> Rollouts:
    """Stack rollouts, left-padding prompts (and right-padding responses) to common widths."""
    parts = [p.as_numpy() for p in parts]
    if not parts:
        raise ValueError("no rollouts to concatenate")
    p_w = max(p.prompt_ids.shape[1] for p in parts)
    r_w = max(p.tokens.shape[1] for p in parts)

    def left(x, w, fill):
        return np.pad(x, ((0, 0), (w - x.shape[1], 0)), constant_values=fill)

    def right(x, w):
        return np.pad(x, ((0, 0), (0, w - x.shape[1])))

    return check_rollouts(Rollouts(
        prompt_ids=np.concatenate([left(p.prompt_ids, p_w, 0) for p in parts]).astype(np.int32),
        prompt_mask=np.concatenate([left(p.prompt_mask, p_w, False) for p in parts]).astype(bool),
        tokens=np.concatenate([right(p.tokens, r_w) for p in parts]).astype(np.int32),
        lengths=np.concatenate([p.lengths for p in parts]).astype(np.int32),
        rewards=np.concatenate([p.rewards for p in parts]).astype(np.float32)))


def sample_rollouts(reference, tokenizer, prompts: Sequence[str], reward, *, n: int, max_new_tokens: int,
                    key=0, temperature: float = 1.0, top_k: int = 0, prompts_per_batch: int = 16):
    """n responses per prompt from `reference` (pi_ref), scored by `reward` (a ``Reward``).

    top_k > 0 samples from pi_ref's k most likely tokens (the distribution CD-Q with the same
    top_k bootstraps over), 0 from the full distribution.

    Returns (Rollouts with rows prompt-major, response texts, the prompt of each row).
    """
    from iapo_jax.decoding.inputs import prepare
    from iapo_jax.decoding.engine import sample_batch
    from iapo_jax.rewards.preference_pairs import padded_chunks, prompt_bucket

    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts given; pass at least one prompt")
    if n < 1 or max_new_tokens < 1 or prompts_per_batch < 1:
        raise ValueError(f"n, max_new_tokens and prompts_per_batch must be >= 1 (got {n}, "
                         f"{max_new_tokens}, {prompts_per_batch})")
    key = jax.random.key(key) if isinstance(key, int) else key
    bucket = prompt_bucket(tokenizer, prompts)
    parts, texts, row_prompts = [], [], []
    for chunk, real in padded_chunks(prompts, min(prompts_per_batch, len(prompts))):
        key, sub = jax.random.split(key)
        batch = prepare(reference, chunk, max_new_tokens=max_new_tokens, tokenizer=tokenizer, key=sub,
                        temperature=temperature, top_k=top_k, prompt_buckets=(bucket,))
        out = sample_batch(reference, batch, n=n, tokenizer=tokenizer)
        rows = real * n
        rep = [p for p in chunk[:real] for _ in range(n)]
        scores = np.asarray(reward.score(rep, list(out.texts)[:rows]), np.float32)
        parts.append(Rollouts(
            prompt_ids=np.repeat(np.asarray(batch.ids)[:real], n, 0),
            prompt_mask=np.repeat(np.asarray(batch.mask)[:real], n, 0),
            tokens=np.asarray(out.tokens)[:rows], lengths=np.asarray(out.lengths)[:rows], rewards=scores))
        texts += list(out.texts)[:rows]
        row_prompts += rep
    return concat_rollouts(parts), texts, row_prompts


def save_rollouts(path: str | os.PathLike, rollouts: Rollouts) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.npz")
    r = rollouts.as_numpy()
    np.savez(tmp, prompt_ids=r.prompt_ids, prompt_mask=r.prompt_mask, tokens=r.tokens,
             lengths=r.lengths, rewards=r.rewards)
    os.replace(tmp, path)
    return path


def load_rollouts(path: str | os.PathLike) -> Rollouts:
    with np.load(path) as z:
        missing = {"prompt_ids", "prompt_mask", "tokens", "lengths", "rewards"} - set(z.files)
        if missing:
            raise ValueError(f"{path}: not a rollout file (missing {sorted(missing)}); write it with "
                             "save_rollouts")
        return check_rollouts(Rollouts(**{k: z[k] for k in z.files}))


def response_mask(lengths, width: int) -> jax.Array:
    return jnp.arange(width)[None, :] < jnp.asarray(lengths)[:, None]
