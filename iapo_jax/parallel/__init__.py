"""Mesh, sharding rules and multi-process start-up.

  mesh         make_mesh, logical-axis rules, shard_params / abstract_params / shard_batch
  distributed  initialize_distributed (call before JAX touches a device), is_main_process
"""
