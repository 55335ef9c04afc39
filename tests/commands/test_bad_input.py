"""Bad input, one table: each row runs a bad invocation through ``cli.main`` (in-process) and checks
exit 2, exactly one line on stderr naming the problem, that no model was loaded and that no run
record (no run directory at all) was written.

"No model was loaded" is checked by replacing the model loader, the weight fingerprint and the
tokenizer loader with functions that raise a BaseException (which the CLI does not catch), so a
row whose check comes too late fails loudly instead of passing after a slow load.
"""

import errno
from pathlib import Path

import pytest

from iapo_jax import cli


class ModelLoaded(BaseException):
    """Raised when a bad invocation got as far as loading a model."""


@pytest.fixture
def no_model(monkeypatch):
    from iapo_jax.models import checkpoints, fingerprint, tokenizer

    def boom(*args, **kwargs):
        raise ModelLoaded(f"a model was loaded ({args[:1]}) before the bad input was refused")

    monkeypatch.setattr(checkpoints, "load_model", boom)
    monkeypatch.setattr(tokenizer, "load_tokenizer", boom)
    monkeypatch.setattr(fingerprint, "model_fingerprint", boom)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    return tmp_path


RUN_DIR = ("--run-dir", "r")
# (arguments, words the one line must contain); --run-dir r is added where the job takes it.
BAD = [
    # ctrl: rates, sizes, dtypes, combinations
    (["ctrl", "--learning-rate", "-1"], ["--learning-rate", "positive", "-1.0"]),
    (["ctrl", "--learning-rate", "0"], ["--learning-rate", "positive"]),
    (["ctrl", "--clip-eps", "-1"], ["--clip-eps", "positive", "0.2"]),
    (["ctrl", "--reward-floor-nats", "0"], ["reward_floor_nats", "positive number of nats", "None for no floor"]),
    (["compare", "--reward-floor-nats", "nan"], ["--reward-floor-nats", "finite number"]),
    (["testbed", "--reward-floor-nats", "-1"], ["--reward-floor-nats", "positive number of nats"]),
    (["ctrl", "--dtype", "float16"], ["--dtype float16", "float32 or bfloat16"]),
    (["ctrl", "--steps", "0"], ["--steps", "at least 1"]),
    (["ctrl", "--max-grad-norm", "0"], ["--max-grad-norm", "positive"]),
    (["ctrl", "--beta", "0"], ["--beta", "positive"]),
    (["ctrl", "--target-kl", "-1"], ["--target-kl", "positive"]),
    (["ctrl", "--warmup-steps", "-1"], ["--warmup-steps", ">= 0"]),
    (["ctrl", "--lora-rank", "-2"], ["--lora-rank", ">= 0"]),
    (["ctrl", "--kl-controller-gain", "-0.5"], ["--kl-controller-gain", ">= 0"]),
    (["ctrl", "--data", "0"], ["--data", "-1"]),
    (["ctrl", "--save-every", "0"], ["--save-every", "at least 1"]),
    (["ctrl", "--samples-per-prompt", "1"], ["RLOO", "samples_per_prompt >= 2"]),
    (["ctrl", "--transform", "exp", "--procedure", "won"], ["negexp", "worst-of-N"]),
    (["ctrl", "--temperature", "0.7"], ["temperature 1"]),
    (["ctrl", "--kl-in-loss", "--kl-estimator", "k1"], ["k1"]),
    (["ctrl", "--learning-rate", "nan"], ["--learning-rate", "finite"]),
    (["ctrl", "--allow-changes"], ["--allow-changes", "--resume"]),
    # compare and quickstart
    (["compare", "--learning-rate", "-1"], ["--learning-rate", "positive"]),
    (["compare", "--dtype", "float16"], ["--dtype float16"]),
    (["compare", "--steps", "0"], ["--steps", "at least 1"]),
    (["compare", "--eval-ns", "0", "2"], ["--eval-ns", "at least 1"]),
    (["compare", "--betas", "-0.1"], ["--betas", "positive"]),
    (["compare", "--samples-per-prompt", "0"], ["--samples-per-prompt", "at least 1"]),
    (["quickstart", "--dtype", "float16"], ["--dtype float16"]),
    (["quickstart", "--learning-rate", "0"], ["--learning-rate", "positive"]),
    (["quickstart", "--deploy-n", "0"], ["--deploy-n", "at least 1"]),
    # calibrate, generate, eval
    (["calibrate", "--samples", "0"], ["--samples", "at least 1"]),
    (["calibrate", "--temperature", "0"], ["--temperature", "positive"]),
    (["calibrate", "--top-p", "1.5"], ["--top-p", "(0, 1]"]),
    (["calibrate", "--dtype", "float16"], ["--dtype", "float16"]),
    (["calibrate", "--batch-prompts", "0"], ["--batch-prompts", "at least 1"]),
    (["generate", "--n", "0"], ["--n", "at least 1"]),
    (["generate", "--top-k", "-1"], ["--top-k", ">= 0"]),
    (["generate", "--max-new-tokens", "0"], ["--max-new-tokens", "at least 1"]),
    (["generate", "--dtype", "float16"], ["--dtype", "float16"]),
    (["eval", "--pool", "out", "--samples", "0"], ["--samples", "at least 1"]),
    (["eval", "--pool", "out", "--confidence", "1.5"], ["--confidence", "(0, 1)"]),
    (["eval", "--pool", "out", "--bootstrap", "0"], ["--bootstrap", "at least 1"]),
    (["eval", "--pool", "out", "--ns", "0"], ["--ns", "at least 1"]),
    # training reward models and prefix scorers
    (["train-rm", "--learning-rate", "-1"], ["--learning-rate", "positive"]),
    (["train-rm", "--steps", "0"], ["--steps", "at least 1"]),
    (["train-rm", "--batch-size", "0"], ["--batch-size", "at least 1"]),
    (["train-rm", "--weight-decay", "-0.1"], ["--weight-decay", ">= 0"]),
    (["train-rm", "--dtype", "float16"], ["--dtype", "float16"]),
    (["train-scorer", "--learning-rate", "0"], ["--learning-rate", "positive"]),
    (["train-scorer", "--block-size", "0"], ["--block-size", "at least 1"]),
    (["train-scorer", "--max-grad-norm", "-1"], ["--max-grad-norm", "positive"]),
    (["train-scorer", "--method", "cdq", "--top-k", "0"], ["--method cdq", "--top-k"]),
    (["train-scorer", "--mode", "lora", "--lora-rank", "0"], ["lora_rank", "mode 'lora'"]),
    (["train-rm", "--pairs", "file"], ["--pairs-file"]),
    (["train-rm", "--pairs", "hh-rlhf"], ["--hh-rlhf-dir"]),
    (["generate", "--mode", "blockwise"], ["--scorer"]),
    (["generate", "--mode", "bon", "--n", "4"], ["--reward"]),
    (["generate", "--mode", "plain", "--scorer", "out"], ["--scorer", "--mode"]),
    (["compare", "--methods", "ctrl", "bogus"], ["bogus"]),
    (["compare", "--betas", "0.1", "--sweep-kls", "0.5"], ["betas", "sweep_kls"]),
    (["quickstart", "--methods", "bogus"], ["bogus"]),
    (["ctrl", "--transform", "negexp", "--procedure", "bon"], ["negexp", "best-of-N"]),
    (["calibrate", "--samples", "1"], ["--samples", "at least 2"]),
    (["ctrl", "--pool-size", "0"], ["--pool-size", "at least 2"]),
    (["ctrl", "--save-every", "-1"], ["--save-every", "at least 1"]),
    (["compare", "--pool-size", "0"], ["pool_size", "at least 2"]),
    (["quickstart", "--pool-size", "1"], ["pool_size", "at least 2"]),
    (["testbed", "--pool-size", "0"], ["--pool-size", "at least 2"]),
    (["train-rm", "--save-every", "-1"], ["save_every", ">= 0"]),
    (["train-scorer", "--save-every", "-1"], ["save_every", ">= 0"]),
    (["eval", "--pool", "out"], ["out", "pool"]),
    (["testbed", "--samples-per-prompt", "1"], ["--samples-per-prompt", "RLOO"]),
    # theory, testbed, bench: also flags that mean nothing for them
    (["theory", "--kl", "-1"], ["--kl", "positive"]),
    (["theory", "--n", "0"], ["--n", "at least 1"]),
    (["theory", "--resume"], ["no --resume"]),
    (["theory", "--coordinator", "h:1"], ["single process", "--coordinator"]),
    (["testbed", "--kls", "-0.5"], ["--kls", "positive"]),
    (["testbed", "--learning-rate", "-1"], ["--learning-rate", "positive"]),
    (["testbed", "--steps", "0"], ["--steps", "at least 1"]),
    (["testbed", "--start-beta-factor", "0.2"], ["--start-beta-factor", "--kl-controller"]),
    (["testbed", "--start-beta-factor", "-1", "--kl-controller", "predictive"], ["--start-beta-factor", "positive"]),
    (["testbed", "--kl-controller", "predictive", "--kl-controller-gain", "-1"], ["--kl-controller-gain", ">= 0"]),
    (["ctrl", "--kl-controller", "predictive", "--kl-smoothing", "0"], ["--kl-smoothing"]),
    (["bench", "--repeats", "0"], ["--repeats", "at least 1"]),
    (["bench", "--dtypes", "float16"], ["--dtypes", "float16"]),
    (["bench", "--resume"], ["no --resume"]),
    (["bench", "--num-processes", "2"], ["single process"]),
    (["bench", "--json", "out"], ["--json", "folder"]),
    # reproduce, env, runs
    (["reproduce", "out", "--rtol", "-1"], ["--rtol", ">= 0"]),
    (["reproduce", "missing"], ["missing", "does not exist"]),
    (["env", "--lr", "-1"], ["--lr", "positive"]),
    (["env", "--steps", "0"], ["--steps", "at least 1"]),
    (["env", "--batch", "0"], ["--batch", "at least 1"]),
    (["env", "--data", "0"], ["--data"]),
    (["runs", "missing"], ["missing", "not a folder"]),
    (["runs", "--compare", "out", "missing"], ["out", "not a run directory"]),
    (["runs", "--run-dir", "r"], ["no run record", "--run-dir"]),
]
NO_RUN_DIR = ("runs", "theory --resume", "bench --resume")


