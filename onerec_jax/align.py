"""`--mode align`: preference alignment with DPO, as OneRec's Iterative Preference Alignment.

    python -m onerec_jax.main --mode align --workdir runs/onerec [--reward_workdir runs/reward] \
        [--config configs/ml_latest_small.py --config.align.beta=0.2 ...]

With `--config`, its `align` section is used (beta, candidates, iterations, ...); without, the
policy run's own (the defaults of defaults.py).

The policy is a trained scoring run (the OneRec item head or SASRec: issue 16 starts alignment
from the item head while the generative recipe is open). The reward model, `--reward_workdir`,
is a `--mode reward` run (models/reward.py: biased matrix factorisation of the training
ratings) or a run with a rating head (`model.rating_weight` > 0; by default the policy's own);
it must be fit on the same data. Each iteration (`align.iterations`):
1. every training user's history (the training part: validation and test items unseen) gets the
   policy's current top `align.candidates` unseen items;
2. the reward model predicts the user's rating of each; the best and the worst form the
   (chosen, rejected) pair (users whose pair ties are left out);
3. `align.steps` optimizer steps (0: one pass over the users) minimise
   DPO(beta) + align.next_item_weight x the model's own next-item loss on training windows,
   DPO = -log sigmoid(beta ((log pi(c) - log pi_ref(c)) - (log pi(r) - log pi_ref(r)))), with
   pi = the policy's softmax over the catalogue and pi_ref the frozen policy at the start.
Logged per iteration: the mean reward of chosen and rejected items, the DPO loss and margin,
the mean KL(pi || pi_ref) over a batch of users, the share of candidates the reward model
predicts >= 4 stars. Then validation and test as for any run (with the preference metrics),
results.json and a checkpoint in `--align_workdir` (default `<workdir>_aligned`), so that
`--mode recommend / serve / eval` use the aligned model. The policy run is not written to.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from onerec_jax.data.training_examples import prefix_inputs
from onerec_jax.errors import UserError
from onerec_jax.evaluation.evaluator import make_evaluator
from onerec_jax.models import registry
from onerec_jax.models import reward as reward_lib
from onerec_jax.models.base import ScoringModel
from onerec_jax.models.reward import RewardModel
from onerec_jax.parallel import sharding
from onerec_jax.runs import derived_run_dir, load_run
from onerec_jax.training import checkpointing, train
from onerec_jax.training.logger import MetricLogger

LIKED = 4.0  # the reward share reported: candidates predicted at >= 4 stars


def dpo_loss(lp_c, lp_r, ref_c, ref_r, beta: float) -> tuple[jax.Array, jax.Array]:
    """(mean DPO loss, mean margin) of pairs: -log sigmoid(beta x margin), margin = the
    chosen's log-ratio to the reference minus the rejected's."""
    margin = (lp_c - ref_c) - (lp_r - ref_r)
    return -jnp.mean(jax.nn.log_sigmoid(beta * margin)), jnp.mean(margin)


def make_pairs(candidates: np.ndarray, rewards: np.ndarray, valid: np.ndarray):
    """(chosen [U], rejected [U], keep [U]) from candidates [U, N] and their rewards [U, N]
    (`valid` [U, N] False for empty slots): the highest and the lowest reward of each user's
    valid candidates; `keep` False where they tie (nothing to prefer)."""
    hi = np.where(valid, rewards, -np.inf)
    lo = np.where(valid, rewards, np.inf)
    best, worst = hi.argmax(axis=1), lo.argmin(axis=1)
    rows = np.arange(len(candidates))
    keep = valid.any(axis=1) & (hi[rows, best] > lo[rows, worst])
    return candidates[rows, best], candidates[rows, worst], keep


def catalogue_log_probs(model: ScoringModel, params, inputs: jax.Array) -> jax.Array:
    """[B, V] log-softmax of the policy's next-item logits over items 1..V-1 (-inf at 0)."""
    state = model.user_state(params, {"inputs": inputs})
    table = model.item_table(params)[: model.info.vocab_size]
    logits = jnp.einsum("bd,vd->bv", state.astype(jnp.float32), table.astype(jnp.float32))
    logits = jnp.where(jnp.arange(model.info.vocab_size) >= 1, logits, -jnp.inf)
    return jax.nn.log_softmax(logits, axis=-1)


def _inputs(data, users: np.ndarray, max_len: int) -> np.ndarray:
    """[U, max_len] left-padded training parts of `users` (what the policy reads)."""
    return prefix_inputs(data, "train", users, max_len)


def _history(data, users: np.ndarray) -> np.ndarray:
    """[U, H] every training item of `users` (seen: never a candidate), 0-padded."""
    part = data.train
    lengths = part.lengths[users]
    width = 1 << max(int(lengths.max()) - 1, 0).bit_length()
    out = np.zeros((len(users), width), np.int32)
    for i, u in enumerate(users):
        out[i, : lengths[i]] = data.items[part.starts[u] : part.ends[u]]
    return out


