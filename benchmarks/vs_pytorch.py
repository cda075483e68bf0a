"""Our SASRec and OneRec item head against PyTorch on the same CPU, the same examples.

  pip install -c constraints.txt -e '.[bench]'        # torch (CPU), only for benchmarks
  taskset -c 1 python benchmarks/vs_pytorch.py --data.path ../shared/data/ml-latest-small
  taskset -c 1 python benchmarks/vs_pytorch.py --shapes ml25m --users 4096 --batch_size 32
  taskset -c 1 python benchmarks/vs_pytorch.py --model onerec --loss sampled ...

`--model sasrec` (default) times the PyTorch SASRec+ reference (`reference_sasrec.py`);
`--model onerec` our OneRec item head written minimally in PyTorch (`torch_models.py`), fed
the same left-padded windows and scoring the real positions only. `--loss sampled` uses our
sampled softmax on both sides (`torch_models.sampled_softmax`, our defaults); `full` (default)
the full cross-entropy.

What is timed, in one process, ours first and then the reference:
- one training epoch: our `train.py` step (jitted, compiled before timing) over the batches of one
  epoch of `train.train_batches` (the latest window per user, length buckets), then the
  reference's step (`reference_sasrec.ReferenceSASRec`, Adam, cross-entropy over every item) over
  the same windows, right padded to each batch's longest as its collate function does;
- full-ranking validation of every user: our evaluator (after one pass that compiles) and the
  reference's `evaluate` (torch no_grad, the whole history masked).
Both report wall seconds and process CPU-seconds; pin the process to one core (`taskset`) and
keep torch at one thread (`--threads 1`), as PROTOCOL.md measured the reference. Ratios are the
reference's time over ours (> 1: ours is faster).

Shapes: `--shapes dev` reads `--config`'s dataset (`--data.path`, `--data.format`); `--shapes
ml25m` builds `--users` synthetic users over ML-25M's 59,047 items with its length distribution
(`train_throughput.synthetic_sequences`). Both use our SASRec defaults (dim 64, 2 blocks, 1 head,
max_len 200, the reference's) and our full softmax; the reference scores [B, T, V + 1] logits at
once, so at ML-25M shapes its batch needs ~B * 200 * 59,048 * 12 bytes (lower --batch_size).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import numpy as np
import reference_sasrec
import torch_models
import train_throughput

torch = reference_sasrec.torch


def our_config(args):
    from onerec_jax.defaults import apply_variant, base_config

    c = apply_variant(base_config(), args.model)
    c.loss.name = {"full": "full_softmax", "sampled": "sampled_softmax"}[args.loss]
    c.train.batch_size = args.batch_size
    c.train.progress = False
    c.eval.valid_users = 0  # every user, as the reference's evaluate
    c.mesh.num_devices = 1
    return c


def load(args):
    """(SequenceData, item table or None, config) for the shapes asked (the synthetic ML-25M
    shapes have no item content: OneRec then reads ids alone on both sides)."""
    c = our_config(args)
    if args.shapes == "ml25m":
        data = train_throughput.synthetic_sequences(args.users, train_throughput.ML25M_ITEMS, 0)
        return data, None, c
    overrides = {k: v for k, v in (("path", args.path), ("format", args.format)) if v}
    data, items = reference_sasrec._load_data(args.config, overrides, with_items=True)
    return data, items, c


def torch_batch(batch) -> tuple:
    """Our left-padded window batch -> the reference's right-padded (ids, labels)."""
    rows, labels = [], []
    for inputs, targets, mask in zip(batch["inputs"], batch["targets"], batch["mask"], strict=True):
        real = inputs > 0
        rows.append(inputs[real])
        labels.append(np.where(mask[real], targets[real], -100))
    ids = reference_sasrec._right_padded(rows, 0)
    return torch.from_numpy(ids), torch.from_numpy(reference_sasrec._right_padded(labels, -100))


