"""The ``iapo`` command: ``iapo <job> [options]``, one job per module in ``iapo_jax.commands``.

Jobs are imported only when asked for, so ``iapo --help`` is instant. Options of a job come from its
config dataclass through tyro; ``--config file.yaml`` sets their defaults and flags override them.
Exit codes: 0 ok, 1 internal error (with a traceback), 2 bad input (one line saying how to fix it),
3 ``iapo reproduce`` found a difference, 75 preempted (SIGTERM: the run stopped early and says how
to continue; schedulers treat 75 as "try again"), 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import Annotated, Any, Sequence

from iapo_jax.commands import JOBS, Job, is_available, load_job
from iapo_jax.errors import IapoError
from iapo_jax.runtime.signals import Preempted

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_MISMATCH, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: not finished, not broken; continue it later
EXIT_CODES = ("exit codes: 0 ok, 1 internal error, 2 bad input, 3 reproduce mismatch, "
              "75 preempted (SIGTERM; the message says how to continue), 130 interrupted (Ctrl-C)")
# Errors that mean "the input was wrong", reported on one line without a traceback.
USER_ERRORS = (IapoError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
               FileExistsError, PermissionError)


class UsageError(IapoError, ValueError):
    """Bad command-line usage (unknown option, wrong type, missing value)."""


@dataclasses.dataclass(frozen=True)
class CommonOptions:
    """Options the jobs take (parsed before the job's own); see ``job_option_groups``."""

    config: Path | None = None
    """YAML file whose values become this job's defaults (command-line flags still override)."""
    run_dir: Path | None = None
    """Folder for the run record, metrics and outputs: a new or empty folder (default:
    runs/<job>-<date>-<time>)."""
    resume: bool = False
    """Jobs that checkpoint (ctrl, train-rm, train-scorer): continue the run in --run-dir from its
    latest checkpoint, with the settings of its record (ctrl: only --steps may change)."""
    allow_changes: bool = False
    """With --resume: continue even though settings other than those may change (the record lists
    each change; the continued run is then not the run that was started)."""
    quiet: bool = False
    """No progress bars or progress lines (the summary and errors still print)."""
    coordinator: str | None = None
    """Multi-process runs: HOST:PORT of process 0 (or IAPO_COORDINATOR; automatic on TPU pods)."""
    num_processes: int | None = None
    """Multi-process runs: number of processes (or IAPO_NUM_PROCESSES)."""
    process_id: int | None = None
    """Multi-process runs: this process's index (or IAPO_PROCESS_ID)."""


RESUME_FLAGS = ("resume", "allow_changes")
DISTRIBUTED_FLAGS = ("coordinator", "num_processes", "process_id")


def job_option_names(spec: Any) -> tuple[str, ...]:
    """The CommonOptions a job takes (from its JobSpec): --resume only where it checkpoints, the
    multi-process flags only where it can run on several processes."""
    if spec.recordless:  # reads records, writes none (`iapo runs`)
        return ()
    names = [f.name for f in dataclasses.fields(CommonOptions)]
    if not spec.resumable:
        names = [n for n in names if n not in RESUME_FLAGS]
    if spec.single_process:
        names = [n for n in names if n not in DISTRIBUTED_FLAGS]
    return tuple(names)


def _options_type(names: tuple[str, ...]) -> type:
    """A dataclass of the given CommonOptions fields (for the job's help), docs kept."""
    import typing

    import tyro

    hints = typing.get_type_hints(CommonOptions)
    defaults = {f.name: f.default for f in dataclasses.fields(CommonOptions)}
    docs = _field_docs()
    spec = [(n, Annotated[hints[n], tyro.conf.arg(help=" ".join(docs.get(n, "").split()))],
             dataclasses.field(default=defaults[n])) for n in names]
    return dataclasses.make_dataclass("Options", spec, frozen=True)


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print usage and exit; we want one line
        raise UsageError(message)


def split_common_options(args: Sequence[str], job: Job | None = None
                         ) -> tuple[CommonOptions, list[str]]:
    """Take the common options out of ``args``; the rest belongs to the job.

    With the ``job``, options it does not take are refused with the reason.
    """
    parser = _RaisingParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--config", type=Path)
    parser.add_argument("--run-dir", type=Path)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--allow-changes", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--coordinator")
    parser.add_argument("--num-processes", type=int)
    parser.add_argument("--process-id", type=int)
    known, rest = parser.parse_known_args(list(args))
    common = CommonOptions(**vars(known))
    if job is not None:
        allowed = job_option_names(job.spec)
        spec, job = job.spec, job.name
        if spec.recordless:
            given = [f.name for f in dataclasses.fields(CommonOptions)
                     if getattr(common, f.name) not in (None, False)]
            if given:
                raise UsageError(f"`iapo {job}` writes no run record and takes none of the jobs' "
                                 f"options; drop --{given[0].replace('_', '-')}")
        if (common.resume or common.allow_changes) and "resume" not in allowed:
            raise UsageError(f"`iapo {job}` saves no checkpoints, so it has no --resume; run it "
                             "again into a new --run-dir")
        given = [n for n in DISTRIBUTED_FLAGS if getattr(common, n) is not None]
        if given and DISTRIBUTED_FLAGS[0] not in allowed:
            flags = ", ".join("--" + n.replace("_", "-") for n in given)
            raise UsageError(f"`iapo {job}` runs in a single process; drop {flags}")
        if common.allow_changes and not common.resume:
            raise UsageError("--allow-changes only goes with --resume (it lets a resumed run "
                             "change recorded settings); add --resume or drop it")
    return common, rest


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
    lines += ["", "options of the jobs:"]
    for f in dataclasses.fields(CommonOptions):
        flag = "--" + f.name.replace("_", "-")
        doc = " ".join((_field_docs().get(f.name) or "").split())
        lines.append(f"  {flag.ljust(17)}{doc}")
    lines += ["", EXIT_CODES]
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


