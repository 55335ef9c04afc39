"""The runtime floor every job stands on: run records, metrics, checkpoints and progress output.

Modules (import them directly; this package imports nothing heavy on its own):
  manifest       RunRecord -> manifest.json in a run directory
  environment    facts about code version, packages, hardware and JAX
  metrics        MetricsWriter -> metrics.jsonl + TensorBoard events
  checkpointing  Checkpointer over orbax.checkpoint.CheckpointManager
  progress       tqdm bars and summary tables
"""
