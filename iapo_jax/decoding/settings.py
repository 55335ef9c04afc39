"""The two settings every decoding mode takes: what to sample, and the frame it runs in.

``SamplingConfig`` holds the sampling settings. Each is a scalar or one value per prompt, and all of
them become traced arrays, so changing a value never recompiles. ``FrameConfig`` holds what shapes
the run: tokenizer and chat template, mesh, length buckets and the top-k/top-p fast-path cap.
Every mode also takes their fields as keywords (``max_new_tokens=32, mesh=mesh``), which override
the configs' values.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from iapo_jax.decoding.buckets import PROMPT_BUCKETS, RESPONSE_BUCKETS
from iapo_jax.decoding.filters import DEFAULT_CAP


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """What is sampled. Scalars or one value per prompt; stop_tokens: ids or token strings, shared
    or one set per prompt (None: the model's EOS ids); key: an int seed or a PRNG key."""

    max_new_tokens: Any = None  # required
    temperature: Any = 1.0
    top_k: Any = 0
    top_p: Any = 1.0
    greedy: Any = False
    stop_tokens: Any = None
    key: Any = 0


@dataclasses.dataclass(frozen=True)
class FrameConfig:
    """Where and in what shapes decoding runs. tokenizer: needed for string prompts and text
    output (chat template applied when ``chat``); mesh: split the rows over its ``data_axis``;
    buckets: the prompt and response lengths compiled for; cap: candidates top-k/top-p see on the
    fast path."""

    tokenizer: Any = None
    chat: bool = True
    mesh: Any = None
    data_axis: str = "data"
    prompt_buckets: Sequence[int] = PROMPT_BUCKETS
    response_buckets: Sequence[int] = RESPONSE_BUCKETS
    cap: int = DEFAULT_CAP


SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingConfig))
FRAME_FIELDS = tuple(f.name for f in dataclasses.fields(FrameConfig))


def resolve_settings(mode: str, sampling: SamplingConfig | None, frame: FrameConfig | None,
                     overrides: dict[str, Any], *, unused: Sequence[str] = ()) -> tuple[SamplingConfig, FrameConfig]:
    """The configs a mode runs with: ``sampling`` and ``frame`` (defaults when None) with the
    keyword ``overrides`` applied. TypeError for an unknown keyword, a missing max_new_tokens, or a
    sampling setting in ``unused`` (one the mode does not apply) set away from its default."""
    unknown = sorted(set(overrides) - set(SAMPLING_FIELDS) - set(FRAME_FIELDS))
    if unknown:
        raise TypeError(f"{mode}() got unexpected keyword argument(s) {unknown}; sampling settings are "
                        f"{list(SAMPLING_FIELDS)}, frame settings {list(FRAME_FIELDS)}")
    sampling = dataclasses.replace(sampling or SamplingConfig(),
                                   **{k: v for k, v in overrides.items() if k in SAMPLING_FIELDS})
    frame = dataclasses.replace(frame or FrameConfig(), **{k: v for k, v in overrides.items() if k in FRAME_FIELDS})
    if sampling.max_new_tokens is None:
        raise TypeError(f"{mode}() needs max_new_tokens (a keyword or SamplingConfig.max_new_tokens)")
    for name in unused:
        value, default = getattr(sampling, name), getattr(SamplingConfig(), name)
        if not (np.ndim(value) == 0 and value == default):
            raise TypeError(f"{mode}() does not apply {name} (got {value!r}); leave it unset")
    return sampling, frame
