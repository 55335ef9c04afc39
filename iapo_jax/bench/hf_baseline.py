"""The baseline: transformers' PyTorch `generate` on the same weights, dtype, prompts and lengths
(sampling, KV cache on, num_return_sequences = N, no early stop), on the GPU when PyTorch has one."""

from __future__ import annotations

import copy


def load_hf_model(source, dtype: str, float32_model=None):
    """The PyTorch model of an HF directory or GGUF file (GGUF dequantised like our loader).

    Pass the float32 model already loaded to get a bfloat16 copy without reading the file again.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from iapo_jax.models.checkpoints import resolve_source

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if float32_model is not None:
        return copy.deepcopy(float32_model).to(device=device, dtype=torch_dtype).eval()
    kind, path = resolve_source(source)
    if kind == "gguf":
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path))
    return model.to(device=device, dtype=torch_dtype).eval()


def hf_generate(model, prompts: list[list[int]], *, n: int, new_tokens: int, pad_id: int, seed: int):
    """Sample n responses of exactly `new_tokens` tokens per left-padded prompt."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(model.device), mask.to(model.device)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, num_return_sequences=n,
                             pad_token_id=pad_id, use_cache=True)
    if out.is_cuda:
        torch.cuda.synchronize()  # the timing must include the kernels, not just their launch
    assert out.shape == (len(prompts) * n, width + new_tokens), out.shape
    return out
