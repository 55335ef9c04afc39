"""One reward spec for every job: a packaged scorer, a trained reward model or prefix scorer, or a
weighted sum of them, written as one string.

    vader                          a packaged scorer by name
    length:target=20               with options (KEY=VALUE, comma separated, values read as YAML)
    runs/rm1                       an `iapo train-rm` run directory (or its head_model.json)
    runs/scorer1                   an `iapo train-scorer` run directory (a prefix scorer)
    runs/rm1:step=100              a trained term's options: step (checkpoint), max_length, batch_size
    0.7*vader+0.3*runs/rm1         a weighted sum (weight 1 when none is written; +-0.5*length
                                   subtracts)
    reward_model:path=runs/rm1     the older form of runs/rm1

``parse_reward_spec`` checks everything that needs no model (syntax, names and options, that each
path holds the artefact it should), ``check_fits`` that every trained term was trained on the
policy's vocabulary (reading configs only), so a bad spec is one line before any model loads.
``build_reward`` then gives a ``Reward`` (text in, scores out) and ``build_scorers`` the
(scorer, weight) pairs controlled decoding combines inside its compiled programs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from iapo_jax.errors import IapoError

PACKAGED, REWARD_MODEL, PREFIX_SCORER = "packaged", "reward_model", "prefix_scorer"
TRAINED_OPTIONS = ("step", "max_length", "batch_size")
_HEAD_KIND = {"reward": REWARD_MODEL, "value": PREFIX_SCORER}
_WEIGHTED = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*\*\s*(.+?)\s*$")
_EXPONENT_END = re.compile(r"\d[eE]$")  # '1e' before a '+' is an exponent, not a sum


class RewardSpecError(IapoError, ValueError):
    """A reward spec that cannot be used as written (syntax, unknown name, wrong or missing path)."""


@dataclasses.dataclass(frozen=True)
class RewardTerm:
    """One weighted source: a packaged scorer (name, options) or a trained head (path, options)."""

    kind: str
    name: str  # registered reward name, or the head's kind (reward_model / prefix_scorer)
    options: tuple[tuple[str, Any], ...] = ()
    weight: float = 1.0
    path: str | None = None  # trained heads: the run directory
    base: str | None = None  # trained heads: the model the head was trained on

    @property
    def option_dict(self) -> dict[str, Any]:
        return dict(self.options)

    @property
    def source(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options)
        head = self.path if self.path is not None else self.name
        return head + (f":{opts}" if opts else "")

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "weight": self.weight}
        out.update({"path": self.path, "base": self.base} if self.path else {"name": self.name})
        if self.options:
            out["options"] = self.option_dict
        return out


@dataclasses.dataclass(frozen=True)
class RewardSpec:
    """A parsed spec: its terms in order. ``str(spec)`` is the canonical form."""

    terms: tuple[RewardTerm, ...]

    def __str__(self) -> str:
        if len(self.terms) == 1 and self.terms[0].weight == 1.0:
            return self.terms[0].source
        return "+".join(f"{t.weight:g}*{t.source}" for t in self.terms)

    @property
    def is_single_packaged(self) -> bool:
        return len(self.terms) == 1 and self.terms[0].kind == PACKAGED and self.terms[0].weight == 1.0

    @property
    def trained(self) -> tuple[RewardTerm, ...]:
        return tuple(t for t in self.terms if t.path is not None)

    def describe(self) -> list[dict[str, Any]]:
        return [t.describe() for t in self.terms]

    def pool_meta(self) -> dict[str, Any]:
        """How a reference pool names the reward that scored it: {"reward", "reward_options"}
        (a single packaged reward as pools always did: its name and options; else the spec)."""
        if self.is_single_packaged:
            return {"reward": self.terms[0].name, "reward_options": self.terms[0].option_dict}
        return {"reward": str(self), "reward_options": {}}


# ----------------------------------------------------------------------------------------------
# Parsing and checks (no model is loaded)
# ----------------------------------------------------------------------------------------------


def parse_reward_spec(text: str, options: Mapping[str, Any] | None = None, *,
                      flag: str = "--reward") -> RewardSpec:
    """The spec of ``text``; ``options`` (from ``--reward-options``) apply to a single term."""
    if not isinstance(text, str) or not text.strip():
        raise RewardSpecError(f"{flag} is empty; pass a reward name (e.g. vader), a trained run "
                              "directory, or a weighted sum such as 0.7*vader+0.3*runs/rm1")
    text = text.strip()
    pieces = [text] if Path(text).expanduser().exists() else _split_sum(text)
    terms = [_parse_term(piece, flag) for piece in pieces]
    if options:
        if len(terms) != 1:
            raise RewardSpecError(f"--reward-options applies to a single reward, but {flag} {text!r} "
                                  "has several terms; write each term's options in the spec "
                                  "(NAME:key=value)")
        merged = {**terms[0].option_dict, **dict(options)}
        terms[0] = _with_options(terms[0], merged, flag)
    return RewardSpec(tuple(terms))


def _split_sum(text: str) -> list[str]:
    parts: list[str] = []
    for piece in text.split("+"):
        if parts and _EXPONENT_END.search(parts[-1]) and _WEIGHTED.match(parts[-1] + "+" + piece):
            parts[-1] += "+" + piece
        else:
            parts.append(piece)
    if any(not p.strip() for p in parts):
        raise RewardSpecError(f"reward spec {text!r} has an empty term; write terms as "
                              "WEIGHT*SOURCE joined by '+', e.g. 0.7*vader+0.3*runs/rm1")
    return parts


def _parse_term(piece: str, flag: str) -> RewardTerm:
    from iapo_jax.rewards.registry import available_rewards

    weight, source = 1.0, piece.strip()
    match = _WEIGHTED.match(piece)
    if match and not Path(source).expanduser().exists():
        weight, source = float(match.group(1)), match.group(2)
        if not math.isfinite(weight):
            raise RewardSpecError(f"weight {match.group(1)} in {flag} is not finite")
    head, options = source, {}
    if not Path(source).expanduser().exists() and ":" in source:
        head, _, raw = source.rpartition(":") if _looks_like_path(source) else source.partition(":")
        options = _parse_options(raw, source, flag)
    if head in available_rewards() and not Path(head).exists():
        if head == "reward_model":  # the older spelling of a train-rm run directory
            if "path" not in options:
                raise RewardSpecError(f"reward_model in {flag} needs path=RUN_DIR (an `iapo train-rm` "
                                      "run directory); or pass the run directory itself")
            path = options.pop("path")
            return _trained_term(str(path), options, weight, flag, want=REWARD_MODEL)
        return _with_options(RewardTerm(PACKAGED, head, weight=weight), options, flag)
    if Path(head).expanduser().exists():
        return _trained_term(head, options, weight, flag)
    if _looks_like_path(head):
        raise RewardSpecError(f"{flag}: {head} does not exist; pass the run directory of an "
                              "`iapo train-rm` or `iapo train-scorer` run")
    raise RewardSpecError(f"unknown reward {head!r} in {flag}: neither a registered reward ("
                          f"{', '.join(available_rewards())}) nor an existing run directory")


def _looks_like_path(text: str) -> bool:
    return "/" in text or os.sep in text or text.startswith(".") or text.endswith(".json")


def _parse_options(raw: str, source: str, flag: str) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in raw.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise RewardSpecError(f"option {item!r} of {source!r} in {flag} is not KEY=VALUE; e.g. "
                                  "length:target=20")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def _with_options(term: RewardTerm, options: dict[str, Any], flag: str) -> RewardTerm:
    """The term with ``options``, each checked against what its source accepts."""
    if term.kind == PACKAGED:
        accepted = _factory_options(term.name)
        bad = [k for k in options if accepted is not None and k not in accepted]
        fix = f"it takes {', '.join(sorted(accepted))}" if accepted else "it takes no options"
    else:
        bad = [k for k in options if k not in TRAINED_OPTIONS]
        fix = f"a trained term takes {', '.join(TRAINED_OPTIONS)}"
    if bad:
        raise RewardSpecError(f"{term.name if term.kind == PACKAGED else term.path} in {flag} does "
                              f"not take option {bad[0]!r}; {fix}")
    for key in ("step", "max_length", "batch_size"):
        if term.kind != PACKAGED and key in options and not (
                isinstance(options[key], int) and options[key] >= (0 if key == "step" else 1)):
            raise RewardSpecError(f"option {key} of {term.path} in {flag} must be a positive "
                                  f"integer, got {options[key]!r}")
    return dataclasses.replace(term, options=tuple(sorted(options.items())))


def _factory_options(name: str) -> set[str] | None:
    """Keyword options a registered reward's factory takes (None: any, it has **kwargs)."""
    from iapo_jax.rewards import registry

    factory = registry.REWARDS.get(name)
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def _trained_term(path: str, options: dict[str, Any], weight: float, flag: str,
                  want: str | None = None) -> RewardTerm:
    """A trained head's run directory (or its head_model.json), checked without loading it."""
    from iapo_jax.rewards.head_checkpoints import SPEC_FILE, HeadModelError, read_spec

    p = Path(path).expanduser()
    if p.is_dir() and not (p / SPEC_FILE).is_file():
        what = (" (it holds a trained policy: pass it as --model or --policy)"
                if (p / "policy" / "config.json").is_file() or (p / "config.json").is_file() else "")
        raise RewardSpecError(f"{flag}: {p} holds no reward model or prefix scorer (no {SPEC_FILE})"
                              f"{what}; pass the run directory of a finished `iapo train-rm` or "
                              "`iapo train-scorer` run")
    try:
        spec, run_dir = read_spec(p)
    except HeadModelError as err:
        raise RewardSpecError(f"{flag}: {err}") from None
    kind = _HEAD_KIND[spec["kind"]]
    if want is not None and kind != want:
        raise RewardSpecError(f"{flag}: {run_dir} holds a {kind.replace('_', ' ')}, not a reward model")
    ckpt = run_dir / spec.get("checkpoint_dir", "checkpoints")
    if not ckpt.is_dir() or not any(c.name.isdigit() for c in ckpt.iterdir()):
        raise RewardSpecError(f"{flag}: {run_dir} has no saved checkpoint in {ckpt.name}/; let its "
                              "training run finish (or --resume it)")
    term = RewardTerm(kind, kind, weight=weight, path=str(run_dir), base=str(spec["base"]))
    return _with_options(term, options, flag)


