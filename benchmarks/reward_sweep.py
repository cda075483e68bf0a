"""Validation RMSE of the reward model (models/reward.py) over a grid of `reward.dim` x
`reward.l2`: how its defaults were chosen (BENCHMARKS.md "The reward model").

  python benchmarks/reward_sweep.py --config configs/ml_latest_small.py \
      --config.data.path=../shared/data/ml-latest-small --dims 0,32,64 --l2 0.02,0.05,0.1,0.2

Only validation targets are read; test is not.
"""

from __future__ import annotations

import itertools

from absl import app, flags
from ml_collections import config_flags

from onerec_jax.models import reward
from onerec_jax.training.train import load_data

_CONFIG = config_flags.DEFINE_config_file("config", None, "A dataset config.")
_DIMS = flags.DEFINE_list("dims", ["0", "32"], "reward.dim values.")
_L2 = flags.DEFINE_list("l2", ["0.02", "0.05", "0.1", "0.2"], "reward.l2 values.")


def main(argv):
    del argv
    config = _CONFIG.value
    data, _ = load_data(config)
    print("| dim | l2 | best epoch | epochs | validation RMSE | user mean |")
    print("|---|---|---|---|---|---|")
    for dim, l2 in itertools.product(_DIMS.value, _L2.value):
        config.reward.update(dim=int(dim), l2=float(l2))
        model, history = reward.fit(data, config.reward, seed=int(config.seed))
        val = reward.rmse_report(model, data, "valid")
        best = min(history, key=lambda h: h[2])[0]
        print(
            f"| {dim} | {l2} | {best} | {len(history)} | {val['rmse']:.4f} | "
            f"{val['rmse_user_mean']:.4f} |",
            flush=True,
        )


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
