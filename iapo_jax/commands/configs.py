"""Job configs from YAML files and run records: plain mappings -> typed frozen dataclasses.

``--config file.yaml`` values become the defaults of a job's options (command-line flags still
override them), and ``iapo reproduce`` rebuilds a config from the dict stored in a run record. Both
go through ``config_from_mapping``, which checks every key and value against the dataclass's type
hints and names the offending key and the fix when something does not fit.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from pathlib import Path, PurePath
from typing import Any, Literal, Mapping

from iapo_jax.errors import IapoError


class ConfigError(IapoError, ValueError):
    """A config file or recorded config does not fit the job's options."""


@dataclasses.dataclass(frozen=True)
class MeshFlags:
    """Device-mesh options shared by the training jobs (see docs/scale_out.md)."""

    data: int = 1
    """Mesh 'data' axis size (-1: all devices left over). 1 with fsdp=tensor=1 runs unsharded."""
    fsdp: int = 1
    """Mesh 'fsdp' axis size (parameters and optimizer state sharded over it)."""
    tensor: int = 1
    """Mesh 'tensor' axis size (heads and MLP width sharded over it)."""


@dataclasses.dataclass(frozen=True)
class PromptFlags:
    """Where a job's prompts come from: a file, or the packaged chat questions (see
    job_inputs.load_job_prompts)."""

    prompts_file: Path | None = None
    """Prompts, one per line (or .jsonl with {"prompt": ...}); default: packaged chat questions."""
    prompt_split: Literal["train", "eval", "all"] = "train"
    """Split of the packaged chat questions (when no --prompts-file)."""
    prompt_categories: tuple[str, ...] = ()
    """Restrict the packaged chat questions to these categories (e.g. food science)."""
    num_prompts: int | None = None
    """How many prompts (default: all of the file, or 16 chat questions)."""
    prompt_seed: int = 0
    """Shuffle seed of the packaged chat questions."""


@dataclasses.dataclass(frozen=True)
class HeadTrainingFlags(MeshFlags):
    """What trains and how, for the jobs that train a scalar-head model (train-rm, train-scorer):
    alignment.head_trainer.HeadTrainConfig's settings as flags, plus the mesh."""

    mode: Literal["full", "lora", "head"] = "head"
    """What trains: every weight, LoRA factors + head, or the head on a frozen backbone."""
    lora_rank: int = 8
    """LoRA rank (mode lora)."""
    lora_alpha: float = 16.0
    """LoRA scale alpha (mode lora)."""
    steps: int = 200
    """Optimizer steps."""
    batch_size: int = 16
    """Training examples per step."""
    learning_rate: float = 1e-3
    """Peak learning rate (linear warmup, then cosine decay to a tenth)."""
    warmup_steps: int = 10
    """Warmup steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm."""
    eval_every: int = 50
    """Log the held-out metric every this many steps (0: only at the end)."""
    save_every: int = 0
    """Checkpoint every this many steps (0: only at the end)."""
    seed: int = 0
    """Seed of sampling, initialisation and batch order."""

    def head_train_settings(self) -> dict[str, Any]:
        """The keyword arguments of HeadTrainConfig these flags set (eval_every is the job's)."""
        mesh = {f.name for f in dataclasses.fields(MeshFlags)}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(HeadTrainingFlags)
                if f.name not in mesh and f.name != "eval_every"}


def recorded_config(spec: Any, recorded: Mapping[str, Any] | None) -> dict[str, Any]:
    """A run record's config, with the values that keys added since imply for records written
    before them (the JobSpec's ``record_defaults``): an old run resumes and reproduces with the
    behaviour it was recorded with, not with a newer default."""
    return {**spec.record_defaults, **dict(recorded or {})}


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; ConfigError for a missing file, bad YAML or a non-mapping document."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; check the path given to --config")
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", err)
        raise ConfigError(f"{path} is not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path} must hold a mapping of option names to values, got {type(data).__name__}"
        )
    return data


def _strip_annotated(tp: Any) -> Any:
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check and convert one value to type ``tp`` (the subset of types job configs use)."""
    tp = _strip_annotated(tp)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    def fail(expected: str) -> ConfigError:
        return ConfigError(f"option {key!r} expects {expected}, got {value!r}; fix its value")

    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, key)
            except ConfigError as err:
                errors.append(err)
        raise fail(" or ".join(_type_name(a) for a in args))
    if origin is Literal:
        if value in args:
            return value
        raise fail(f"one of {', '.join(repr(a) for a in args)}")
    if tp is type(None):
        if value is None:
            return None
        raise fail("null")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail("true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise fail("an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise fail("a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise fail("a string")
    if isinstance(tp, type) and issubclass(tp, PurePath):
        if isinstance(value, (str, PurePath)):
            return tp(value)
        raise fail("a path")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        for member in tp:
            if value in (member.value, member.name):
                return member
        raise fail(f"one of {', '.join(str(m.value) for m in tp)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, Mapping):
            return config_from_mapping(tp, value, prefix=f"{key}.")
        raise fail(f"a mapping of {_type_name(tp)} options")
    if origin in (tuple, list, set, frozenset) or tp in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise fail("a list")
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(args) != len(value):
                raise fail(f"a list of {len(args)} items")
            items = [_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            item_tp = args[0] if args else Any
            items = [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return (origin or tp)(items)
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise fail("a mapping")
        key_tp, val_tp = args if args else (Any, Any)
        return {_convert(k, key_tp, key): _convert(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    return value  # an exotic type: pass through and let the dataclass decide


def config_from_mapping(cls: type, mapping: Mapping[str, Any], *, prefix: str = "",
                        partial: bool = False) -> Any:
    """Build dataclass ``cls`` from ``mapping`` (keys may use '-' or '_').

    Unknown keys and ill-typed values raise ConfigError. With ``partial=True`` fields missing from
    the mapping that have no default become ``tyro.MISSING`` (the command line must supply them).
    """
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    given = {}
    for raw_key, value in mapping.items():
        name = str(raw_key).replace("-", "_")
        if name not in fields:
            valid = ", ".join(n.replace("_", "-") for n in fields)
            raise ConfigError(
                f"unknown option {prefix}{raw_key!s} for {cls.__name__}; valid options: {valid}"
            )
        given[name] = _convert(value, hints[name], f"{prefix}{name.replace('_', '-')}")
    if partial:
        import tyro

        for name, f in fields.items():
            no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if name not in given and no_default:
                given[name] = tyro.MISSING
    try:
        return cls(**given)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"invalid {cls.__name__} options: {err}") from None