def check_fits(spec: RewardSpec, policy_source: str, *, flag: str = "--reward") -> None:
    """Every trained term shares the policy's vocabulary (model configs only, no weights read).

    A prefix scorer reads the policy's own tokens, and a reward model's scores mean something only
    on text laid out the way its base model (the one it was trained on) tokenises it; a head on
    another vocabulary is a head of another model family.
    """
    from iapo_jax.models.checkpoints import load_config

    trained = spec.trained
    if not trained:
        return
    try:
        vocab = load_config(policy_source).vocab_size
    except (IapoError, ValueError, OSError) as err:
        raise RewardSpecError(f"cannot read the policy's config ({err})") from None
    for term in trained:
        try:
            base_vocab = load_config(term.base).vocab_size
        except (IapoError, ValueError, OSError) as err:
            raise RewardSpecError(f"{flag}: the base model {term.base!r} that {term.path} was trained "
                                  f"on cannot be read ({str(err).splitlines()[0]}); retrain it or "
                                  "restore that model") from None
        if base_vocab != vocab:
            raise RewardSpecError(
                f"{flag}: {term.path} was trained on {term.base} (vocabulary of {base_vocab} tokens) "
                f"but the policy has {vocab}; train the {term.kind.replace('_', ' ')} on the "
                f"policy's model (`--model {policy_source}`)")


