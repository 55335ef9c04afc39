"""Prompt and response length buckets: one compiled program per bucket, not per length.

Prompts are left-padded to the smallest prompt bucket that holds the longest prompt of the batch,
and the KV cache is sized to that bucket plus the response bucket (not to the model's context).
"""

from __future__ import annotations

from typing import Sequence

# Steps of about 1.5x: attention reads every cache slot each step, so padding costs time, while
# every extra bucket costs one compile.
PROMPT_BUCKETS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
RESPONSE_BUCKETS = (8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)


def bucket_for(length: int, buckets: Sequence[int] = PROMPT_BUCKETS, what: str = "prompt") -> int:
    """Smallest bucket >= length; a clear error when even the largest is too small."""
    if length < 1:
        raise ValueError(f"{what} length must be at least 1, got {length}.")
    for b in sorted(buckets):
        if length <= b:
            return b
    raise ValueError(f"{what} of {length} tokens is longer than the largest {what} bucket "
                     f"({max(buckets)}); shorten it or pass larger buckets.")
