"""Mesh, sharding rules and multi-process start-up.

  mesh            make_mesh, logical-axis rules, shard_params / abstract_params / shard_batch
  sharded_step    shard_train_state, sharded_train_step (any trainer's step under a mesh)
  distributed     initialize_distributed (call before JAX touches a device), is_main_process
"""
