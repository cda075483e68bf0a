"""The public PyTorch SASRec+ and BERT4Rec recipes, rewritten minimally, trained under our
protocol.

  pip install -c constraints.txt -e '.[bench]'        # torch (CPU), only for this benchmark
  taskset -c 0 python benchmarks/reference_sasrec.py --config configs/ml_latest_small.py \
      --data.path ../shared/data/ml-latest-small --seed 0 --out runs/reference/seed0.json

What it is: the SASRec and training loop of antklen/sasrec-bert4rec-recsys23 (Klenitskiy and
Vasilev, RecSys 2023; `src/models.py`, `src/datasets.py`, `src/modules.py`, `src/run.py`) as
PROTOCOL.md ran it on the development set: hidden 64, 2 blocks, 1 head, dropout 0.1, max_len 200,
Adam 1e-3 (torch defaults otherwise), batch 128, full cross-entropy over every item and the
padding row, one example per user an epoch (the last max_len + 1 training items, right padded,
positions counted from the first item), early stopping on validation NDCG@10 with patience 10,
the best epoch's weights scored on test. The block: q = LN(x); x = q + MHA(q, x, x) (causal, no
key padding mask); x = FFN(LN(x)) + LN(x) (two 1x1 convolutions with dropout); padding rows
zeroed after each block; a last LN; logits against the item table (scaled by sqrt(dim) at the
input). Initialisation normal(0.02) for embeddings and the FFN and attention-output kernels
(MultiheadAttention's in-projection keeps torch's Xavier-uniform), biases 0, padding row 0.

`--model bert4rec` (with `--patience 20 --max_epochs 200`, the reference's BERT4Rec.yaml):
HF BertModel as the reference configures it (hidden 64, 2 layers, 2 heads, intermediate 256,
dropout 0.1, LayerNorm eps 1e-12, absolute positions from the first slot, embedding LayerNorm,
post-LN layers, GELU) fed the item embeddings, logits from the tied item table; ids 0 padding,
n + 1 [MASK]; one example per user an epoch, the last 50 training items, each replaced by
[MASK] with probability 0.2 (no forced last-item masking), cross-entropy at the masked slots
over all n + 2 rows; evaluation appends [MASK] after the last 49 items.

What is ours: the data (our reader, dense ids, leave-one-out split: `SequenceData.split`) and the
metric (full ranking over every item, the user's training history masked, rank = 1 + higher +
tied / 2 as PROTOCOL.md), so its numbers sit beside our SASRec's `results.json`. The reference's
own metric takes a top-10 list after `torch.sort`; with float scores ties do not occur, so the two
agree. Validation scores all users (the reference samples 10,000; the dev set has 671).

Output (--out, JSON): per-epoch history [epoch, process CPU-seconds so far, val NDCG@10] (CPU
time of training and validation, data loading and start-up excluded), the best epoch, its
CPU-seconds, its validation metrics and the test metrics of its weights. torch uses one thread
(`--threads`), like the PROTOCOL.md measurement; pin the process with `taskset` for timing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

try:
    import torch
    from torch import nn
except ImportError:  # pragma: no cover - the message is the point
    sys.exit(
        "benchmarks/reference_sasrec.py needs torch: pip install -c constraints.txt -e '.[bench]'"
    )


class PointWiseFeedForward(nn.Module):
    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.conv1 = nn.Conv1d(dim, dim, kernel_size=1)
        self.conv2 = nn.Conv1d(dim, dim, kernel_size=1)
        self.drop1 = nn.Dropout(dropout)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x):  # [B, T, D]
        h = self.conv1(x.transpose(-1, -2))
        h = self.drop2(self.conv2(torch.relu(self.drop1(h))))
        return h.transpose(-1, -2) + x


class ReferenceSASRec(nn.Module):
    """SASRec as the reference builds it (see the module docstring)."""

    def __init__(self, n_items: int, max_len=200, dim=64, blocks=2, heads=1, dropout=0.1):
        super().__init__()
        self.item_emb = nn.Embedding(n_items + 1, dim, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len, dim)
        self.emb_drop = nn.Dropout(dropout)
        self.attn_norms = nn.ModuleList(nn.LayerNorm(dim, eps=1e-8) for _ in range(blocks))
        self.attns = nn.ModuleList(
            nn.MultiheadAttention(dim, heads, dropout) for _ in range(blocks)
        )
        self.ffn_norms = nn.ModuleList(nn.LayerNorm(dim, eps=1e-8) for _ in range(blocks))
        self.ffns = nn.ModuleList(PointWiseFeedForward(dim, dropout) for _ in range(blocks))
        self.last_norm = nn.LayerNorm(dim, eps=1e-8)
        self.apply(self._init)

    @staticmethod
    def _init(module):
        if isinstance(module, nn.Linear | nn.Conv1d):
            module.weight.data.normal_(0.0, 0.02)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(0.0, 0.02)
            if module.padding_idx is not None:
                module.weight.data[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()

    def forward(self, ids):  # [B, T] right-padded with 0 -> logits [B, T, n_items + 1]
        return self.hidden(ids) @ self.item_emb.weight.T

    def hidden(self, ids):  # [B, T] right-padded with 0 -> [B, T, dim]
        x = self.item_emb(ids) * self.item_emb.embedding_dim**0.5
        x = x + self.pos_emb(torch.arange(ids.shape[1], device=ids.device))[None]
        x = self.emb_drop(x)
        keep = (ids != 0).unsqueeze(-1)
        x = x * keep
        length = ids.shape[1]
        causal = ~torch.tril(torch.ones(length, length, dtype=torch.bool, device=ids.device))
        layers = zip(self.attn_norms, self.attns, self.ffn_norms, self.ffns, strict=True)
        for norm, attn, ffn_norm, ffn in layers:
            x = x.transpose(0, 1)  # MultiheadAttention wants [T, B, D]
            q = norm(x)
            out, _ = attn(q, x, x, attn_mask=causal, need_weights=False)
            x = (q + out).transpose(0, 1)
            x = ffn(ffn_norm(x)) * keep
        return self.last_norm(x)


class BertLayer(nn.Module):
    """One post-LN BERT encoder layer as HF transformers' BertLayer (eps 1e-12, GELU)."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_drop = nn.Dropout(dropout)
        self.out = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-12)
        self.up = nn.Linear(dim, mlp_dim)
        self.down = nn.Linear(mlp_dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-12)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, key_bias):  # x [B, T, D], key_bias [B, 1, 1, T] (0 or -inf-ish)
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(d // self.heads) + key_bias
        h = (self.attn_drop(att.softmax(-1)) @ v).transpose(1, 2).reshape(b, t, d)
        x = self.norm1(x + self.drop(self.out(h)))
        h = self.down(nn.functional.gelu(self.up(x)))
        return self.norm2(x + self.drop(h))


class ReferenceBERT4Rec(nn.Module):
    """BERT4Rec as the reference builds it: HF BertModel (absolute positions from the first
    slot, token-type row 0, embedding LayerNorm, post-LN layers, dropout 0.1, init normal(0.02))
    fed item embeddings, logits from the tied item table (no bias). Ids: 0 padding, 1..n items,
    n + 1 the [MASK] token; the table has all n + 2 rows, as the reference's."""

    def __init__(
        self,
        n_items: int,
        max_len=50,
        dim=64,
        layers=2,
        heads=2,
        mlp_dim=256,
        dropout=0.1,
        max_positions=200,
    ):
        super().__init__()
        self.item_emb = nn.Embedding(n_items + 2, dim, padding_idx=0)
        self.pos_emb = nn.Embedding(max_positions, dim)
        self.type_emb = nn.Embedding(2, dim)
        self.emb_norm = nn.LayerNorm(dim, eps=1e-12)
        self.drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList(BertLayer(dim, heads, mlp_dim, dropout) for _ in range(layers))
        self.apply(ReferenceSASRec._init)

    def forward(self, ids):  # [B, T] right-padded with 0 -> logits [B, T, n_items + 2]
        positions = self.pos_emb(torch.arange(ids.shape[1]))[None]
        x = self.item_emb(ids) + positions + self.type_emb.weight[0]
        x = self.drop(self.emb_norm(x))
        key_bias = torch.where(ids != 0, 0.0, torch.finfo(x.dtype).min)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, key_bias)
        return x @ self.item_emb.weight.T


