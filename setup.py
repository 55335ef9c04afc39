"""Package metadata for iapo_jax: inference-aware alignment and controlled decoding in JAX."""

from setuptools import find_packages, setup

CORE = [
    "jax>=0.10,<0.13",
    "flax>=0.12,<0.13",
    "optax>=0.2.4,<0.3",
    "orbax-checkpoint>=0.11,<0.13",
    "chex>=0.1.90,<0.2",
    "numpy>=1.26,<3",
    "transformers>=5.0,<6",  # tokenizers + chat templates; PyTorch models only as test reference
    "safetensors>=0.4,<1",
    "gguf>=0.17,<1",
    "sentencepiece>=0.2,<1",
    "tokenizers>=0.21,<1",
    "tyro>=0.9,<2",
    "pyyaml>=6,<7",
    "tqdm>=4.66,<5",
    "matplotlib>=3.8,<4",
    "scipy>=1.11,<2",
    "tensorflow-datasets>=4.9.7,<5",
    "array-record>=0.7,<1",
    "grain>=0.2.10,<0.3",
    "tensorboardx>=2.6,<3",
    "chatterbot-corpus>=1.2,<2",
]

EXTRAS = {
    # Packaged reward scorers that work offline. alt-profanity-check pins scikit-learn exactly.
    "rewards": [
        "alt-profanity-check>=1.6,<2",
        "vaderSentiment>=3.3.2,<4",
        "textblob>=0.18,<1",
    ],
    # Test-only: PyTorch transformers is the parity reference (CPU build 2.13.0 via the Makefile).
    "dev": [
        "pytest>=8,<10",
        "pytest-timeout>=2.3,<3",
        "accelerate>=1.0,<2",
        "nbclient>=0.10,<1",
        "nbformat>=5.10,<6",
        "ipykernel>=6.29,<8",
        "scipy>=1.11,<2",
    ],
    # Benchmark baselines: TRL's RLOOTrainer for `iapo bench train` (PyTorch from the Makefile).
    "bench": ["trl>=1.16,<2"],
    "gpu": ["jax[cuda12]>=0.10,<0.13"],
    "tpu": ["jax[tpu]>=0.10,<0.13"],
}

setup(
    name="iapo-jax",
    version="0.1.0",
    description="Inference-aware alignment (InfAlign/CTRL) and controlled decoding in JAX/Flax.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=find_packages(include=["iapo_jax", "iapo_jax.*"]),
    include_package_data=True,
    package_data={"iapo_jax": ["configs/*.yaml"]},
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["iapo=iapo_jax.cli:main"]},
)
