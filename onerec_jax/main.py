"""Command line: `python -m onerec_jax.main --config configs/X.py[:variant] --mode M`.

Multi-process runs (launch/) start every process with the same command; `distributed` decides
from flags and the launcher's environment whether to join them. Training and evaluation run on
every process (all write the Orbax checkpoints); only process 0 writes reports and prints.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from onerec_jax import distributed
from onerec_jax.data import dataset, sequences
from onerec_jax.errors import UserError

MODES = (
    "prepare",
    "train",
    "eval",
    "tokenize",
    "report",
    "recommend",
    "serve",
    "update",
    "align",
    "reward",
)

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/ml25m.py[:variant].", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", "workdir", "Where the run writes its outputs.")
_MODE = flags.DEFINE_enum("mode", "train", MODES, "What to run.")
_USER = flags.DEFINE_string("user", None, "--mode recommend: a user id of the trained data.")
_ITEMS = flags.DEFINE_multi_string(
    "items",
    [],
    "--mode recommend: movies watched, oldest first: titles or movieIds, ';'-separated and/or "
    "repeated, e.g. --items='Toy Story (1995); Heat' --items=260.",
)
_K = flags.DEFINE_integer("k", 10, "--mode recommend: how many movies to recommend.")
_EXPLAIN = flags.DEFINE_bool(
    "explain", False, "--mode recommend: say which watched movies drove each recommendation."
)
_EXPLAIN_PNG = flags.DEFINE_string(
    "explain_png", None, "--mode recommend: write an attention heatmap of the recent history here."
)
_NEW_DATA = flags.DEFINE_string(
    "new_data", None, "--mode update: a folder of later interactions in the source's layout."
)
_UPDATE_WORKDIR = flags.DEFINE_string(
    "update_workdir", None, "--mode update: where the updated run goes (default <workdir>_update)."
)
_UPDATE_STEPS = flags.DEFINE_integer(
    "update_steps", 0, "--mode update: training steps (0: --update_epochs epochs)."
)
_UPDATE_EPOCHS = flags.DEFINE_float(
    "update_epochs", 1.0, "--mode update: epochs of the combined data when --update_steps is 0."
)
_REWARD_WORKDIR = flags.DEFINE_string(
    "reward_workdir",
    None,
    "--mode align: a --mode reward run, or a run with a rating head (default: --workdir's own).",
)
_ALIGN_WORKDIR = flags.DEFINE_string(
    "align_workdir", None, "--mode align: where the aligned run goes (default <workdir>_aligned)."
)
_HOST = flags.DEFINE_string("host", "127.0.0.1", "--mode serve: the address to listen on.")
_PORT = flags.DEFINE_integer("port", 8000, "--mode serve: the TCP port to listen on.")
_SERVE_MAX_BATCH = flags.DEFINE_integer(
    "serve_max_batch", 32, "--mode serve: the most requests answered by one model call."
)
_SERVE_MAX_WAIT_MS = flags.DEFINE_float(
    "serve_max_wait_ms",
    2.0,
    "--mode serve: how long the first waiting request waits for others to join its batch.",
)
_SERVE_WARMUP = flags.DEFINE_bool(
    "serve_warmup",
    True,
    "--mode serve: compile the batch sizes 1..max_batch (k=10) before taking requests.",
)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed",
    None,
    "Join a multi-process run: --distributed lets JAX detect the launcher (TPU pod, Open MPI), "
    "--nodistributed ignores the launcher's environment; unset: decided by the flags below, the "
    "JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID variables, or a SLURM step.",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-process: HOST:PORT of process 0 (same on every process)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process: how many processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process: this process, 0..N-1.")
_INIT_TIMEOUT = flags.DEFINE_integer(
    "distributed_init_timeout", 300, "Multi-process: seconds to wait for every process to join."
)
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "distributed_heartbeat_timeout",
    100,
    "Multi-process: seconds without a heartbeat after which a process counts as dead and the "
    "others stop with an error.",
)


def prepare(config, workdir: str) -> sequences.SequenceData:
    """Downloads (if needed), builds or loads the sequence cache, and prints the stats table."""
    start = time.perf_counter()
    data, items = dataset.load_data(config.data)
    stats = data.stats()
    print(sequences.format_stats(stats))
    print(f"catalogue items with side information: {len(items):,}")
    print(f"prepared in {time.perf_counter() - start:.1f}s")
    out = Path(workdir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "data_stats.json").write_text(json.dumps({**stats, "options": data.options}, indent=2))
    return data


def _line(name: str, m: dict) -> str:
    return (
        f"{name}: HR@10 {m['hr@10']:.4f} +- {m['hr@10_ci95']:.4f}  "
        f"NDCG@10 {m['ndcg@10']:.4f} +- {m['ndcg@10_ci95']:.4f}  "
        f"MRR {m['mrr']:.4f} +- {m['mrr_ci95']:.4f}  ({int(m['n_users']):,} users)"
    )


def _print_results(results: dict, workdir: Path) -> None:
    print(_line("validation (best step)", results["val"]))
    print(_line("test", results["test"]))
    print(
        f"best step {results['best_step']} of {results['steps']}; {results['params']:,} params; "
        f"train {results['train_seconds']:.0f}s; results in {workdir / 'results.json'}"
    )


def _print_eval(out: dict, workdir: Path) -> None:
    print(_line(f"test (step {out['best_step']})", out["test"]))
    recorded = workdir / "results.json"
    if recorded.exists():
        test = json.loads(recorded.read_text())["test"]
        same = all(test[k] == out["test"][k] for k in test if "@" in k or k == "mrr")
        print("matches the recorded results.json" if same else "DIFFERS from results.json")


def _is_main() -> bool:
    import jax

    return jax.process_index() == 0


def _join_processes(mode: str) -> bool:
    """Joins the multi-process run the flags or environment ask for, before any JAX op;
    False where this process has nothing to do (single-process modes run on process 0 only)."""
    plan = distributed.plan(
        distributed=_DISTRIBUTED.value,
        coordinator_address=_COORDINATOR.value,
        num_processes=_NUM_PROCESSES.value,
        process_id=_PROCESS_ID.value,
        initialization_timeout=_INIT_TIMEOUT.value,
        heartbeat_timeout=_HEARTBEAT_TIMEOUT.value,
    )
    if mode in ("train", "eval"):
        distributed.initialize(plan)
        print(distributed.topology_line(), flush=True)
        return True
    if plan is None:
        return True
    index = plan.process_id
    if index is None:  # only JAX can tell (e.g. a TPU pod's metadata)
        distributed.initialize(plan)
        import jax

        index = jax.process_index()
    if index != 0:
        print(f"process {index}: --mode {mode} runs on process 0 only; nothing to do here.")
    return index == 0


def _exit_with(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def _innermost_user_error(e: BaseException) -> UserError | None:
    """The deepest UserError in `e`'s chain: config_flags re-raises the config file's error with
    the traceback in its message, and absl recasts that as a flag error."""
    found = None
    while e is not None:
        if isinstance(e, UserError):
            found = e
        e = e.__cause__ or e.__context__
    return found


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with the mistakes a user makes in --config as one line: an unknown
    `:variant` (the config file raises a ConfigError), a missing file, an unknown field."""
    try:
        args = flags.FLAGS(argv)
    except flags.Error as e:
        user_error = _innermost_user_error(e)
        if user_error is not None:
            _exit_with(f"--config: {user_error}")
        print(f"FATAL Flags parsing error: {e}", file=sys.stderr)
        print("Pass --helpshort or --helpfull to see help on flags.", file=sys.stderr)
        sys.exit(1)
    except (KeyError, AttributeError) as e:  # config_flags: an override naming no field
        if not any(a.startswith("--config.") for a in argv):
            raise
        detail = e
        while isinstance(detail, BaseException) and detail.args:
            detail = detail.args[0]  # ConfigDict wraps a KeyError whose message is the key
        key, _, hint = str(detail).partition("\n")
        key = key.strip("'\"")
        named = [a.split("=")[0] for a in argv if a.startswith("--config.") and key in a]
        hint = hint or "Check the spelling against onerec_jax/defaults.py."
        _exit_with(f"{named[0] if named else '--config'}: the config has no field {key!r}. {hint}")
    config = _CONFIG.value
    if flags.FLAGS["config"].present and not isinstance(config, ml_collections.ConfigDict):
        # config_flags defers an OSError while loading the file until the config is read.
        path = flags.FLAGS["config"].config_filename.split(":")[0]
        if not Path(path).is_file():
            _exit_with(f"--config={path}: no such config file. Use one of configs/*.py.")
        problem = str(config.__dict__.get("_error", "")).strip().splitlines()[-1:]
        _exit_with(f"--config={path}: could not be loaded ({' '.join(problem).strip()}).")
    return args


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # Orbax and Grain log every step at INFO
    config = _CONFIG.value
    if config is None and _MODE.value not in ("report", "recommend", "serve", "update", "align"):
        raise app.UsageError("--config is required, e.g. --config configs/demo.py")
    workdir = Path(_WORKDIR.value)
    try:
        if not _join_processes(_MODE.value):
            return
        if _MODE.value == "report":  # reads the runs under --workdir; needs no config
            from onerec_jax.evaluation import report

            print(report.write_report(workdir).read_text())
            return
        if _MODE.value == "recommend":  # the trained run's own config.json, not --config
            from onerec_jax import recommend

            print(
                recommend.recommendations_text(
                    workdir,
                    user=_USER.value,
                    items=_ITEMS.value,
                    k=_K.value,
                    explain=_EXPLAIN.value,
                    explain_png=_EXPLAIN_PNG.value,
                )
            )
            return
        if _MODE.value == "align":  # the policy run's own config.json
            from onerec_jax import align

            results = align.align(
                workdir,
                reward_workdir=_REWARD_WORKDIR.value,
                out=_ALIGN_WORKDIR.value,
                settings=None if config is None else config.align,
            )
            _print_results(results, Path(results["align"]["workdir"]))
            return
        if _MODE.value == "update":  # the trained run's own config.json
            from onerec_jax import update

            if not _NEW_DATA.value:
                raise UserError("--mode update needs --new_data FOLDER (later interactions).")
            results = update.update(
                workdir,
                _NEW_DATA.value,
                out=_UPDATE_WORKDIR.value,
                steps=_UPDATE_STEPS.value,
                epochs=_UPDATE_EPOCHS.value,
            )
            _print_results(results, Path(results["update"]["workdir"]))
            return
        if _MODE.value == "serve":  # the trained run's own config.json, like recommend
            from onerec_jax import serve

            serve.serve(
                workdir,
                host=_HOST.value,
                port=_PORT.value,
                max_batch=_SERVE_MAX_BATCH.value,
                max_wait_ms=_SERVE_MAX_WAIT_MS.value,
                warmup=_SERVE_WARMUP.value,
            )
            return
        workdir.mkdir(parents=True, exist_ok=True)
        if _MODE.value == "prepare":
            (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
            prepare(config, str(workdir))
        elif _MODE.value == "train":
            from onerec_jax import modes  # JAX start-up only when training

            results = modes.train(config, workdir)
            if _is_main():
                _print_results(results, workdir)
        elif _MODE.value == "eval":
            from onerec_jax import modes

            out = modes.evaluate(config, workdir)
            if _is_main():
                _print_eval(out, workdir)
        elif _MODE.value == "reward":
            from onerec_jax import modes
            from onerec_jax.models import reward

            results = modes.reward(config, workdir)
            val, test = results["val"], results["test"]
            print(
                f"reward model: validation RMSE {val['rmse']:.4f} (user mean "
                f"{val['rmse_user_mean']:.4f}, global mean {val['rmse_global_mean']:.4f}); test "
                f"RMSE {test['rmse']:.4f} (user mean {test['rmse_user_mean']:.4f}); best epoch "
                f"{results['best_epoch']} of {results['epochs']}; in {workdir / reward.REWARD_FILE}"
            )
        elif _MODE.value == "tokenize":
            from onerec_jax import modes
            from onerec_jax.tokenize import quality, run, semantic_ids

            report = modes.tokenize(config, workdir)
            print(quality.format_report(report))
            print(
                f"features {report['features_seconds']:.1f}s, {config.tokenize.method} "
                f"{report['tokenizer_seconds']:.1f}s; ids in {workdir / semantic_ids.IDS_FILE}, "
                f"readable in {workdir / run.CSV_FILE}"
            )
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