def check_on_tokens(spec: RewardSpec, what: str) -> None:
    """Token-level CD scores every candidate token inside the compiled loop: prefix scorers only."""
    bad = [t for t in spec.terms if t.kind != PREFIX_SCORER]
    if bad:
        raise RewardSpecError(f"{what} scores candidate tokens inside the compiled loop, so every "
                              f"term must be a trained prefix scorer (an `iapo train-scorer` run "
                              f"directory), not {bad[0].source!r}; text rewards work with --mode "
                              "blockwise")


def spec_fingerprint(spec: RewardSpec) -> dict[str, Any]:
    """Content hash of the spec: each term's name, options and weight, and a trained term's files."""
    from iapo_jax.runtime.fingerprints import path_fingerprint

    digest = hashlib.sha256()
    files = {}
    for i, term in enumerate(spec.terms):
        digest.update(json.dumps({"kind": term.kind, "name": term.name, "weight": term.weight,
                                  "options": term.option_dict}, sort_keys=True, default=str).encode())
        if term.path is not None:
            files[f"{i}:{term.path}"] = path_fingerprint(term.path)
            digest.update(files[f"{i}:{term.path}"].encode())
    return {"sha256": digest.hexdigest(), "spec": str(spec), "terms": spec.describe(), "files": files}


