"""Models, one file each, picked by `config.model.name`."""
