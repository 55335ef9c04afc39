"""Parsing Anthropic HH-RLHF preference lines (pure Python, no TFDS).

Each line of the official ``<subset>/{train,test}.jsonl.gz`` files is
``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}``: two transcripts that
share every turn but the last assistant turn. A pair becomes

    prompt     the shared transcript up to and including the final "\\n\\nAssistant:"
    chosen     the final assistant turn of "chosen" (stripped)
    rejected   the final assistant turn of "rejected" (stripped)
    messages   the prompt as chat messages [{"role": "user"|"assistant", "content": ...}],
               ending with a user turn, ready for tokenizer.apply_chat_template
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import re
from pathlib import Path
from typing import Iterator

from iapo_jax.errors import IapoError

ASSISTANT = "\n\nAssistant:"
_TURN = re.compile(r"\n\n(Human|Assistant):")
_ROLES = {"Human": "user", "Assistant": "assistant"}


class MalformedPreferenceError(IapoError, ValueError):
    """A preference line that cannot be parsed; ``str()`` names the file and line when known."""


@dataclasses.dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str
    messages: tuple[dict[str, str], ...]


def split_final_turn(transcript: str) -> tuple[str, str]:
    """(prompt up to and including the last "\\n\\nAssistant:", the final response stripped)."""
    cut = transcript.rfind(ASSISTANT)
    if cut < 0:
        raise MalformedPreferenceError('transcript has no "\\n\\nAssistant:" turn')
    end = cut + len(ASSISTANT)
    return transcript[:end], transcript[end:].strip()


def parse_turns(prompt: str) -> list[dict[str, str]]:
    """Chat messages of a prompt transcript (without the trailing empty assistant header)."""
    body = prompt[: -len(ASSISTANT)] if prompt.endswith(ASSISTANT) else prompt
    pieces = _TURN.split(body)
    # pieces = [text before the first marker, role, content, role, content, ...]
    if pieces[0].strip():
        raise MalformedPreferenceError('transcript does not start with "\\n\\nHuman:"')
    messages = []
    for role, content in zip(pieces[1::2], pieces[2::2]):
        content = content.strip()
        if not content:
            raise MalformedPreferenceError(f"empty {role} turn (turn {len(messages) + 1})")
        messages.append({"role": _ROLES[role], "content": content})
    if not messages or messages[0]["role"] != "user" or messages[-1]["role"] != "user":
        raise MalformedPreferenceError("the prompt must start and end with a Human turn")
    return messages


def parse_pair(record) -> PreferencePair:
    """Parses one decoded json line; raises MalformedPreferenceError saying what is wrong."""
    if not isinstance(record, dict):
        raise MalformedPreferenceError(f"expected a JSON object, got {type(record).__name__}")
    for field in ("chosen", "rejected"):
        if not isinstance(record.get(field), str):
            raise MalformedPreferenceError(f"missing or non-string field {field!r}")
    prompt, chosen = split_final_turn(record["chosen"])
    rejected_prompt, rejected = split_final_turn(record["rejected"])
    if rejected_prompt != prompt:
        raise MalformedPreferenceError("chosen and rejected transcripts differ before the final turn")
    if not chosen or not rejected:
        raise MalformedPreferenceError(f"empty final Assistant turn in {'chosen' if not chosen else 'rejected'}")
    return PreferencePair(prompt, chosen, rejected, tuple(parse_turns(prompt)))


def find_split_file(directory: Path, split: str) -> Path:
    """``<directory>/<split>.jsonl.gz`` or ``.jsonl``; raises FileNotFoundError naming both."""
    for name in (f"{split}.jsonl.gz", f"{split}.jsonl"):
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(
        f"no {split}.jsonl.gz or {split}.jsonl in {directory}; download the subset folders from "
        "https://github.com/anthropics/hh-rlhf and pass their parent folder as manual_dir"
    )


def read_pairs(path, strict: bool = False, skipped: list | None = None) -> Iterator[tuple[int, PreferencePair]]:
    """Yields (1-based line number, pair) from a jsonl(.gz) file.

    Bad lines are skipped, with (line number, reason) appended to ``skipped``; with ``strict`` the
    first bad line raises MalformedPreferenceError naming the file and line instead. Blank lines
    are ignored.
    """
    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise MalformedPreferenceError(f"invalid JSON ({err.msg})") from None
                pair = parse_pair(record)
            except MalformedPreferenceError as err:
                if strict:
                    raise MalformedPreferenceError(
                        f"{path}:{line_no}: {err}; fix or remove the line, or build with strict=False "
                        "to skip bad lines"
                    ) from None
                if skipped is not None:
                    skipped.append((line_no, str(err)))
                continue
            yield line_no, pair
