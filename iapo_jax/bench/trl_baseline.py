"""The RL-step baseline: TRL's `RLOOTrainer` (PyTorch) on the same weights, prompts, batch, lengths,
dtype and reward as `iapo bench train`'s CTRL step.

One TRL step generates `samples_per_prompt` completions per prompt with transformers' `generate`,
scores them, takes the reference's log-probs (KL penalty beta in the reward, as RLOO's classic
form and CTRL do) and makes one AdamW update. The step is timed by a trainer callback; generation
and reward scoring are timed by wrapping the model's `generate` and the reward function, and the
rest (log-probs under the policy and the reference, loss, backward, optimizer) is what remains.
"""

from __future__ import annotations

import statistics
import tempfile
import time


def trl_available() -> bool:
    try:
        import trl  # noqa: F401
    except ImportError:
        return False
    return True


def trl_rloo_step(source, dtype: str, prompts: list[str], reward, *, samples_per_prompt: int,
                  rollout_tokens: int, repeats: int, learning_rate: float = 1e-5, beta: float = 0.1,
                  seed: int = 0) -> dict:
    """Seconds per TRL RLOO step (median of `repeats` after one warm-up step), by part."""
    import torch
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    from iapo_jax import load_tokenizer

    tokenizer = load_tokenizer(source)
    tokenizer.padding_side = "left"
    clocks = {"generation": 0.0, "reward": 0.0}

    def scored(prompts, completions, **_):  # the same packaged reward as our step
        t = time.perf_counter()
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        users = [p[-1]["content"] if isinstance(p, list) else p for p in prompts]
        scores = [float(s) for s in reward.score(users, texts)]
        clocks["reward"] += time.perf_counter() - t
        return scores

    steps: list[dict] = []

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()
            clocks.update(generation=0.0, reward=0.0)

        def on_step_end(self, args, state, control, **kwargs):
            steps.append({"step": time.perf_counter() - self.start, **clocks})

    rows = len(prompts) * samples_per_prompt
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in prompts] * (repeats + 1)})
    with tempfile.TemporaryDirectory() as out:
        model = _trainable_hf_model(source, dtype, f"{out}/model")
        generate = model.generate

        def timed_generate(*args, **kwargs):
            t = time.perf_counter()
            result = generate(*args, **kwargs)
            clocks["generation"] += time.perf_counter() - t
            return result

        model.generate = timed_generate
        args = RLOOConfig(
            output_dir=out, per_device_train_batch_size=rows, num_generations=samples_per_prompt,
            max_completion_length=rollout_tokens, temperature=1.0, top_p=1.0, top_k=0, beta=beta,
            learning_rate=learning_rate, max_steps=repeats + 1, use_cpu=not torch.cuda.is_available(),
            activation_checkpointing=False, logging_steps=1, report_to="none", save_strategy="no",
            seed=seed, disable_dropout=True, dataloader_num_workers=0, shuffle_dataset=False,
        )
        trainer = RLOOTrainer(model=model, reward_funcs=scored, args=args, train_dataset=data,
                              processing_class=tokenizer, callbacks=[StepClock()])
        trainer.train()
    timed = steps[1:]
    record = {
        "baseline_step_s": statistics.median(s["step"] for s in timed),
        "baseline_first_step_s": steps[0]["step"],
        "baseline_generation_s": statistics.median(s["generation"] for s in timed),
        "baseline_reward_s": statistics.median(s["reward"] for s in timed),
        "baseline": f"trl {trl.__version__} RLOOTrainer, torch {torch.__version__}",
    }
    record["baseline_rest_s"] = statistics.median(s["step"] - s["generation"] - s["reward"] for s in timed)
    return record


def _trainable_hf_model(source, dtype: str, directory: str):
    """The PyTorch model in HF format under `directory`, loaded from there.

    TRL builds its reference model from the policy's path, which a GGUF file is not; and a model
    read from GGUF stays flagged as quantized (though its weights are dequantised floats), which
    the Trainer refuses to fine-tune. Saving the dense weights once gives both a plain model."""
    import torch
    from transformers import AutoModelForCausalLM

    from iapo_jax.bench.hf_baseline import load_hf_model

    model = load_hf_model(source, "float32")
    model.is_quantized, model.hf_quantizer = False, None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(directory)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch_dtype).train()
