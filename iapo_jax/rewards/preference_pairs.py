"""Preference pairs (prompt, chosen, rejected) for Bradley-Terry reward models.

No package ships human preference pairs, so pairs are either read from HH-RLHF (the grain pipeline
in ``iapo_jax.data``) or built by sampling n responses per prompt from pi_ref and ranking them with
a scorer: the best against the worst (or every ordered pair), skipping ties. A pair keeps the
scorer's gap, which a margin-BT loss can use.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from iapo_jax.data.tokenize import Prompt

PAIRINGS = ("best_worst", "all")


@dataclasses.dataclass(frozen=True)
class Preference:
    prompt: Prompt  # a user message, or a chat (tuple of {"role", "content"} dicts)
    chosen: str
    rejected: str
    gap: float = 0.0  # score(chosen) - score(rejected) under the scorer that ranked them (0: unknown)


@dataclasses.dataclass(frozen=True)
class PairStats:
    prompts: int
    pairs: int
    skipped_ties: int  # candidate pairs with equal scores (or identical texts)
    prompts_without_pair: int  # prompts whose responses all tied

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def pairs_from_scores(prompts: Sequence[Prompt], responses: Sequence[Sequence[str]], scores,
                      pairing: str = "best_worst", min_gap: float = 0.0) -> tuple[list[Preference], PairStats]:
    """Rank each prompt's responses by score and pair them; ties (gap <= min_gap) are skipped.

    responses: [P][n] texts; scores: [P, n]. 'best_worst' gives at most one pair per prompt (the
    first highest against the first lowest); 'all' gives every pair with distinct scores.
    """
    if pairing not in PAIRINGS:
        raise ValueError(f"unknown pairing {pairing!r}; choose one of {PAIRINGS}")
    if min_gap < 0:
        raise ValueError(f"min_gap must be >= 0 (got {min_gap})")
    scores = np.asarray(scores, np.float64)
    if scores.ndim != 2 or scores.shape[0] != len(prompts) or len(responses) != len(prompts):
        raise ValueError(f"scores must be [prompts, samples] = [{len(prompts)}, n] with one response "
                         f"list per prompt; got scores {scores.shape} and {len(responses)} response lists")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contain NaN/inf; fix the scorer before building pairs")
    pairs: list[Preference] = []
    ties = empty = 0
    for prompt, texts, s in zip(prompts, responses, scores):
        if len(texts) != s.shape[0] or len(texts) < 2:
            raise ValueError(f"each prompt needs >= 2 responses with one score each; got {len(texts)} "
                             f"responses and {s.shape[0]} scores")
        if pairing == "best_worst":
            candidates = [(int(np.argmax(s)), int(np.argmin(s)))]
        else:
            candidates = [(i, j) for i in range(len(texts)) for j in range(i + 1, len(texts))]
        made = 0
        for i, j in candidates:
            if s[i] < s[j]:
                i, j = j, i
            if s[i] - s[j] <= min_gap or texts[i] == texts[j]:
                ties += 1
                continue
            pairs.append(Preference(_frozen_prompt(prompt), texts[i], texts[j], float(s[i] - s[j])))
            made += 1
        empty += made == 0
    return pairs, PairStats(len(prompts), len(pairs), ties, empty)


def padded_chunks(items: Sequence, size: int):
    """(chunk, real) of exactly `size` items each, the last one padded with its first item, so every
    compiled decoding call sees the same number of rows."""
    for start in range(0, len(items), size):
        chunk = list(items[start:start + size])
        real = len(chunk)
        yield chunk + [chunk[0]] * (size - real), real


def prompt_bucket(tokenizer, prompts: Sequence[str]) -> int:
    """One prompt-length bucket that holds every chat-templated prompt (one compiled program)."""
    from iapo_jax.decoding.buckets import bucket_for
    from iapo_jax.decoding.inputs import tokenize_prompts

    ids, _ = tokenize_prompts(list(prompts), tokenizer, chat=True)
    return bucket_for(max(len(i) for i in ids))


def sample_pairs(policy, tokenizer, prompts: Sequence[str], scorer, *, n: int, max_new_tokens: int,
                 key: Any = 0, temperature: float = 1.0, pairing: str = "best_worst",
                 min_gap: float = 0.0, prompts_per_batch: int = 16):
    """Sample n responses per prompt from `policy`, score them with `scorer`, pair them.

    Returns (pairs, stats, scores [P, n], responses [P][n]).
    """
    import jax

    from iapo_jax.decoding.engine import sample

    if n < 2:
        raise ValueError(f"building pairs needs at least 2 samples per prompt (got n={n})")
    if prompts_per_batch < 1:
        raise ValueError(f"prompts_per_batch must be >= 1 (got {prompts_per_batch})")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts given; pass at least one prompt")
    key = jax.random.key(key) if isinstance(key, int) else key
    bucket = prompt_bucket(tokenizer, prompts)
    texts: list[list[str]] = []
    for chunk, real in padded_chunks(prompts, min(prompts_per_batch, len(prompts))):
        key, sub = jax.random.split(key)
        out = sample(policy, chunk, max_new_tokens=max_new_tokens, n=n, key=sub,
                     temperature=temperature, tokenizer=tokenizer, prompt_buckets=(bucket,))
        flat = list(out.texts)
        texts += [flat[i * n:(i + 1) * n] for i in range(real)]
    flat_prompts = [p for p in prompts for _ in range(n)]
    scores = np.asarray(scorer.score(flat_prompts, [t for row in texts for t in row]), np.float64)
    scores = scores.reshape(len(prompts), n)
    pairs, stats = pairs_from_scores(prompts, texts, scores, pairing, min_gap)
    return pairs, stats, scores, texts


def pairs_from_records(records: Iterable[dict]) -> list[Preference]:
    """HH-RLHF records (``data.hh_rlhf_pipeline.preference_loader`` items) -> pairs.

    The prompt is the conversation before the final assistant turn, as chat messages.
    """
    out = []
    for rec in records:
        messages = tuple({"role": m["role"], "content": m["content"]} for m in rec["messages"])
        out.append(Preference(messages or rec["prompt"], rec["chosen"], rec["rejected"]))
    return out


def _frozen_prompt(prompt: Prompt) -> Prompt:
    return prompt if isinstance(prompt, str) else tuple(dict(m) for m in prompt)


def _open_text(path: Path, mode: str):
    """A text file, gzip-compressed when its name ends in .gz (large pair sets travel smaller)."""
    if path.name.endswith(".gz"):
        return gzip.open(path, mode + "t", encoding="utf-8")
    return open(path, mode, encoding="utf-8")


def save_pairs(path: str | os.PathLike, pairs: Sequence[Preference]) -> Path:
    """JSON lines, one pair per line (written to a temporary name, then renamed); a name ending in
    .gz is gzip-compressed."""
    path = Path(path)
    tmp = path.with_name(f".tmp.{path.name}")  # keeps the suffix, so .gz stays compressed
    with _open_text(tmp, "w") as fh:
        for p in pairs:
            prompt = p.prompt if isinstance(p.prompt, str) else list(p.prompt)
            fh.write(json.dumps({"prompt": prompt, "chosen": p.chosen, "rejected": p.rejected,
                                 "gap": p.gap}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def load_pairs(path: str | os.PathLike) -> list[Preference]:
    """Pairs saved by ``save_pairs`` (JSON lines, or gzip-compressed JSON lines named *.gz)."""
    out = []
    with _open_text(Path(path), "r") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                prompt = rec["prompt"] if isinstance(rec["prompt"], str) else tuple(rec["prompt"])
                out.append(Preference(prompt, rec["chosen"], rec["rejected"], float(rec.get("gap", 0.0))))
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{path}:{line_no}: not a preference pair ({err}); expected "
                                 '{"prompt", "chosen", "rejected", "gap"}') from None
    return out