def _load_data(config_path: str, overrides: dict[str, str], with_items: bool = False):
    spec = importlib.util.spec_from_file_location("dataset_config", config_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config("sasrec")
    for key, value in overrides.items():
        setattr(cfg.data, key, value)
    from onerec_jax.data.dataset import load_data

    data, items = load_data(cfg.data, with_items=with_items)
    return (data, items) if with_items else (data, cfg)


def _right_padded(rows: list[np.ndarray], fill: int) -> np.ndarray:
    out = np.full((len(rows), max(len(r) for r in rows)), fill, np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def _training_examples(data, max_len: int) -> list[np.ndarray]:
    """Per user, the last max_len + 1 training items (the reference's CausalLMDataset)."""
    split = data.train
    return [
        data.items[max(s, e - max_len - 1) : e]
        for s, e in zip(split.starts, split.ends, strict=True)
    ]


def ranking_metrics(scores: np.ndarray, targets: np.ndarray, k: int = 10) -> dict[str, np.ndarray]:
    """Per-user NDCG@k, HR@k and MRR from [U, n_items + 1] scores whose masked entries are -inf:
    rank = 1 + #higher + #tied others / 2 (PROTOCOL.md's tie rule)."""
    target_score = scores[np.arange(len(targets)), targets][:, None]
    higher = (scores > target_score).sum(1)
    tied = (scores == target_score).sum(1) - 1
    rank = 1.0 + higher + tied / 2.0
    hit = rank <= k
    return {
        f"ndcg@{k}": np.where(hit, 1.0 / np.log2(rank + 1.0), 0.0),
        f"hr@{k}": hit.astype(np.float64),
        "mrr": 1.0 / rank,
    }


@torch.no_grad()
def evaluate(model, data, split_name: str, max_len: int, batch: int = 256) -> dict[str, float]:
    """Full ranking of every user's target in `split_name` ("valid" or "test"). BERT4Rec reads
    the last max_len - 1 items and a [MASK] (the reference's MaskedLMPredictionDataset)."""
    model.eval()
    split = data.split(split_name)
    cloze = isinstance(model, ReferenceBERT4Rec)
    per_user: dict[str, list[np.ndarray]] = {}
    for lo in range(0, data.n_users, batch):
        users = range(lo, min(lo + batch, data.n_users))
        keep = max_len - 1 if cloze else max_len
        rows = [
            data.items[max(split.starts[u], split.ends[u] - keep) : split.ends[u]] for u in users
        ]
        if cloze:
            rows = [np.append(r, data.n_items + 1) for r in rows]
        ids = torch.from_numpy(_right_padded(rows, 0))
        last = torch.tensor([len(r) - 1 for r in rows])
        logits = model(ids)[torch.arange(len(rows)), last].numpy().astype(np.float64)
        logits = logits[:, : data.n_items + 1]  # BERT4Rec's [MASK] row is not an item
        logits[:, 0] = -np.inf
        for i, u in enumerate(users):
            logits[i, data.items[split.starts[u] : split.ends[u]]] = -np.inf  # the whole history
        for key, value in ranking_metrics(logits, split.targets[lo : lo + len(rows)]).items():
            per_user.setdefault(key, []).append(value)
    out = {}
    for key, chunks in per_user.items():
        values = np.concatenate(chunks)
        out[key] = float(values.mean())
        out[f"{key}_ci95"] = float(1.96 * values.std(ddof=1) / math.sqrt(len(values)))
    out["users"] = int(data.n_users)
    model.train()
    return out


def _cloze_batch(rows: list[np.ndarray], n_items: int, rng, mask_prob: float):
    """The reference's MaskedLMDataset: each item hidden by [MASK] (id n_items + 1) with
    probability mask_prob, labels only there (-100 elsewhere), right padded."""
    ids = _right_padded(rows, 0)
    hide = (rng.random(ids.shape) < mask_prob) & (ids != 0)
    labels = np.where(hide, ids, -100)
    return torch.from_numpy(np.where(hide, n_items + 1, ids)), torch.from_numpy(labels)


def train(
    data,
    *,
    model_name="sasrec",
    seed=0,
    max_len=200,
    batch=128,
    lr=1e-3,
    max_epochs=400,
    patience=10,
    mask_prob=0.2,
    log=print,
):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    cloze = model_name == "bert4rec"
    model = (ReferenceBERT4Rec if cloze else ReferenceSASRec)(data.n_items, max_len)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss(ignore_index=-100)
    # SASRec: the last max_len + 1 items (inputs and shifted labels); BERT4Rec: the last max_len
    examples = _training_examples(data, max_len - 1 if cloze else max_len)
    history, best = [], {"val_ndcg": -1.0}
    best_state, bad, cpu = None, 0, 0.0
    for epoch in range(1, max_epochs + 1):
        mark = time.process_time()
        order = rng.permutation(len(examples))  # DataLoader(shuffle=True), last batch kept
        for lo in range(0, len(examples), batch):
            rows = [examples[i] for i in order[lo : lo + batch]]
            if cloze:
                ids, labels = _cloze_batch(rows, data.n_items, rng, mask_prob)
            else:
                ids = torch.from_numpy(_right_padded([r[:-1] for r in rows], 0))
                labels = torch.from_numpy(_right_padded([r[1:] for r in rows], -100))
            logits = model(ids)
            loss = loss_fn(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        val = evaluate(model, data, "valid", max_len)
        cpu += time.process_time() - mark
        history.append([epoch, round(cpu, 3), val["ndcg@10"]])
        score = val["ndcg@10"]
        log(f"epoch {epoch}: loss {loss.item():.4f} val NDCG@10 {score:.4f} ({cpu:.0f} CPU-s)")
        if val["ndcg@10"] > best["val_ndcg"]:
            best = {"val_ndcg": val["ndcg@10"], "epoch": epoch, "cpu_seconds": cpu, "valid": val}
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
            bad = 0
        else:
            bad += 1
            if bad >= patience:
                break
    model.load_state_dict(best_state)
    return model, history, best, cpu


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/ml_latest_small.py", help="dataset config file")
    p.add_argument("--data.path", dest="path", default=None, help="override config.data.path")
    p.add_argument("--data.format", dest="format", default=None, help="override config.data.format")
    p.add_argument("--model", choices=("sasrec", "bert4rec"), default="sasrec")
    p.add_argument(
        "--max_len",
        type=int,
        default=None,
        help="default: config data.max_len (SASRec), 50 (BERT4Rec, the reference's)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max_epochs", type=int, default=400)
    p.add_argument("--patience", type=int, default=10, help="PROTOCOL.md's reference run: 10")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--out", type=Path, required=True, help="results JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = {k: v for k, v in (("path", args.path), ("format", args.format)) if v is not None}
    data, cfg = _load_data(args.config, overrides)
    print(
        f"{data.n_users} users, {data.n_items} items; torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s)",
        flush=True,
    )
    max_len = args.max_len or (50 if args.model == "bert4rec" else cfg.data.max_len)
    model, history, best, cpu = train(
        data,
        model_name=args.model,
        seed=args.seed,
        max_len=max_len,
        max_epochs=args.max_epochs,
        patience=args.patience,
        log=lambda m: print(m, flush=True),
    )
    test = evaluate(model, data, "test", max_len)
    print(
        f"best epoch {best['epoch']}: val NDCG@10 {best['val_ndcg']:.4f}, "
        f"test NDCG@10 {test['ndcg@10']:.4f} HR@10 {test['hr@10']:.4f}"
    )
    result = {
        "model": f"reference {'BERT4Rec' if args.model == 'bert4rec' else 'SASRec+'} (torch)",
        "seed": args.seed,
        "max_len": max_len,
        "data": overrides or cfg.data.release,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "best_epoch": best["epoch"],
        "cpu_seconds_to_best": best["cpu_seconds"],
        "cpu_seconds": cpu,
        "valid": best["valid"],
        "test": test,
        "history": history,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(args.out)


if __name__ == "__main__":
    main()
