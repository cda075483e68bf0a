"""Training: the train state, the jitted step, the loop, Orbax checkpoints, metric logs."""
