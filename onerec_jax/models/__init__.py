"""Models, one file each, picked by `config.model.name`; the layers, losses, optimizer and
beam search they share."""
