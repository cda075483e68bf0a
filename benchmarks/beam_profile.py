"""Where beam-search time goes at ML-25M shapes: one batch of the OneRec decoder's `generate`.

  python benchmarks/beam_profile.py [--variant onerec_sid] [--batch 128]

Random codes (3 x 256 + collision), fresh params, synthetic users (`train_throughput`): per batch
of users, the encoder alone, `generate` at beam 20 and 50 with the history given as ids (as the
evaluator passes it) or as a seen mask, without pruning, without the decoder cache, and the
unseen-item counts alone. Medians of 3 timed calls after a compiling one; milliseconds per batch.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import train_throughput as _train_throughput


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", default="onerec_sid")
    p.add_argument("--batch", type=int, default=128)
    args = p.parse_args()

    from absl import flags

    flags.FLAGS(sys.argv[:1])  # Grain reads absl flags
    import jax
    import jax.numpy as jnp
    import numpy as np

    from onerec_jax.data import pipeline
    from onerec_jax.defaults import apply_variant, base_config
    from onerec_jax.evaluation import ranking
    from onerec_jax.models import beam_search as bs
    from onerec_jax.tokenize.semantic_ids import random_codes
    from onerec_jax.training import train

    n_items = _train_throughput.ML25M_ITEMS
    ids = Path(tempfile.mkdtemp()) / "semantic_ids.npz"
    random_codes(n_items, 3, 256, 0).save(ids)
    c = apply_variant(base_config(), args.variant)
    c.model.side_features, c.model.semantic_ids = (), str(ids)
    c.train.num_steps, c.data.bucket_boundaries = 100, ()
    data = _train_throughput.synthetic_sequences(max(args.batch, 256), n_items, 0)
    setup = _train_throughput.train_setup(c, data)
    params, model = train.initial_state(setup, 0).params, setup.model
    ds = pipeline.eval_dataset(
        data, "test", max_len=c.data.max_len, batch_size=args.batch, by_length=False
    )
    batch = next(iter(ds))
    inputs = {"inputs": jnp.asarray(batch["inputs"]), "user": jnp.asarray(batch["user"])}
    history = jnp.asarray(ranking.history_batch(data, "test", batch["user"]))
    seen = bs.seen_mask(history, n_items)

    def timed(name, fn, *fn_args):
        jax.block_until_ready(fn(*fn_args))
        times = []
        for _ in range(3):
            start = time.perf_counter()
            jax.block_until_ready(fn(*fn_args))
            times.append(time.perf_counter() - start)
        print(f"| {name} | {1e3 * float(np.median(times)):,.0f} |", flush=True)

    print(f"{args.variant}, {args.batch} users a batch, {n_items:,} items")
    print("| part | ms per batch |\n|---|---|")
    timed("encoder", jax.jit(lambda p, b: model._encoded(p, b)[1]), params, inputs)
    for beam in (20, 50):
        for label, prune, cache, hist in (
            ("pruned, cached, history ids", True, True, history),
            ("pruned, cached, seen mask", True, True, seen),
            ("no pruning, cached", False, True, history),
            ("pruned, no cache", True, False, history),
        ):
            saved = model.item_prefixes
            model.item_prefixes = saved if prune else None
            model.decoder_cache = cache
            fn = jax.jit(lambda p, b, h, beam=beam: model.generate(p, b, h, k=50, beam=beam))
            timed(f"generate, beam {beam}, {label}", fn, params, inputs, hist)
            model.item_prefixes, model.decoder_cache = saved, True
    n_prefixes = model.valid.shape[1]
    counts = jax.jit(lambda s, h: bs.unseen_counts(s, model.item_prefixes, n_prefixes, h))
    timed("unseen counts from history ids", counts, seen, history)
    timed("unseen counts from the seen mask", lambda s: counts(s, None), seen)


if __name__ == "__main__":
    main()