def _description(job: Job) -> str:
    import inspect

    text = inspect.cleandoc(job.config_type.__doc__ or job.summary)
    if job.spec.resumable:
        return (f"{text}\n\nPreemption: SIGTERM saves a checkpoint at the next step and exits "
                f"with status {EXIT_PREEMPTED}; `--run-dir RUN --resume` continues the recorded "
                f"run exactly.\n{EXIT_CODES}")
    return f"{text}\n\n{EXIT_CODES}"


def _parse_job_config(job: Job, args: list[str], common: CommonOptions,
                      recorded: dict | None = None) -> Any:
    """The job's config from its flags; defaults from ``recorded`` (a resumed run's record) and
    then --config, so flags given on a resume are the only changes."""
    import tyro

    from iapo_jax.commands.configs import config_from_mapping, load_yaml

    cls = job.config_type
    prog = f"iapo {job.name}"
    if not dataclasses.is_dataclass(cls):
        target, default = cls, None
        if common.config is not None:
            raise UsageError(f"--config is not supported by `{prog}`; pass options as flags")
    else:
        mapping = dict(recorded or {})
        if common.config is not None:
            mapping.update(load_yaml(common.config))
        default = config_from_mapping(cls, mapping, partial=True)
        # Show the job's common options in its help; they were already taken out of ``args``.
        names = job_option_names(job.spec)
        options = _options_type(names)
        target = dataclasses.make_dataclass(
            "Invocation",
            [("job", Annotated[cls, tyro.conf.arg(name="")], dataclasses.field(default=default)),
             ("common", Annotated[options, tyro.conf.arg(name="")],
              dataclasses.field(default=options(**{n: getattr(common, n) for n in names})))],
            frozen=True,
        )
        target.__doc__ = cls.__doc__ or job.summary
        default = None
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            parsed = tyro.cli(target, args=args, prog=prog, default=default,
                              description=_description(job))
    except SystemExit as exit_:
        if exit_.code in (0, None):
            raise
        raise UsageError(
            f"{_one_line_from_tyro(captured.getvalue())}; run `{prog} --help` for the options"
        ) from None
    sys.stderr.write(captured.getvalue())  # tyro's warnings, if any
    return parsed.job if dataclasses.is_dataclass(cls) else parsed


