"""Training: mesh and sharding, optimizer, losses, checkpoints, the train loop."""
