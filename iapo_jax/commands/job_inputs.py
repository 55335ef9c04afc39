"""Inputs the sampling jobs (generate, calibrate, eval) share: prompts, rewards, models, option checks.

Everything here runs before any compute and raises ``JobInputError`` (exit code 2 in the CLI) with
the problem and the fix, so a bad flag never costs a model load or a compile.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from iapo_jax.errors import IapoError

DEFAULT_CHAT_PROMPTS = 16  # chatterbot prompts taken when --num-prompts is not given
POLICY_EXPORT_DIR = "policy"  # a training run's exported policy (HF format) inside its run dir
POLICIES_DIR = "policies"  # a compare run's trained policies, one folder per method


class JobInputError(IapoError, ValueError):
    """A job's option, prompt file, reward or model source cannot be used as given."""


# ----------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------


def read_prompt_file(path: str | os.PathLike) -> list[str]:
    """Prompts from a file: JSONL (``{"prompt": ...}`` objects or JSON strings) when the name ends in
    .jsonl, else one prompt per non-empty line."""
    path = Path(path)
    if not path.is_file():
        raise JobInputError(f"prompt file {path} not found; check --prompts-file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise JobInputError(f"prompt file {path} is not UTF-8 text; save it as UTF-8") from None
    prompts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if path.suffix.lower() != ".jsonl":
            prompts.append(line.strip())
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise JobInputError(f"{path} line {number} is not valid JSON ({err.msg}); each line of a "
                                ".jsonl prompt file must be one JSON object or string") from None
        if isinstance(item, dict):
            item = item.get("prompt")
        if not isinstance(item, str) or not item.strip():
            raise JobInputError(f"{path} line {number} has no prompt; write {{\"prompt\": \"...\"}} "
                                "or a JSON string per line")
        prompts.append(item.strip())
    if not prompts:
        raise JobInputError(f"prompt file {path} holds no prompts; write one prompt per line")
    return prompts


def load_job_prompts(cfg: Any) -> list[str]:
    """The prompts a job's PromptFlags (commands.configs) name."""
    return load_prompts(cfg.prompts_file, split=cfg.prompt_split, categories=cfg.prompt_categories,
                        num_prompts=cfg.num_prompts, seed=cfg.prompt_seed)


def load_prompts(prompts_file: Path | None, *, split: str, categories: Sequence[str],
                 num_prompts: int | None, seed: int) -> list[str]:
    """Prompts from ``prompts_file`` (the first ``num_prompts``, default all) or from the packaged
    chatterbot chat questions of ``split`` (``num_prompts`` of them, default 16, shuffled by seed)."""
    if num_prompts is not None and num_prompts < 1:
        raise JobInputError(f"--num-prompts must be at least 1, got {num_prompts}")
    if prompts_file is not None:
        prompts = read_prompt_file(prompts_file)
        return prompts if num_prompts is None else prompts[:num_prompts]
    from iapo_jax.data.prompts import load_chat_prompts

    try:
        return load_chat_prompts(split, categories=list(categories) or None,
                                 limit=num_prompts or DEFAULT_CHAT_PROMPTS, seed=seed)
    except (ValueError, ImportError) as err:
        raise JobInputError(f"chat prompts: {err}") from None


def check_distinct(prompts: Sequence[str]) -> None:
    """Reference pools hold one row per prompt: repeated prompts are rejected up front."""
    seen: dict[str, int] = {}
    for i, prompt in enumerate(prompts):
        if prompt in seen:
            raise JobInputError(f"prompt {i + 1} repeats prompt {seen[prompt] + 1} ({prompt[:60]!r}); "
                                "remove the duplicate lines from the prompt file")
        seen[prompt] = i


# ----------------------------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------------------------


def parse_key_values(items: Sequence[str], flag: str) -> dict[str, Any]:
    """``("target=20", "path=runs/rm")`` -> {"target": 20, "path": "runs/rm"}; values read as YAML."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = str(item).partition("=")
        if not sep or not key.strip():
            raise JobInputError(f"{flag} takes KEY=VALUE items, got {item!r}; e.g. {flag} target=20")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out


def check_output_file(path: str | os.PathLike | None, flag: str) -> None:
    """A file a job writes outside its run directory: not a folder, in a folder that exists or can
    be created, writable; checked first so a long run never ends unable to save its results."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise JobInputError(f"{flag} {path} is a folder; pass a file name inside it")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise JobInputError(f"{flag} {path}: {ancestor} is a file, not a folder; pass a path in a "
                            "folder")
    if not os.access(ancestor, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise JobInputError(f"{flag} {path} cannot be written (no write permission in {ancestor}); "
                            "choose a folder you can write to")


def check_mesh_batch(cfg: Any, batch: int, what: str = "--batch-size") -> None:
    """A training batch must split evenly over --data x --fsdp (checked before any compute)."""
    for name in ("data", "fsdp", "tensor"):
        value = getattr(cfg, name)
        if value == 0 or value < -1:
            raise JobInputError(f"--{name} must be a positive device count or -1 (all left over), got {value}")
    if cfg.data > 0 and batch % (cfg.data * cfg.fsdp):
        raise JobInputError(f"{what} {batch} does not divide over --data {cfg.data} x --fsdp {cfg.fsdp} = "
                            f"{cfg.data * cfg.fsdp} data-parallel shards; use a multiple of {cfg.data * cfg.fsdp}")


def check_sampling(cfg: Any) -> None:
    """Common sampling options of a job config (fields it lacks are skipped)."""
    def positive_int(name: str) -> None:
        value = getattr(cfg, name, None)
        if value is not None and value < 1:
            raise JobInputError(f"--{name.replace('_', '-')} must be at least 1, got {value}")

    for name in ("max_new_tokens", "batch_prompts", "samples", "n", "block_size", "cd_top_k",
                 "bootstrap"):
        positive_int(name)
    temperature = getattr(cfg, "temperature", None)
    if temperature is not None and not (temperature > 0 and math.isfinite(temperature)):
        raise JobInputError(f"--temperature must be a positive number, got {temperature}")
    top_k = getattr(cfg, "top_k", None)
    if top_k is not None and top_k < 0:
        raise JobInputError(f"--top-k must be >= 0 (0 keeps every token), got {top_k}")
    top_p = getattr(cfg, "top_p", None)
    if top_p is not None and not 0 < top_p <= 1:
        raise JobInputError(f"--top-p must be in (0, 1] (1 keeps every token), got {top_p}")
    data = getattr(cfg, "data", None)
    if data is not None and data != -1 and data < 1:
        raise JobInputError(f"--data must be a positive device count or -1 (all), got {data}")


# ----------------------------------------------------------------------------------------------
# Rewards
# ----------------------------------------------------------------------------------------------


def reward_spec(text: str | None, options: Sequence[str] | dict | None = (), *, flag: str = "--reward",
                policy: str | None = None):
    """The parsed reward spec of a job (see ``iapo_jax.rewards.spec``), checked before any model
    loads: names, options and paths, and (given the policy's source) that every trained term was
    trained on the policy's vocabulary. ``options``: the ``--reward-options`` KEY=VALUE items."""
    from iapo_jax.rewards.spec import RewardSpecError, check_fits, parse_reward_spec

    if not isinstance(options, dict):
        options = parse_key_values(options or (), "--reward-options")
    try:
        spec = parse_reward_spec(text or "", options, flag=flag)
        if policy is not None:
            check_fits(spec, policy, flag=flag)
    except RewardSpecError as err:
        raise JobInputError(str(err)) from None
    return spec


def build_reward(spec):
    """The ``Reward`` of a parsed spec; a missing optional package or a bad option is one line."""
    from iapo_jax.rewards.spec import build_reward as build

    try:
        return build(spec)
    except ImportError as err:
        raise JobInputError(str(err).splitlines()[0]) from None
    except TypeError as err:  # an option the reward does not take
        raise JobInputError(f"reward {spec} does not accept its options: {err}") from None


def make_reward(name: str, options: dict[str, Any] | None = None):
    """The reward of a spec string (a registered name, a trained run directory, a weighted sum)
    built with ``options``; every problem becomes one JobInputError line."""
    return build_reward(reward_spec(name, options or {}))


def record_reward(ctx, name: str, spec) -> str:
    """Fingerprint a reward spec into the run record: what was used (names, options, paths,
    weights) and the content hash of every trained head it reads."""
    term = spec.terms[0]
    if spec.is_single_packaged:  # the same record entry as a plain --reward NAME always had
        return ctx.fingerprint_reward(name, term.name, term.option_dict)
    if len(spec.terms) == 1 and term.path is not None and term.weight == 1.0 and not term.options:
        return ctx.fingerprint_input(name, term.path)  # as a plain run directory always was
    from iapo_jax.rewards.spec import spec_fingerprint

    with ctx.timer("fingerprints"):
        info = spec_fingerprint(spec)
    return ctx.record.add_fingerprint(name, info.pop("sha256"), role="input", **info)


def spec_meta(spec) -> dict[str, Any]:
    """How a pool names the reward that scored it (see RewardSpec.pool_meta)."""
    return spec.pool_meta()


def same_reward(a, b) -> bool:
    """Two specs name the same reward: same terms, weights and options, paths resolved."""
    def key(spec):
        return [(t.kind, t.name, t.weight, t.options,
                 None if t.path is None else str(Path(t.path).resolve())) for t in spec.terms]

    return key(a) == key(b)


def is_reward_name(spec: str) -> bool:
    from iapo_jax.rewards.registry import available_rewards

    return spec in available_rewards()


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


def resolve_model_source(source: str | os.PathLike) -> str:
    """A model source as ``load_model`` takes it; a training run directory that holds an exported
    policy in ``policy/`` stands for that policy. Checked (without loading) before any compute."""
    from iapo_jax.models.checkpoints import resolve_source

    path = Path(source).expanduser()
    if path.is_dir() and not (path / "config.json").is_file() and \
            (path / POLICY_EXPORT_DIR / "config.json").is_file():
        source = str(path / POLICY_EXPORT_DIR)
    elif path.is_dir() and not (path / "config.json").is_file() and (path / POLICIES_DIR).is_dir():
        names = sorted(p.name for p in (path / POLICIES_DIR).iterdir() if (p / "config.json").is_file())
        if names:  # a compare run: one policy per method, the user picks one
            raise JobInputError(f"{path} holds {len(names)} trained policies; pass one of them, e.g. "
                                f"{path / POLICIES_DIR / names[0]} (all: {', '.join(names)})")
    resolve_source(source)  # CheckpointError naming the fix when it is not a model
    return str(source)


def load_model_and_tokenizer(source: str, dtype: str = "float32"):
    """(model, tokenizer) of a resolved model source."""
    from iapo_jax.models.checkpoints import load_model
    from iapo_jax.models.tokenizer import load_tokenizer

    model = load_model(source, dtype=dtype)
    return model, load_tokenizer(source, model=model)


def check_same_vocabulary(model, other, what: str) -> None:
    """Log-probabilities of two models compare the same tokens only with the same vocabulary."""
    a, b = model.config.vocab_size, other.config.vocab_size
    if a != b:
        raise JobInputError(f"the policy has a vocabulary of {a} tokens but the {what} has {b}; "
                            f"use a {what} with the policy's tokenizer")


def load_prefix_scorer(path: str | os.PathLike, policy):
    """The value model (prefix scorer) an ``iapo train-scorer`` run saved in ``path``."""
    from iapo_jax.rewards.head_checkpoints import load_head_model

    model, _, _ = load_head_model(path, kind="value")
    check_same_vocabulary(policy, model, "prefix scorer")
    return model
