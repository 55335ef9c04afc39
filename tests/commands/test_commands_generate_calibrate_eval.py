"""`iapo calibrate`, `iapo generate` and `iapo eval` end to end on a tiny chat Llama.

Every job runs in-process through the CLI entry point with the same shapes (3 prompts in batches of
2, 4 samples each, 8 new tokens), so the decoding programs compile once and are reused. The checks
compare against things the jobs do not compute themselves: word counts of the stored texts (the
'length' reward), a brute-force enumeration of win rates over all pairs / N-tuples of samples, the
exact KL of a model against itself (zero), and greedy decoding by transformers' PyTorch model.
"""

import itertools
import json

import numpy as np
import pytest

from iapo_jax import cli
from iapo_jax.commands.job_outputs import read_jsonl
from iapo_jax.rewards.calibration import ReferencePool
from iapo_jax.runtime.manifest import load_record

PROMPTS = ["Hi there", "What is 2+2?", "Tell me a joke"]
SHAPES = ["--max-new-tokens", "8", "--batch-prompts", "2", "--data", "1"]


def run_cli(capsys, *args):
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def words(text: str) -> int:
    return len(text.split())


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def calibrated(tiny_chat_llama_dir, prompts_file, tmp_path_factory):
    """One `iapo calibrate` run (m = 4, the 'length' reward) shared by the tests below."""
    run_dir = tmp_path_factory.mktemp("cal") / "run"
    code = cli.main(["calibrate", "--model", str(tiny_chat_llama_dir), "--prompts-file",
                     str(prompts_file), "--samples", "4", "--reward", "length", *SHAPES,
                     "--run-dir", str(run_dir)])
    assert code == 0
    return run_dir


