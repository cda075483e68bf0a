"""Our OneRec item head and our sampled softmax written minimally in PyTorch, for
`benchmarks/vs_pytorch.py` (speed side by side; not a training recipe).

`TorchOneRecItemHead` is `onerec_jax/models/onerec.py`'s default item head: id embeddings plus
the mean of the item's genre embeddings and its year-bucket embedding (sum fusion), dropout,
pre-RMSNorm blocks (multi-head causal self-attention without biases and with rotary positions
counted back from the most recent slot; a SwiGLU feed-forward with biases), a final RMSNorm, and
logits against the fused table of every item. Inputs are left padded as ours; the loss is
computed at the real positions only (the rows our row-blocked softmax computes), so neither side
pays for padding.

`sampled_softmax` is `onerec_jax/models/losses.sampled_softmax_xent` with our defaults: 256
shared negatives drawn uniformly, the targets of 1,024 random real positions as in-batch
negatives, accidental hits removed, and the logQ correction log(M q(j) + B p(j)) with p the
training popularity.
"""

from __future__ import annotations

import math

import numpy as np
import reference_sasrec

torch = reference_sasrec.torch
nn = torch.nn


def rotary(x, positions, base: float = 10_000.0):
    """x [B, T, H, Dh], positions [T] -> x with rotary embeddings (as layers.rotary)."""
    half = x.shape[-1] // 2
    freq = base ** (-torch.arange(half, dtype=torch.float32) / half)
    angle = positions[:, None].float() * freq[None]  # [T, Dh/2]
    sin, cos = angle.sin()[None, :, None], angle.cos()[None, :, None]
    x1, x2 = x[..., :half], x[..., half : 2 * half]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Block(nn.Module):
    """x + drop(attn(norm(x))); x + drop(ffn(norm(x))), as our pre-norm `layers.Block`."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.norm_attn, self.norm_ffn = nn.RMSNorm(dim, eps=1e-6), nn.RMSNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.gate, self.up = nn.Linear(dim, mlp_dim), nn.Linear(dim, mlp_dim)
        self.down = nn.Linear(mlp_dim, dim)
        self.drop = nn.Dropout(dropout)
        self.attn_drop = dropout

    def forward(self, x, mask, positions):  # x [B, T, D], mask [B, 1, T, T] bool (True: keep)
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm_attn(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        q, k = rotary(q, positions), rotary(k, positions)
        out = nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask,
            dropout_p=self.attn_drop if self.training else 0.0,
        )  # [B, H, T, Dh]
        x = x + self.drop(self.out(out.transpose(1, 2).reshape(b, t, d)))
        h = self.norm_ffn(x)
        h = self.drop(nn.functional.silu(self.gate(h)) * self.up(h))
        return x + self.drop(self.down(h))


class TorchOneRecItemHead(nn.Module):
    def __init__(
        self,
        n_items: int,
        genres: np.ndarray | None = None,  # [V, G] multi-hot
        years: np.ndarray | None = None,  # [V] bucket ids
        dim: int = 64,
        blocks: int = 2,
        heads: int = 2,
        mlp_dim: int = 128,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.id_emb = nn.Embedding(n_items + 2, dim)  # + our reconstruction [MASK] row
        nn.init.normal_(self.id_emb.weight, 0.0, dim**-0.5)
        self.genres = self.years = None
        if genres is not None:
            g = torch.from_numpy(np.asarray(genres, np.float32))
            self.genres = g / g.sum(-1, keepdim=True).clamp(min=1.0)  # mean of the genres
            self.genre_emb = nn.Parameter(torch.randn(g.shape[1], dim) * dim**-0.5)
        if years is not None:
            self.years = torch.from_numpy(np.asarray(years, np.int64))
            self.year_emb = nn.Embedding(int(self.years.max()) + 1, dim)
            nn.init.normal_(self.year_emb.weight, 0.0, dim**-0.5)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_dim, dropout) for _ in range(blocks))
        self.final_norm = nn.RMSNorm(dim, eps=1e-6)
        self.drop = nn.Dropout(dropout)
        self.n_items = n_items

    def embed(self, ids):
        """Fused embeddings of item ids [...] (0 = padding)."""
        x = self.id_emb(ids)
        if self.genres is not None:
            x = x + self.genres[ids] @ self.genre_emb
        if self.years is not None:
            x = x + self.year_emb(self.years[ids])
        return x

    def item_table(self):
        return self.embed(torch.arange(self.n_items + 1))  # [V, D]

    def hidden(self, ids):  # [B, T] left padded -> [B, T, D]
        t = ids.shape[1]
        positions = torch.arange(t - 1, -1, -1)
        real = ids > 0
        x = self.drop(self.embed(ids)) * real[..., None]
        causal = torch.tril(torch.ones(t, t, dtype=torch.bool))
        mask = (real[:, None, None, :] & causal)[:, :, :, :]
        # a row with no real key (left padding) attends to itself, so softmax stays finite
        mask = mask | torch.eye(t, dtype=torch.bool)
        for block in self.blocks:
            x = block(x, mask, positions)
        return self.final_norm(x)


def full_softmax(h, table, targets):
    """Mean cross-entropy of h [N, D] against every item of table [V, D] (row 0 excluded)."""
    logits = h @ table.T
    logits[:, 0] = -math.inf
    return nn.functional.cross_entropy(logits, targets)


def sampled_softmax(
    h,
    table,
    targets,
    item_log_probs,
    generator,
    n_negatives: int = 256,
    in_batch: int = 1024,
):
    """Our sampled softmax (module docstring) over N real rows: h [N, D], targets [N]."""
    n, v = h.shape[0], table.shape[0]
    shared = torch.randint(1, v, (n_negatives,), generator=generator)  # uniform over items
    picks = torch.randperm(n, generator=generator)[: min(in_batch, n)]
    negatives = torch.cat([shared, targets[picks]])  # [M + K]
    logits = torch.cat([(h * table[targets]).sum(-1, keepdim=True), h @ table[negatives].T], 1)
    k_eff = len(picks)
    expected = n_negatives / (v - 1) + k_eff * (n - 1) / n * item_log_probs.exp()[negatives]
    logits[:, 1:] = logits[:, 1:] - expected.log()[None]
    hits = negatives[None, :] == targets[:, None]  # accidental hits
    logits[:, 1:] = logits[:, 1:].masked_fill(hits, -math.inf)
    return nn.functional.cross_entropy(logits, torch.zeros(n, dtype=torch.long))


def evaluate(model, data, split_name: str, max_len: int, batch: int = 256) -> dict:
    """Full ranking of every user's `split_name` target (history masked), as ours."""
    model.eval()
    split = data.split(split_name)
    found = {}
    with torch.no_grad():
        table = model.item_table()
        for lo in range(0, data.n_users, batch):
            users = range(lo, min(lo + batch, data.n_users))
            rows = [
                data.items[max(split.starts[u], split.ends[u] - max_len) : split.ends[u]]
                for u in users
            ]
            width = max(len(r) for r in rows)
            ids = np.zeros((len(rows), width), np.int64)
            for i, r in enumerate(rows):
                ids[i, width - len(r) :] = r
            scores = (model.hidden(torch.from_numpy(ids))[:, -1] @ table.T).numpy()
            scores = scores.astype(np.float64)
            scores[:, 0] = -np.inf
            for i, u in enumerate(users):
                scores[i, data.items[split.starts[u] : split.ends[u]]] = -np.inf
            targets = split.targets[lo : lo + len(rows)]
            for key, value in reference_sasrec.ranking_metrics(scores, targets).items():
                found.setdefault(key, []).append(value)
    model.train()
    return {key: float(np.concatenate(v).mean()) for key, v in found.items()}