def _ids(row):
    return " ".join(row[0])


@pytest.mark.parametrize("args, words", BAD, ids=[_ids(r) for r in BAD])
def test_bad_input_is_one_line_before_any_model(capsys, in_tmp, no_model, args, words):
    full = list(args)
    if not any(" ".join(args).startswith(skip) for skip in NO_RUN_DIR):
        full += RUN_DIR
    code = cli.main(full)
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    print(f"{' '.join(full)}\n  -> {lines}")  # shown with -s: the table of what each prints
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"iapo {args[0]}: error: "), lines[0]
    for word in words:
        assert word in lines[0], lines[0]
    assert not (in_tmp / "r").exists() and not (in_tmp / "runs").exists()
    assert sorted(p.name for p in in_tmp.iterdir()) == ["out"]


@pytest.mark.parametrize("where", ["r", None])
def test_a_read_only_run_directory_is_one_line(capsys, in_tmp, monkeypatch, where):
    """What a read-only filesystem answers (EROFS, an OSError that is no PermissionError), given
    by mkdir itself since this machine has no read-only mount to write to."""
    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    code = cli.main(["env", "--steps", "1", *(["--run-dir", where] if where else [])])
    _, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "Read-only file system" in lines[0] and "--run-dir" in lines[0], lines[0]
    assert sorted(p.name for p in in_tmp.iterdir()) == ["out"]