# ----------------------------------------------------------------------------------------------
# Building (loads the trained heads)
# ----------------------------------------------------------------------------------------------


def _term_reward(term: RewardTerm):
    """One term as a ``Reward`` on text."""
    from iapo_jax.rewards.registry import get_reward

    opts = term.option_dict
    if term.kind == PACKAGED:
        return get_reward(term.name, **opts)
    if term.kind == REWARD_MODEL:
        return get_reward("reward_model", path=term.path, **opts)
    from iapo_jax.rewards.value_reward import ValueModelReward

    return ValueModelReward.from_run(term.path, **opts)


def build_reward(spec: RewardSpec):
    """A ``Reward`` whose score is sum_i weight_i * score_i of the spec's terms."""
    rewards = [_term_reward(t) for t in spec.terms]
    if len(rewards) == 1 and spec.terms[0].weight == 1.0:
        return rewards[0]
    return WeightedReward(tuple(zip(rewards, (t.weight for t in spec.terms))), name=str(spec))


def build_scorers(spec: RewardSpec, policy) -> list[tuple[Any, float]]:
    """(scorer, weight) pairs for controlled decoding: prefix scorers as value models (compiled,
    on the policy's tokens), every other term as a Reward on the partial text."""
    from iapo_jax.rewards.head_checkpoints import load_head_model

    out = []
    for term in spec.terms:
        if term.kind == PREFIX_SCORER:
            model, _, _ = load_head_model(term.path, kind="value", step=term.option_dict.get("step"))
            if model.config.vocab_size != policy.config.vocab_size:
                raise RewardSpecError(f"{term.path} has a vocabulary of {model.config.vocab_size} "
                                      f"tokens but the policy has {policy.config.vocab_size}")
            out.append((model, term.weight))
        else:
            out.append((_term_reward(term), term.weight))
    return out


class WeightedReward:
    """sum_i w_i * reward_i(prompts, responses): the reward protocol over several rewards."""

    def __init__(self, parts, name: str = "weighted"):
        self.parts, self.name = tuple(parts), name

    def score(self, prompts, responses) -> np.ndarray:
        total = np.zeros(len(responses), np.float64)
        for reward, weight in self.parts:
            total += weight * np.asarray(reward.score(prompts, responses), np.float64)
        return total.astype(np.float32)