@pytest.fixture(scope="module")
def other_policy_dir(tiny_chat_llama_dir, tmp_path_factory):
    """Another random tiny Llama with the same tokenizer: a policy that differs from pi_ref."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig.from_pretrained(tiny_chat_llama_dir)).eval()
    path = tmp_path_factory.mktemp("policy")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_chat_llama_dir).save_pretrained(path)
    return path


def test_calibrate_builds_a_scored_sorted_pool(calibrated):
    pool = ReferencePool.load(calibrated / "pool")
    assert pool.prompts == tuple(PROMPTS) and pool.scores.shape == (3, 4)
    expected = np.array([[words(t) for t in row] for row in pool.responses], np.float32)
    np.testing.assert_array_equal(pool.scores, expected)  # the 'length' reward is a word count
    assert np.all(np.diff(pool.scores, axis=1) >= 0)
    assert pool.meta["reward"] == "length" and pool.meta["max_new_tokens"] == 8

    metrics = load_record(calibrated)["metrics"]
    assert metrics["mean_reward"] == pytest.approx(float(expected.mean()))
    pairs = [np.mean([a == b for a, b in itertools.permutations(row, 2)]) for row in expected]
    assert metrics["tie_fraction"] == pytest.approx(float(np.mean(pairs)))
    assert metrics["pool_digest"] == int(pool.fingerprint()[:12], 16)


def test_calibrate_reproduces_exactly(capsys, calibrated, tmp_path):
    code, _, err = run_cli(capsys, "reproduce", calibrated, "--run-dir", tmp_path / "again")
    assert code == 0, err
    again = ReferencePool.load(tmp_path / "again" / "pool")
    assert again.fingerprint() == ReferencePool.load(calibrated / "pool").fingerprint()
    reproduction = load_record(tmp_path / "again")["extra"]["reproduction"]
    assert reproduction["mismatches"] == 0 and reproduction["checks"] >= 8


def test_calibrate_rejects_bad_input_before_sampling(capsys, tiny_chat_llama_dir, prompts_file,
                                                     tmp_path):
    code, _, err = run_cli(capsys, "calibrate", "--model", tiny_chat_llama_dir, "--prompts-file",
                           prompts_file, "--samples", "1", "--run-dir", tmp_path / "bad")
    assert code == 2 and "--samples must be at least 2" in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()


def test_generate_plain_and_best_of_n_match_the_pool(capsys, calibrated, tiny_chat_llama_dir,
                                                     prompts_file, tmp_path):
    pool = ReferencePool.load(calibrated / "pool")
    base = ["generate", "--model", tiny_chat_llama_dir, "--prompts-file", prompts_file, "--n", "4",
            "--reward", "length", *SHAPES]
    # Same seed, batches and shapes as the calibration: the very same responses.
    code, _, err = run_cli(capsys, *base, "--run-dir", tmp_path / "plain")
    assert code == 0, err
    rows = read_jsonl(tmp_path / "plain" / "samples.jsonl")
    assert len(rows) == 12
    for i in range(3):
        texts = sorted(r["response"] for r in rows if r["prompt_index"] == i)
        assert texts == sorted(pool.responses[i])
    assert all(r["reward"] == words(r["response"]) for r in rows)

    # Best-of-4 and worst-of-4 draw the same 4 candidates, then serve the max / min reward.
    for mode, pick in (("bon", np.max), ("won", np.min)):
        code, _, err = run_cli(capsys, *base, "--mode", mode, "--run-dir", tmp_path / mode)
        assert code == 0, err
        served = read_jsonl(tmp_path / mode / "samples.jsonl")
        assert [r["prompt_index"] for r in served] == [0, 1, 2]
        for r in served:
            assert sorted(r["candidate_scores"]) == pool.scores[r["prompt_index"]].tolist()
            assert r["reward"] == pick(pool.scores[r["prompt_index"]])
        metrics = load_record(tmp_path / mode)["metrics"]
        assert metrics["kl_bound"] == pytest.approx(np.log(4) - 3 / 4)

    code, _, err = run_cli(capsys, "generate", "--model", tiny_chat_llama_dir, "--mode", "bon",
                           "--run-dir", tmp_path / "bad")
    assert code == 2 and "--reward" in err and not (tmp_path / "bad").exists()


def _brute_force_win_rate(a, b, procedure, n):
    """Mean over prompts of P(T(a) > T(b)) + P(=)/2, T applied to every n-subset of each side's
    samples (without replacement: the unbiased estimator's definition)."""
    serve = {"sampling": lambda t: t[0], "bon": max, "won": min}[procedure]
    per_prompt = []
    for row_a, row_b in zip(a, b):
        served_a = [serve(t) for t in itertools.combinations(row_a, n)]
        served_b = [serve(t) for t in itertools.combinations(row_b, n)]
        x, y = np.array(served_a)[:, None], np.array(served_b)[None, :]
        per_prompt.append(np.mean((x > y) + 0.5 * (x == y)))
    return float(np.mean(per_prompt))


def test_eval_win_rates_and_kl(capsys, calibrated, tiny_chat_llama_dir, other_policy_dir, tmp_path):
    pool = ReferencePool.load(calibrated / "pool")
    run_dir = tmp_path / "eval"
    code, out, err = run_cli(capsys, "eval", "--pool", calibrated, "--policy", other_policy_dir,
                             "--samples", "4", "--ns", "2", "3", "--bootstrap", "200",
                             "--batch-prompts", "2", "--data", "1", "--run-dir", run_dir)
    assert code == 0, err
    assert "| best-of-N | 3 |" in out and (run_dir / "win_rates.md").is_file()
    rows = read_jsonl(run_dir / "samples.jsonl")
    policy = np.array([[r["reward"] for r in rows if r["prompt_index"] == i] for i in range(3)])
    assert all(r["reward"] == words(r["response"]) for r in rows)
    metrics = load_record(run_dir)["metrics"]
    for name, procedure, n in (("sampling", "sampling", 1), ("bon_2", "bon", 2),
                               ("bon_3", "bon", 3), ("won_2", "won", 2)):
        expected = _brute_force_win_rate(policy, pool.scores, procedure, n)
        assert metrics[f"win_rate.{name}"] == pytest.approx(expected, abs=1e-12)
        assert metrics[f"ci_low.{name}"] <= expected <= metrics[f"ci_high.{name}"]
    k1 = np.mean([r["logprob"] - r["ref_logprob"] for r in rows])
    assert metrics["kl"] == pytest.approx(k1, abs=1e-5)

    # A policy against itself: the sample KL is zero (up to float error of two programs).
    code, _, err = run_cli(capsys, "eval", "--pool", calibrated, "--policy", tiny_chat_llama_dir,
                           "--samples", "4", "--ns", "2", "--bootstrap", "50", "--batch-prompts",
                           "2", "--data", "1", "--run-dir", tmp_path / "self")
    assert code == 0, err
    assert abs(load_record(tmp_path / "self")["metrics"]["kl"]) < 1e-4

    code, _, err = run_cli(capsys, "eval", "--pool", calibrated, "--reward", "vader",
                           "--run-dir", tmp_path / "bad")
    assert code == 2 and "same reward" in err and not (tmp_path / "bad").exists()


def test_eval_refuses_n_larger_than_the_samples_before_sampling(capsys, calibrated, other_policy_dir, tmp_path):
    """The unbiased best-of-N estimate needs N samples per side: refused in one line, nothing run."""
    code, _, err = run_cli(capsys, "eval", "--pool", calibrated, "--policy", other_policy_dir,
                           "--samples", "2", "--ns", "4", "--run-dir", tmp_path / "few")
    assert code == 2 and "--ns 4 exceeds --samples 2" in err and "Traceback" not in err, err


def test_generate_soft_best_of_n(capsys, calibrated, tiny_chat_llama_dir, prompts_file, tmp_path):
    """soft-bon draws best-of-4's candidates and serves one of them; a tiny --lam serves the best;
    a bad --lam is refused before the model loads."""
    pool = ReferencePool.load(calibrated / "pool")
    base = ["generate", "--model", tiny_chat_llama_dir, "--prompts-file", prompts_file, "--n", "4",
            "--reward", "length", *SHAPES, "--mode", "soft-bon"]
    code, _, err = run_cli(capsys, *base, "--lam", "1e-6", "--run-dir", tmp_path / "soft")
    assert code == 0, err
    for r in read_jsonl(tmp_path / "soft" / "samples.jsonl"):
        assert sorted(r["candidate_scores"]) == pool.scores[r["prompt_index"]].tolist()
        assert r["reward"] == np.max(pool.scores[r["prompt_index"]])
    assert load_record(tmp_path / "soft")["metrics"]["kl_bound"] == pytest.approx(np.log(4))
    code, _, err = run_cli(capsys, *base, "--lam", "0", "--run-dir", tmp_path / "bad")
    assert code == 2 and "lam" in err and not (tmp_path / "bad").exists(), err


def test_generate_pruned_best_of_n(capsys, calibrated, tiny_chat_llama_dir, prompts_file, tmp_path):
    """pruned-bon's survivors are best-of-4's own candidates (same seed and shapes as the pool),
    pruned by the reward on the partial text; a schedule past the length is refused before loading."""
    pool = ReferencePool.load(calibrated / "pool")
    base = ["generate", "--model", tiny_chat_llama_dir, "--prompts-file", prompts_file, "--n", "4",
            "--reward", "length", *SHAPES, "--mode", "pruned-bon"]
    code, _, err = run_cli(capsys, *base, "--prune", "2:2", "--run-dir", tmp_path / "pruned")
    assert code == 0, err
    for r in read_jsonl(tmp_path / "pruned" / "samples.jsonl"):
        scores = pool.scores[r["prompt_index"]].tolist()
        assert len(r["candidate_scores"]) == 2 and set(r["candidate_scores"]) <= set(scores)
        assert r["reward"] == max(r["candidate_scores"]) and len(r["surviving_branches"]) == 2
    metrics = load_record(tmp_path / "pruned")["metrics"]
    assert metrics["kl_bound"] == pytest.approx(np.log(4)) and metrics["generated_tokens"] > 0
    for flags, message in ((["--prune", "99:2"], "not before the response length"),
                           (["--prune", "2:0"], "at least 1 branch"),
                           (["--mode", "bon", "--prune", "2:2"], "--prune is used by --mode pruned-bon")):
        code, _, err = run_cli(capsys, *base, *flags, "--run-dir", tmp_path / "bad")
        assert code == 2 and message in err and not (tmp_path / "bad").exists(), err


def test_eval_soft_best_of_n_selects_on_the_pool_calibration(capsys, calibrated, other_policy_dir,
                                                             tiny_chat_llama_dir, tmp_path):
    """soft_bon rows are the unbiased estimator on the samples, selecting on C_hat; a bad --lam
    is refused in one line before anything loads."""
    from iapo_jax.evaluation.win_rates import per_prompt_win_rates, pool_calibration

    pool = ReferencePool.load(calibrated / "pool")
    run_dir = tmp_path / "soft"
    code, out, err = run_cli(capsys, "eval", "--pool", calibrated, "--policy", other_policy_dir,
                             "--samples", "4", "--ns", "2", "3", "--procedures", "soft_bon",
                             "--lam", "0.2", "--bootstrap", "50", "--batch-prompts", "2", "--data", "1",
                             "--run-dir", run_dir)
    assert code == 0, err
    assert "| soft best-of-N | 3 |" in out
    rows = read_jsonl(run_dir / "samples.jsonl")
    policy = np.array([[r["reward"] for r in rows if r["prompt_index"] == i] for i in range(3)])
    ref = pool.scores[:3]
    metrics = load_record(run_dir)["metrics"]
    for n in (2, 3):
        want = per_prompt_win_rates(policy, ref, "soft_bon", n, lam=0.2,
                                    selection=(pool_calibration(policy, ref), pool_calibration(ref, ref)))
        assert metrics[f"win_rate.soft_bon_{n}"] == pytest.approx(want.mean(), abs=1e-12)

    # Against a baseline policy: the paired difference selects both sides on their calibration.
    code, out, err = run_cli(capsys, "eval", "--pool", calibrated, "--policy", other_policy_dir,
                             "--baseline", tiny_chat_llama_dir, "--samples", "4", "--ns", "2",
                             "--procedures", "soft_bon", "--lam", "0.2", "--bootstrap", "50",
                             "--batch-prompts", "2", "--data", "1", "--run-dir", tmp_path / "paired")
    assert code == 0, err
    assert "| soft best-of-N | 2 |" in out.split("against baseline")[1]
    other = np.array([[r["reward"] for r in read_jsonl(tmp_path / "paired" / "baseline_samples.jsonl")
                       if r["prompt_index"] == i] for i in range(3)])
    mine = np.array([[r["reward"] for r in read_jsonl(tmp_path / "paired" / "samples.jsonl")
                      if r["prompt_index"] == i] for i in range(3)])
    w = [per_prompt_win_rates(x, ref, "soft_bon", 2, lam=0.2,
                              selection=(pool_calibration(x, ref), pool_calibration(ref, ref)))
         for x in (mine, other)]
    paired = load_record(tmp_path / "paired")["metrics"]
    assert paired["difference.soft_bon_2"] == pytest.approx(np.mean(w[0] - w[1]), abs=1e-12)
    head = per_prompt_win_rates(mine, other, "soft_bon", 2, lam=0.2,
                                selection=(pool_calibration(mine, ref), pool_calibration(other, ref)))
    assert paired["head_to_head.soft_bon_2"] == pytest.approx(head.mean(), abs=1e-12)
    for bad in (("--lam", "0"), ("--lam", "-1"), ()):
        code, _, err = run_cli(capsys, "eval", "--pool", calibrated, "--policy", other_policy_dir,
                               "--procedures", "soft_bon", *bad, "--run-dir", tmp_path / "bad")
        assert code == 2 and "lam" in err and "Traceback" not in err, err
    code, _, err = run_cli(capsys, "eval", "--pool", calibrated, "--policy", other_policy_dir,
                           "--lam", "0.2", "--run-dir", tmp_path / "bad")
    assert code == 2 and "add soft_bon to --procedures" in err


@pytest.mark.slow
def test_generate_token_cd_with_one_candidate_is_greedy(capsys, tiny_chat_llama_dir, prompts_file,
                                                        tmp_path):
    """With --cd-top-k 1 token-level CD can only take the argmax token: transformers' greedy."""
    import jax
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from iapo_jax import load_model
    from iapo_jax.rewards.head_checkpoints import build_head_model, save_training_state, write_spec
    from iapo_jax.models.finetune import Finetune, split_for_training
    from iapo_jax.runtime.checkpointing import Checkpointer

    scorer_dir = tmp_path / "scorer"  # a prefix scorer as `iapo train-scorer` saves one
    finetune = Finetune(mode="head")
    _, _, trainable = split_for_training(build_head_model("value", load_model(tiny_chat_llama_dir)),
                                         finetune, jax.random.key(0))
    with Checkpointer(scorer_dir / "checkpoints", handle_sigterm=False) as ckpt:
        save_training_state(ckpt, 0, trainable, None, finetune)
    write_spec(scorer_dir, kind="value", base=str(tiny_chat_llama_dir), finetune=finetune)

    code, _, err = run_cli(capsys, "generate", "--model", tiny_chat_llama_dir, "--prompts-file",
                           prompts_file, "--mode", "token-cd", "--scorer", scorer_dir, "--lam", "3",
                           "--cd-top-k", "1", *SHAPES, "--run-dir", tmp_path / "cd")
    assert code == 0, err
    served = read_jsonl(tmp_path / "cd" / "samples.jsonl")

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_llama_dir)
    model = LlamaForCausalLM.from_pretrained(tiny_chat_llama_dir).eval()
    for row, prompt in zip(served, PROMPTS):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                           add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)["input_ids"]
        with torch.no_grad():
            greedy = model.generate(ids, max_new_tokens=8, do_sample=False,
                                    eos_token_id=tokenizer.eos_token_id,
                                    pad_token_id=tokenizer.pad_token_id)
        expected = tokenizer.decode(greedy[0, ids.shape[1]:], skip_special_tokens=True)
        assert row["response"] == expected

    code, _, err = run_cli(capsys, "generate", "--model", tiny_chat_llama_dir, "--mode", "token-cd",
                           "--scorer", "length", "--run-dir", tmp_path / "bad")
    assert code == 2 and "blockwise" in err and not (tmp_path / "bad").exists()