class Aligner:
    """The jitted pieces of alignment for one (policy, reward) pair of runs on the same data."""

    def __init__(self, policy, reward, cfg: ml_collections.ConfigDict):
        """`reward`: a `models.reward.RewardModel`, or a loaded run with a rating head."""
        self.policy, self.cfg = policy, cfg
        model = policy.model
        self.tx = optax.adam(float(cfg.learning_rate))
        k = int(cfg.candidates)
        self._topk = jax.jit(lambda p, x, h: model.topk(p, {"inputs": x}, h, k=k))
        if isinstance(reward, RewardModel):
            self.rewards = reward.predict  # (users [U], items [U, N]) -> [U, N]
        else:
            rmodel, rlen = reward.model, reward.config.data.max_len

            def head(p, x, items):  # [U, N] the rating head's predictions
                state = rmodel.user_state(p, {"inputs": x})
                return rmodel.target_ratings(p, state[:, None, :], rmodel.item_table(p), items)

            jitted = jax.jit(head)
            self.rewards = lambda rows, items: np.asarray(
                jitted(reward.params, _inputs(policy.data, rows, rlen), items)
            )
        self._log_probs = jax.jit(lambda p, x: catalogue_log_probs(model, p, x))
        beta, weight = float(cfg.beta), float(cfg.next_item_weight)

        def loss_fn(params, pairs, window_batch, rng):
            lp = catalogue_log_probs(model, params, pairs["inputs"])
            lp_c = jnp.take_along_axis(lp, pairs["chosen"][:, None], 1)[:, 0]
            lp_r = jnp.take_along_axis(lp, pairs["rejected"][:, None], 1)[:, 0]
            dpo, margin = dpo_loss(lp_c, lp_r, pairs["ref_chosen"], pairs["ref_rejected"], beta)
            metrics = {"dpo_loss": dpo, "dpo_margin": margin}
            total = dpo
            if weight > 0:
                next_item, _ = model.loss(params, window_batch, rng)
                total = total + weight * next_item
                metrics["next_item_loss"] = next_item
            return total, metrics

        def step(params, opt_state, pairs, window_batch, rng):
            (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                params, pairs, window_batch, rng
            )
            updates, opt_state = self.tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, {**metrics, "loss": loss}

        self.step = jax.jit(step)

        def kl(params, ref_params, x):  # mean KL(pi || pi_ref) over the users of x
            lp, ref = (
                catalogue_log_probs(model, params, x),
                catalogue_log_probs(model, ref_params, x),
            )
            p = jnp.exp(lp)
            return jnp.mean(jnp.sum(jnp.where(p > 0, p * (lp - ref), 0.0), axis=-1))

        self.kl = jax.jit(kl)

    def pairs(self, params, ref_params, users: np.ndarray, batch: int = 256) -> dict:
        """Candidates, rewards and (chosen, rejected) pairs of `users`, with the reference's
        log-probabilities of both; plus the iteration's reward statistics."""
        data, max_len = self.policy.data, self.policy.config.data.max_len
        out = {k: [] for k in ("inputs", "chosen", "rejected", "ref_chosen", "ref_rejected")}
        stats = {"reward_chosen": [], "reward_rejected": [], "liked_share": []}
        for lo in range(0, len(users), batch):
            rows = users[lo : lo + batch]
            x = _inputs(data, rows, max_len)
            items, _ = self._topk(params, x, _history(data, rows))
            items = np.asarray(items)
            valid = items > 0
            r = np.asarray(self.rewards(rows, items))
            chosen, rejected, keep = make_pairs(items, r, valid)
            ref = np.asarray(self._log_probs(ref_params, x))
            idx = np.arange(len(rows))
            out["inputs"].append(x[keep])
            out["chosen"].append(chosen[keep])
            out["rejected"].append(rejected[keep])
            out["ref_chosen"].append(ref[idx, chosen][keep])
            out["ref_rejected"].append(ref[idx, rejected][keep])
            stats["reward_chosen"].append(np.where(valid, r, -np.inf).max(1)[keep])
            stats["reward_rejected"].append(np.where(valid, r, np.inf).min(1)[keep])
            stats["liked_share"].append(((r >= LIKED) & valid).sum(1) / np.maximum(valid.sum(1), 1))
        pairs = {k: np.concatenate(v) for k, v in out.items()}
        summary = {k: float(np.mean(np.concatenate(v))) for k, v in stats.items()}
        summary["pairs"] = len(pairs["chosen"])
        return pairs, summary


def _same_data(policy, item_ids: np.ndarray, n_users: int) -> None:
    if not np.array_equal(policy.data.item_ids, item_ids) or policy.data.n_users != n_users:
        raise UserError(
            "--reward_workdir was fit on other data than the policy: fit the reward model "
            "(--mode reward, or a run with --config.model.rating_weight > 0) on the same data."
        )


def load_reward(policy, reward_workdir: str | Path | None, workdir: Path):
    """The reward of `--mode align`: a `--mode reward` run's RewardModel, or a run (the
    policy's own by default) with a rating head."""
    if reward_workdir and reward_lib.is_reward_run(reward_workdir):
        model = RewardModel.load(Path(reward_workdir) / reward_lib.REWARD_FILE)
        _same_data(policy, model.item_ids, len(model.user_bias))
        return model
    reward = load_run(reward_workdir) if reward_workdir else policy
    if not getattr(reward.model, "has_rating_head", False):
        raise UserError(
            f"{reward_workdir or workdir}: no reward model. Fit one (--mode reward --workdir DIR) "
            "or train a run with a rating head (--config.model.rating_weight=1.0), and pass it "
            "as --reward_workdir."
        )
    _same_data(policy, reward.data.item_ids, reward.data.n_users)
    return reward


