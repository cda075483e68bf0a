"""Models, one file each, registered by name in models/registry.py and picked by
`config.model.name`; the layers, losses, optimizer and beam search they share."""
