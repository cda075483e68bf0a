"""Parallelism: the device mesh, logical sharding rules, vocab-split table lookups (shard_map)."""
