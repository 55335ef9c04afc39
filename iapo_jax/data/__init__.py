"""Data: HH-RLHF preference pairs, chat prompt sets, chat tokenisation and data fingerprints.

Submodules are imported directly (``from iapo_jax.data.prompts import load_chat_prompts``) so
that importing the package does not pull in TensorFlow Datasets or grain.
"""
