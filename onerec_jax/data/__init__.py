"""Data: MovieLens download, readers, leave-one-out sequences, synthetic data, Grain pipelines."""
