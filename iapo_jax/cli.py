"""The ``iapo`` command: ``iapo <job> [options]``, one job per module in ``iapo_jax.commands``.

Jobs are imported only when asked for, so ``iapo --help`` is instant. Options of a job come from its
config dataclass through tyro; ``--config file.yaml`` sets their defaults and flags override them.
Exit codes: 0 ok, 1 internal error (with a traceback), 2 bad input (one line saying how to fix it),
3 ``iapo reproduce`` found different numbers, 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any, Sequence

from iapo_jax.commands import JOBS, Job, is_available, load_job
from iapo_jax.errors import IapoError

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_MISMATCH, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
# Errors that mean "the input was wrong", reported on one line without a traceback.
USER_ERRORS = (IapoError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
               FileExistsError, PermissionError)


class UsageError(IapoError, ValueError):
    """Bad command-line usage (unknown option, wrong type, missing value)."""


@dataclasses.dataclass(frozen=True)
class CommonOptions:
    """Options every job takes (parsed before the job's own)."""

    config: Path | None = None
    """YAML file whose values become this job's defaults (command-line flags still override)."""
    run_dir: Path | None = None
    """Folder for the run record, metrics and checkpoints (default: runs/<job>-<date>-<time>)."""
    resume: bool = False
    """Continue the run in --run-dir from its latest checkpoint."""
    coordinator: str | None = None
    """Multi-process runs: HOST:PORT of process 0 (or IAPO_COORDINATOR; automatic on TPU pods)."""
    num_processes: int | None = None
    """Multi-process runs: number of processes (or IAPO_NUM_PROCESSES)."""
    process_id: int | None = None
    """Multi-process runs: this process's index (or IAPO_PROCESS_ID)."""


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print usage and exit; we want one line
        raise UsageError(message)


def split_common_options(args: Sequence[str]) -> tuple[CommonOptions, list[str]]:
    """Take the common options out of ``args``; the rest belongs to the job."""
    parser = _RaisingParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--config", type=Path)
    parser.add_argument("--run-dir", type=Path)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--coordinator")
    parser.add_argument("--num-processes", type=int)
    parser.add_argument("--process-id", type=int)
    known, rest = parser.parse_known_args(list(args))
    return CommonOptions(**vars(known)), rest


def top_help() -> str:
    width = max(len(n) for n in JOBS) + 2
    lines = [
        "usage: iapo <job> [options]        (`iapo <job> --help` lists a job's options)",
        "",
        "Inference-aware alignment (InfAlign/CTRL) and controlled decoding in JAX.",
        "",
        "jobs:",
    ]
    for name, summary in JOBS.items():
        missing = "" if is_available(name) else "  [not in this version yet]"
        lines.append(f"  {name.ljust(width)}{summary}{missing}")
    lines += ["", "options every job takes:"]
    for f in dataclasses.fields(CommonOptions):
        flag = "--" + f.name.replace("_", "-")
        doc = " ".join((_field_docs().get(f.name) or "").split())
        lines.append(f"  {flag.ljust(17)}{doc}")
    lines += ["", "exit codes: 0 ok, 1 internal error, 2 bad input, 3 reproduce mismatch"]
    return "\n".join(lines)


def _field_docs() -> dict[str, str]:
    """Attribute docstrings of CommonOptions (tyro shows the same text in each job's help)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(CommonOptions))
    docs, body = {}, tree.body[0].body
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(
                getattr(nxt, "value", None), ast.Constant):
            docs[node.target.id] = str(nxt.value.value)
    return docs


def _one_line_from_tyro(text: str) -> str:
    """The message of tyro's error output as one line.

    tyro prints a title, then blocks separated by rules: the message, the argument's help, a
    pointer to --help. With a terminal the title sits in the box's top border; without one it is
    the first block.
    """
    title, blocks, current = "", [], []
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("╭"):
            title = stripped.strip("╭╮─ ")
            continue
        line = stripped.strip("│╰╯").strip()
        if line and set(line) <= set("─━-"):
            blocks.append(current)
            current = []
        elif line:
            current.append(line.split("error:", 1)[1].strip() if "error:" in line else line)
    blocks.append(current)
    boilerplate = ("Argument helptext", "For full helptext")
    blocks = [b for b in blocks if b and not b[0].startswith(boilerplate)]
    if not title and len(blocks) > 1:
        title = " ".join(blocks.pop(0))
    return " ".join(blocks[0]) if blocks else title or "invalid arguments"


def _parse_job_config(job: Job, args: list[str], common: CommonOptions) -> Any:
    import tyro

    from iapo_jax.commands.configs import config_from_mapping, load_yaml

    cls = job.config_type
    prog = f"iapo {job.name}"
    if not dataclasses.is_dataclass(cls):
        target, default = cls, None
        if common.config is not None:
            raise UsageError(f"--config is not supported by `{prog}`; pass options as flags")
    else:
        mapping = load_yaml(common.config) if common.config is not None else {}
        default = config_from_mapping(cls, mapping, partial=True)
        # Show the common options in the job's help; they were already taken out of ``args``.
        target = dataclasses.make_dataclass(
            "Invocation",
            [("job", Annotated[cls, tyro.conf.arg(name="")], dataclasses.field(default=default)),
             ("common", Annotated[CommonOptions, tyro.conf.arg(name="")],
              dataclasses.field(default=common))],
            frozen=True,
        )
        target.__doc__ = cls.__doc__ or job.summary
        default = None
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            parsed = tyro.cli(target, args=args, prog=prog, default=default,
                              description=(cls.__doc__ or job.summary))
    except SystemExit as exit_:
        if exit_.code in (0, None):
            raise
        raise UsageError(
            f"{_one_line_from_tyro(captured.getvalue())}; run `{prog} --help` for the options"
        ) from None
    sys.stderr.write(captured.getvalue())  # tyro's warnings, if any
    return parsed.job if dataclasses.is_dataclass(cls) else parsed


def _run(name: str, args: list[str]) -> int:
    from iapo_jax.commands.common import run_job
    from iapo_jax.parallel.distributed import initialize_distributed

    job = load_job(name)
    common, job_args = split_common_options(args)
    cfg = _parse_job_config(job, job_args, common)
    initialize_distributed(common.coordinator, common.num_processes, common.process_id)
    if getattr(job.module, "MANAGES_RUN_DIR", False):
        if common.resume:
            raise UsageError(f"`iapo {name}` does not take --resume")
        job.run(cfg, run_dir=common.run_dir)
    else:
        run_job(job, cfg, run_dir=common.run_dir, resume=common.resume, argv=["iapo", name, *args])
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``iapo`` console script; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(top_help())
        return EXIT_OK
    if args[0] in ("-V", "--version"):
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"iapo {version('iapo-jax')}")
        except PackageNotFoundError:
            print("iapo (not installed)")
        return EXIT_OK
    name, rest = args[0], args[1:]
    prefix = f"iapo {name}" if name in JOBS else "iapo"
    try:
        return _run(name, rest)
    except SystemExit as exit_:  # tyro's --help
        return int(exit_.code or 0)
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        from iapo_jax.commands.reproduce import ReproduceMismatch

        if isinstance(err, ReproduceMismatch):
            print(f"{prefix}: {err}", file=sys.stderr)
            return EXIT_MISMATCH
        if isinstance(err, USER_ERRORS) and not os.environ.get("IAPO_DEBUG"):
            message = " ".join(str(err).split()) or type(err).__name__
            hint = "" if isinstance(err, IapoError) else " (IAPO_DEBUG=1 shows the traceback)"
            print(f"{prefix}: error: {message}{hint}", file=sys.stderr)
            return EXIT_USAGE
        traceback.print_exc()
        print(f"{prefix}: internal error ({type(err).__name__}); please report it with the "
              "traceback above", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