def timed(fn):
    """(result, wall s, process CPU s) of fn()."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def ours(config, data, items, epochs: int):
    """Our epoch and validation: (epoch walls, epoch CPUs, eval wall, eval CPU, host batches)."""
    import jax

    from onerec_jax.evaluation.evaluator import make_evaluator
    from onerec_jax.parallel import sharding
    from onerec_jax.training import train

    setup = train_throughput.train_setup(config, data, items)
    it = iter(train.train_batches(setup, 0))
    host = [next(it) for _ in range(setup.steps_per_epoch)]
    batches = [sharding.global_batch(b, setup.mesh, setup.rules) for b in host]
    state = train.initial_state(setup, 0)
    rng = jax.random.key(0)
    for b in batches:  # compile every bucket width before timing (one untimed epoch)
        state, metrics = setup.train_step(state, b, rng)
    jax.block_until_ready((state, metrics))
    walls, cpus = [], []
    for _ in range(epochs):

        def epoch(state=state):
            for b in batches:
                state, metrics = setup.train_step(state, b, rng)
            return jax.block_until_ready((state, metrics))

        (state, _), wall, cpu = timed(epoch)
        walls.append(wall)
        cpus.append(cpu)
    evaluator = make_evaluator(setup.model, data, config, setup.mesh, setup.rules)
    evaluator.evaluate(state.params, "valid")  # compiles
    _, eval_wall, eval_cpu = timed(lambda: evaluator.evaluate(state.params, "valid"))
    return walls, cpus, eval_wall, eval_cpu, host, setup


def reference(data, host, setup, args, max_len: int, epochs: int):
    """The PyTorch model's epoch over the same windows and its validation, as `ours`."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    log_probs = torch.from_numpy(np.array(setup.model.item_log_probs, np.float32))
    if args.model == "onerec":
        info = setup.info
        model = torch_models.TorchOneRecItemHead(
            data.n_items, info.item_genres, info.item_year_bucket, dim=int(setup.config.model.dim)
        )
        batches = [
            tuple(torch.from_numpy(np.asarray(b[k])) for k in ("inputs", "targets", "mask"))
            for b in host
        ]
    else:
        model = reference_sasrec.ReferenceSASRec(data.n_items, max_len=max_len)
        batches = [torch_batch(b) for b in host]
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=-100)

    def batch_loss(batch):
        if args.model == "onerec":
            inputs, targets, mask = batch
            h, targets = model.hidden(inputs.long())[mask], targets.long()[mask]
            table = model.item_table()
        elif args.loss == "full":  # the reference's own loss: every position, [B, T, V + 1]
            ids, labels = batch
            logits = model(ids)
            return loss_fn(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        else:
            ids, labels = batch
            real = labels != -100
            h, targets, table = model.hidden(ids)[real], labels[real], model.item_emb.weight
        if args.loss == "full":
            return torch_models.full_softmax(h, table, targets)
        return torch_models.sampled_softmax(h, table, targets, log_probs, generator)

    def epoch():
        for batch in batches:
            loss = batch_loss(batch)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        return loss.item()

    epoch()  # warm-up, as ours compiles first
    walls, cpus = [], []
    for _ in range(epochs):
        _, wall, cpu = timed(epoch)
        walls.append(wall)
        cpus.append(cpu)
    evaluate = torch_models.evaluate if args.model == "onerec" else reference_sasrec.evaluate
    evaluate(model, data, "valid", max_len)
    _, eval_wall, eval_cpu = timed(lambda: evaluate(model, data, "valid", max_len))
    return walls, cpus, eval_wall, eval_cpu


def report(result: dict) -> str:
    o, r = result["ours"], result["reference"]
    lines = [
        f"{result['model']}, {result['loss']} softmax, "
        f"{result['shapes']}: {result['users']:,} users, {result['items']:,} items, batch "
        f"{result['batch_size']}, {result['steps_per_epoch']} steps an epoch; {result['machine']}",
        "| | ours | reference (torch) | reference / ours |",
        "|---|---|---|---|",
    ]
    for key, label in (
        ("epoch_s", "train epoch, wall s (median)"),
        ("epoch_cpu_s", "train epoch, CPU s (median)"),
        ("eval_s", "validation of every user, wall s"),
        ("eval_cpu_s", "validation of every user, CPU s"),
    ):
        lines.append(f"| {label} | {o[key]:.2f} | {r[key]:.2f} | {r[key] / o[key]:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", choices=("dev", "ml25m"), default="dev")
    p.add_argument("--model", choices=("sasrec", "onerec"), default="sasrec")
    p.add_argument("--loss", choices=("full", "sampled"), default="full")
    p.add_argument("--config", default="configs/ml_latest_small.py", help="--shapes dev: dataset")
    p.add_argument("--data.path", dest="path", default=None)
    p.add_argument("--data.format", dest="format", default=None)
    p.add_argument("--users", type=int, default=4096, help="--shapes ml25m: synthetic users")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=3, help="timed epochs each (median reported)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--out", type=Path, default=None, help="results JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data, items, config = load(args)
    max_len = int(config.data.max_len)
    walls, cpus, eval_wall, eval_cpu, host, setup = ours(config, data, items, args.epochs)
    result = {
        "model": args.model,
        "loss": args.loss,
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} thread)",
        "shapes": args.shapes,
        "users": int(data.n_users),
        "items": int(data.n_items),
        "batch_size": args.batch_size,
        "steps_per_epoch": len(host),
        "ours": {
            "epoch_s": float(np.median(walls)),
            "epoch_cpu_s": float(np.median(cpus)),
            "eval_s": eval_wall,
            "eval_cpu_s": eval_cpu,
        },
    }
    print(f"ours: epoch {np.median(walls):.2f} s, validation {eval_wall:.2f} s", flush=True)
    walls, cpus, eval_wall, eval_cpu = reference(data, host, setup, args, max_len, args.epochs)
    result["reference"] = {
        "epoch_s": float(np.median(walls)),
        "epoch_cpu_s": float(np.median(cpus)),
        "eval_s": eval_wall,
        "eval_cpu_s": eval_cpu,
    }
    print(report(result), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