def align(
    workdir: str | Path,
    *,
    reward_workdir: str | Path | None = None,
    out: str | Path | None = None,
    settings: ml_collections.ConfigDict | None = None,
) -> dict:
    """`--mode align` (the module docstring); returns the aligned run's results.json.
    `settings`: the `align` config section to use (default: the policy run's own)."""
    workdir = Path(workdir).expanduser()
    out = derived_run_dir(workdir, out, "_aligned", "--align_workdir", "aligned")
    policy = load_run(workdir)
    if (
        not isinstance(policy.model, ScoringModel)
        or registry.model_spec(policy.config).reads_user_ids
    ):
        raise UserError("--mode align starts from a sequence scoring run (onerec or sasrec).")
    if not policy.data.has_ratings:
        raise UserError("--mode align learns from ratings; this data has none.")
    reward = load_reward(policy, reward_workdir, workdir)
    config = policy.config
    if settings is not None:
        config.align = ml_collections.ConfigDict(settings.to_dict())
    cfg = config.align
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(config.to_json_best_effort(indent=2))
    aligner = Aligner(policy, reward, cfg)
    ref_params = jax.device_get(policy.params)
    params = policy.params
    opt_state = aligner.tx.init(params)
    with sharding.use_mesh(policy.mesh, policy.rules):
        setup = train.make_setup(config, policy.data, policy.items, policy.mesh, policy.rules)
        windows = iter(train.train_batches(setup, config.seed + 1))
        logger = MetricLogger(out, enabled=jax.process_index() == 0)
        users = np.arange(policy.data.n_users)
        rng = np.random.default_rng(config.seed)
        history, step, start = [], 0, time.perf_counter()
        batch_size = int(cfg.batch_size)
        for it in range(int(cfg.iterations)):
            pairs, summary = aligner.pairs(params, ref_params, users)
            n = summary["pairs"]
            if n == 0:
                raise UserError("no user has two candidates with different rewards to prefer.")
            steps = int(cfg.steps) or max(1, n // batch_size)
            last = {}
            for _ in range(steps):
                rows = rng.choice(n, min(batch_size, n), replace=False)
                pair_batch = {k: jnp.asarray(v[rows]) for k, v in pairs.items()}
                window = sharding.global_batch(next(windows), policy.mesh, policy.rules)
                params, opt_state, last = aligner.step(
                    params, opt_state, pair_batch, window, jax.random.key(step)
                )
                step += 1
            probe = _inputs(policy.data, users[: min(256, len(users))], config.data.max_len)
            summary |= {k: float(v) for k, v in last.items()}
            summary["kl_to_reference"] = float(aligner.kl(params, ref_params, probe))
            summary |= {"iteration": it + 1, "steps": step}
            history.append(summary)
            logger.write(step, {f"align/{k}": v for k, v in summary.items()})
            print(
                f"iteration {it + 1}: pairs {n}, reward chosen {summary['reward_chosen']:.3f} "
                f"rejected {summary['reward_rejected']:.3f}, liked share "
                f"{summary['liked_share']:.3f}, DPO loss {summary['dpo_loss']:.4f} margin "
                f"{summary['dpo_margin']:.3f}, KL {summary['kl_to_reference']:.4f}",
                flush=True,
            )
        seconds = time.perf_counter() - start
        evaluator = make_evaluator(policy.model, policy.data, config, policy.mesh, policy.rules)
        val, _ = evaluator.evaluate(params, "valid")
        test, _ = evaluator.evaluate(params, "test")
        _, final = aligner.pairs(params, ref_params, users[: min(1024, len(users))])
        ckpt = checkpointing.Checkpointer(out / "checkpoints", metric=train.SELECT_METRIC)
        ckpt.save(
            step,
            params=params,
            opt_state=opt_state,
            data_iter=windows,
            meta={"aligned_from": str(workdir)},
            metrics={train.SELECT_METRIC: val["ndcg@10"]},
            force=True,
        )
        ckpt.close()
        logger.close()
    results = {
        "model": config.model.name,
        "data": {"users": int(policy.data.n_users), "source": str(config.data.path or "")},
        "protocol": {"aligned_from": str(workdir), "reward": str(reward_workdir or workdir)},
        "best_step": step,
        "steps": step,
        "params": int(sum(np.size(x) for x in jax.tree.leaves(params))),
        "train_seconds": seconds,
        "eval_seconds": float(val["seconds"] + test["seconds"]),
        "history": [[step, seconds, val["ndcg@10"]]],
        "val": val,
        "test": test,
        "align": {
            "workdir": str(out),
            "iterations": history,
            "final_liked_share": final["liked_share"],
        },
    }
    if jax.process_index() == 0:
        (out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    return results