def _run(name: str, args: list[str]) -> int:
    from iapo_jax.commands import resume as resuming
    from iapo_jax.commands.common import run_job
    from iapo_jax.commands.configs import recorded_config
    from iapo_jax.commands.option_checks import check_options
    from iapo_jax.parallel.distributed import initialize_distributed
    from iapo_jax.runtime.progress import quiet_progress

    job = load_job(name)
    common, job_args = split_common_options(args, job)
    previous = resuming.load_previous(name, common.run_dir) if common.resume else None
    cfg = _parse_job_config(job, job_args, common,
                            previous and recorded_config(job.spec, previous["config"]))
    if job.spec.recordless:
        check_options(cfg)
        return int(job.run(cfg) or EXIT_OK)
    extra = {}
    if previous is not None:
        changes = resuming.check_changes(job.spec, name, previous["config"], cfg,
                                         allow=common.allow_changes)
        if resuming.nothing_to_do(previous, changes):
            print(resuming.noop_message(name, common.run_dir, previous, job.spec), file=sys.stderr)
            return EXIT_OK
        extra = resuming.allowed_changes_extra(job.spec, previous, changes)
    check_options(cfg)  # rates, sizes and dtypes no job can use, before any job code runs
    initialize_distributed(common.coordinator, common.num_processes, common.process_id)
    with quiet_progress(common.quiet):
        if job.spec.manages_run_dir:
            job.run(cfg, run_dir=common.run_dir)
            return EXIT_OK
        ctx = run_job(job, cfg, run_dir=common.run_dir, resume=common.resume,
                      argv=["iapo", name, *args], extra=extra)
    if ctx.status == "preempted":
        print(_stopped_message(name, "preempted", ctx.run_dir, ctx.record.data["checkpoints"]),
              file=sys.stderr)
        return EXIT_PREEMPTED
    return EXIT_OK


def _stopped_message(name: str, how: str, run_dir: Any, checkpoints: list[int] | None) -> str:
    """What a stopped run says: where it is and how to continue it."""
    from iapo_jax.commands import JobSpec, module_name

    if run_dir is None:
        return f"iapo {name}: {how}"
    spec = getattr(sys.modules.get(module_name(name)), "JOB", None)  # loaded if it got this far
    if isinstance(spec, JobSpec) and spec.resumable:
        saved = (f"checkpoint of step {max(checkpoints)} saved" if checkpoints
                 else "no checkpoint yet")
        return (f"iapo {name}: {how} ({saved}); continue it with "
                f"`iapo {name} --run-dir {run_dir} --resume`")
    return (f"iapo {name}: {how}; the record in {run_dir} says so; this job saves no checkpoints, "
            "so run it again into a new --run-dir")


@contextlib.contextmanager
def _one_line_warnings(prefix: str):
    """Our own warnings (a checkpoint fallback) as one line each, without Python's source line."""
    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if category.__module__.startswith("iapo_jax."):
            print(f"{prefix}: warning: {' '.join(str(message).split())}", file=file or sys.stderr)
        else:
            original(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = original


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``iapo`` console script; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    prefix = f"iapo {args[0]}" if args and args[0] in JOBS else "iapo"
    with _one_line_warnings(prefix):
        return _main(args)


def _main(args: list[str]) -> int:
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
    except BrokenPipeError:  # `iapo runs | head`: the reader has all it wanted
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt as err:
        print(_stopped_message(name, "interrupted", getattr(err, "iapo_run_dir", None),
                               getattr(err, "iapo_checkpoints", None)), file=sys.stderr)
        return EXIT_INTERRUPTED
    except Preempted as err:
        print(_stopped_message(name, "preempted", getattr(err, "iapo_run_dir", None),
                               getattr(err, "iapo_checkpoints", None)), file=sys.stderr)
        return EXIT_PREEMPTED
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