def test_prompt_plan_splits_processes_into_equal_batches():
    from iapo_jax.commands.prompt_batches import PromptPlan

    prompts = [f"p{i}" for i in range(7)]
    blocks, ids = [], []
    for rank in range(3):
        plan = PromptPlan(num_prompts=7, batch=2, process_index=rank, process_count=3)
        batches = plan.batches(prompts)
        assert [len(b) for _, b in batches] == [2, 2]  # one shape everywhere: one compile
        ids += [i for i, _ in batches]
        blocks.append([p for _, b in batches for p in b][:plan.per_process])
    assert ids == list(range(6))  # distinct keys for every batch of every process
    assert [p for block in blocks for p in block][:7] == prompts  # gathered back in order


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_generate_the_same_samples_as_one(capsys, tiny_chat_llama_dir, prompts_file,
                                                        calibrated, tmp_path):
    """Each process samples its block of prompts with that block's batch keys; process 0 writes all.

    With 3 prompts in batches of 2, one process runs batches [p0, p1] and [p2, pad] and two
    processes run one each, with the same keys: the samples must be identical to the pool's."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    for name in ("IAPO_COORDINATOR", "IAPO_NUM_PROCESSES", "IAPO_PROCESS_ID", "JAX_COORDINATOR_ADDRESS"):
        env.pop(name, None)
    run_dir = tmp_path / "two"
    args = [sys.executable, "-m", "iapo_jax.cli", "generate", "--model", str(tiny_chat_llama_dir),
            "--prompts-file", str(prompts_file), "--n", "4", "--reward", "length", *SHAPES,
            "--run-dir", str(run_dir), "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
    procs = [subprocess.Popen([*args, "--process-id", str(i)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    try:
        outputs = [proc.communicate(timeout=600) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
    assert load_record(run_dir)["jax"]["process_count"] == 2
    rows = read_jsonl(run_dir / "samples.jsonl")
    pool = ReferencePool.load(calibrated / "pool")
    for i in range(3):
        assert sorted(r["response"] for r in rows if r["prompt_index"] == i) == sorted(pool.responses[i])
