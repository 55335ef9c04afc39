"""The benchmarks: named random-weight architectures match their published sizes, a small decode
run prints every table (the N-scaling one included) with the machine named, and the train
benchmark times every stage of a real CTRL step."""

import json

import pytest

from iapo_jax import cli
from iapo_jax.bench.models import make_random_checkpoint, param_count, random_config
from iapo_jax.bench.train_step import STAGES

# Published parameter counts: SmolLM2-135M 134,515,008 (its model card's 135M; our loader on the
# packaged file agrees below); Llama 3.2 1B 1.23B; Llama 3.1 8B 8.03B (meta-llama model cards).
PUBLISHED = {"smollm2-135m-random": 134_515_008, "llama-1b-random": 1.2358e9, "llama-8b-random": 8.0303e9}
HEAD_DIM = {"smollm2-135m-random": 64, "llama-1b-random": 64, "llama-8b-random": 128}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_named_architectures_have_their_published_sizes(name):
    assert param_count(name) == pytest.approx(PUBLISHED[name], rel=1e-4)
    cfg = random_config(name)
    assert cfg.head_dim == HEAD_DIM[name] and cfg.num_key_value_heads < cfg.num_attention_heads  # GQA


def test_smollm2_shapes_equal_the_packaged_model(smollm2_gguf):
    from iapo_jax import load_model
    from iapo_jax.bench.roofline import count_params

    assert count_params(load_model(smollm2_gguf)) == param_count("smollm2-135m-random")


def test_random_checkpoint_loads_with_its_counted_parameters(tmp_path):
    from iapo_jax import load_model
    from iapo_jax.bench.roofline import count_params

    path = make_random_checkpoint("tiny", tmp_path / "tiny")
    assert count_params(load_model(path)) == param_count("tiny")
    with pytest.raises(ValueError, match="unknown random model 'llama-70b'"):
        random_config("llama-70b")


def test_bench_prints_n_scaling_and_names_the_machine(tmp_path, capsys):
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    code = cli.main(["bench", "decode", "--models", "tiny", "--dtypes", "float32", "--modes", "plain", "bon4",
                     "--repeats", "1", "--max-new-tokens", "4", "--no-roofline", "--json", str(out_json),
                     "--markdown", str(out_md), "--quiet"])
    assert code == 0, capsys.readouterr().err
    records = json.loads(out_json.read_text())
    assert [(r["mode"], r["n"], r["rows"]) for r in records] == [("plain", 1, 4), ("bon4", 4, 16)]
    for r in records:
        assert r["tokens_per_s"] > 0 and r["baseline_tokens_per_s"] > 0
        assert r["ratio"] == pytest.approx(r["baseline_seconds"] / r["seconds"])
        assert "cores, flags" in r["machine"]
    text = out_md.read_text()
    assert "N-scaling, tiny (float32, 4 prompts)" in text and "| 4 | 16 |" in text


def test_bench_train_times_every_stage_of_a_ctrl_step(tiny_chat_llama_dir, tmp_path, capsys):
    out_json, out_md = tmp_path / "train.json", tmp_path / "train.md"
    code = cli.main(["bench", "train", "--models", str(tiny_chat_llama_dir), "--dtypes", "float32",
                     "--repeats", "1", "--prompts-per-step", "2", "--samples-per-prompt", "2",
                     "--rollout-tokens", "4", "--pool-size", "4", "--no-roofline", "--json", str(out_json),
                     "--markdown", str(out_md), "--quiet"])
    assert code == 0, capsys.readouterr().err
    records = json.loads(out_json.read_text())
    assert [(r["setup"], r["lora_rank"]) for r in records] == [("full", 0), ("lora", 8)]
    for r in records:
        stages = [r[f"{s}_s"] for s in STAGES]
        assert min(stages) >= 0 and r["update_s"] > 0 and r["rollout_s"] > 0
        assert sum(stages) == pytest.approx(r["step_s"])  # one timed step: the stages are the step
        assert r["steps_per_hour"] == pytest.approx(3600 / r["step_s"])
    text = out_md.read_text()
    assert "| merge | rollout | ref_logprobs |" in text
    # TRL's RLOOTrainer on the same weights and batch, next to full fine-tuning
    full = records[0]
    assert full["baseline"].startswith("trl ") and full["baseline_step_s"] > 0
    assert full["ratio"] == pytest.approx(full["baseline_step_s"] / full["step_s"])
    assert 0 < full["baseline_generation_s"] < full["baseline_step_s"] and full["baseline_rest_s"] > 0
    assert "RLOOTrainer" in text and "baseline_step_s" not in records[1]


def test_bench_train_refuses_a_model_without_a_tokenizer(capsys):
    code = cli.main(["bench", "train", "--models", "tiny", "--no-roofline"])
    assert code == 2 and "needs a model with a tokenizer" in capsys.readouterr().err
