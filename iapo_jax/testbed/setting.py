"""The enumerable setting: a random-init transformer from the project's model code, prompts, every
possible response, and a fixed tie-free reward table.

Two cases:
- ``single``: one-token responses over a vocabulary of 1,024 tokens, so a policy's whole response
  distribution is one softmax;
- ``sequence``: fixed-length responses of 2-3 tokens over a small vocabulary (V^L responses), which
  exercises sequence-level credit assignment and the KL summed over tokens.

The model has no stop token, so every response has exactly ``response_len`` tokens and the set of
responses is complete. Text crosses the trainer's string interface through ``IdTokenizer``: a
response is written as its token ids, and the reward reads them back.
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from iapo_jax.models.config import ModelConfig
from iapo_jax.models.transformer import Transformer

CASES = ("single", "sequence")


@dataclasses.dataclass(frozen=True)
class TestbedSpec:
    """Sizes of one testbed case (defaults: the one-token case)."""

    __test__ = False  # not a pytest test class despite its name

    case: str = "single"
    vocab_size: int = 1024
    response_len: int = 1
    num_prompts: int = 4
    prompt_len: int = 6
    hidden_size: int = 64
    num_layers: int = 2
    # Output-layer scale: logits of std ~ sqrt(hidden) * init_scale, so pi_ref is far from uniform.
    init_scale: float = 0.15
    seed: int = 0

    def validate(self) -> "TestbedSpec":
        if self.case not in CASES:
            raise ValueError(f"unknown testbed case {self.case!r}; choose one of {CASES}")
        if self.response_len < 1 or self.vocab_size < 2 or self.num_prompts < 1 or self.prompt_len < 1:
            raise ValueError("testbed sizes must be positive (response_len, num_prompts, prompt_len >= 1, "
                             "vocab_size >= 2)")
        if self.num_responses > 200_000:
            raise ValueError(f"{self.vocab_size}^{self.response_len} = {self.num_responses} responses is too "
                             "many to enumerate; use a smaller vocabulary or shorter responses")
        return self

    @property
    def num_responses(self) -> int:
        return self.vocab_size ** self.response_len


def spec_for(case: str, seed: int = 0) -> TestbedSpec:
    """The standard sizes of each case."""
    if case == "single":
        return TestbedSpec(case="single", vocab_size=1024, response_len=1, seed=seed).validate()
    if case == "sequence":
        return TestbedSpec(case="sequence", vocab_size=8, response_len=3, init_scale=0.12,
                           seed=seed).validate()
    raise ValueError(f"unknown testbed case {case!r}; choose one of {CASES}")


class IdTokenizer:
    """Token ids written as decimal words: ``"17 3 250"`` <-> [17, 3, 250]. No specials, no template."""

    chat_template = None
    eos_token_id = None
    pad_token_id = None
    unk_token = None
    unk_token_id = None

    def __init__(self, vocab_size: int):
        self.vocab_size = int(vocab_size)

    def __call__(self, text: str):
        return {"input_ids": self.encode(text)}

    def encode(self, text: str) -> list[int]:
        ids = [int(w) for w in text.split()]
        if any(not 0 <= i < self.vocab_size for i in ids):
            raise ValueError(f"token id out of range 0..{self.vocab_size - 1} in {text!r}")
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return " ".join(str(int(i)) for i in ids)

    def get_vocab(self) -> dict[str, int]:
        return {str(i): i for i in range(self.vocab_size)}

    def convert_tokens_to_ids(self, token: str) -> int:
        return int(token)


class TableReward:
    """r(x, y) = table[x, index(y)], i.i.d. standard normal entries (continuous: no ties)."""

    name = "testbed_table"

    def __init__(self, prompts, table: np.ndarray, vocab_size: int, response_len: int):
        self.row = {p: i for i, p in enumerate(prompts)}
        self.table = np.asarray(table, np.float32)
        self.vocab_size, self.response_len = vocab_size, response_len
        self.place = vocab_size ** np.arange(response_len - 1, -1, -1)

    def index(self, response: str) -> int:
        ids = [int(w) for w in response.split()]
        if len(ids) != self.response_len:
            raise ValueError(f"testbed responses have {self.response_len} tokens, got {response!r}")
        return int(np.dot(ids, self.place))

    def score(self, prompts, responses) -> np.ndarray:
        return np.array([self.table[self.row[p], self.index(r)] for p, r in zip(prompts, responses)],
                        np.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class ExactSetting:
    spec: TestbedSpec
    reference: Transformer
    tokenizer: IdTokenizer
    prompts: tuple[str, ...]
    prompt_ids: np.ndarray  # [P, prompt_len]
    responses: np.ndarray  # [Y, L] every response, in reward-table column order
    reward: TableReward

    @property
    def reward_table(self) -> np.ndarray:
        return self.reward.table

    def new_policy(self) -> Transformer:
        """A fresh copy of the reference weights (the policy starts at pi_ref)."""
        graphdef, state = nnx.split(self.reference)
        return nnx.merge(graphdef, jax.tree.map(jnp.copy, state))


def model_config(spec: TestbedSpec) -> ModelConfig:
    heads = 4
    return ModelConfig(
        family="llama", vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
        intermediate_size=2 * spec.hidden_size, num_layers=spec.num_layers, num_heads=heads,
        num_kv_heads=2, head_dim=spec.hidden_size // heads,
        max_position_embeddings=max(64, 2 * (spec.prompt_len + spec.response_len)),
        initializer_range=spec.init_scale, eos_token_ids=(), pad_token_id=0,
    )


def build_setting(spec: TestbedSpec) -> ExactSetting:
    """Everything fixed by ``spec.seed``: weights, prompts and the reward table."""
    spec = spec.validate()
    reference = Transformer(model_config(spec), rngs=nnx.Rngs(spec.seed))
    rng = np.random.default_rng(spec.seed)
    prompt_ids = np.stack([rng.choice(spec.vocab_size, spec.prompt_len) for _ in range(spec.num_prompts)])
    tok = IdTokenizer(spec.vocab_size)
    prompts = tuple(tok.decode(p) for p in prompt_ids)
    if len(set(prompts)) != len(prompts):
        raise ValueError("testbed prompts repeat; use another seed or longer prompts")
    responses = np.array(list(itertools.product(range(spec.vocab_size), repeat=spec.response_len)), np.int32)
    table = rng.standard_normal((spec.num_prompts, len(responses)))
    reward = TableReward(prompts, table, spec.vocab_size, spec.response_len)
    return ExactSetting(spec, reference, tok, prompts, prompt_ids.astype(np.int32), responses, reward)
