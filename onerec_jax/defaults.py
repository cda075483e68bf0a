"""The base configuration every `configs/<dataset>.py` starts from; each field says its unit."""

from __future__ import annotations

import json
import os
from pathlib import Path

import ml_collections

from onerec_jax.errors import ConfigError, UserError
from onerec_jax.models import optim, registry
from onerec_jax.parallel.sharding import DEFAULT_RULES


def base_config() -> ml_collections.ConfigDict:
    """Defaults shared by all dataset configs (PROTOCOL.md defaults)."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # global seed: data order, initialisation, sampling

    c.data = d = ml_collections.ConfigDict()
    d.release = ""  # a MovieLens release of data/download.py's registry, e.g. "ml-25m"
    d.synthetic = ""  # or a synthetic preset of data/synthetic.py: "demo" or "ml25m"; "uniform"
    d.synthetic_seed = 0  # seed of the synthetic generator (another seed = another dataset)
    # data.synthetic="uniform": ML-25M-like lengths over uniform items, in memory (scale tests)
    d.synthetic_users = 0
    d.synthetic_items = 0
    d.path = ""  # or a directory/file of your own (then set data.format); overrides the above
    d.format = "auto"  # auto, movielens_csv|_dat|_100k, recbole, user_sequence
    d.encoding = ""  # text encoding override ("" = the layout's default: utf8, latin-1 for .dat)
    d.root = os.environ.get("ONEREC_DATA", "data")  # downloads, synthetic data, cache/ live here
    d.cache_dir = ""  # sequence cache folder ("" = <root>/cache, "none" = no cache)
    d.progress = True  # show download progress bars
    d.on_bad_rows = "error"  # malformed rows: "error" (name the line) or "skip" (count them)
    d.min_rating = ml_collections.config_dict.placeholder(float)  # keep ratings >= this; None: all
    d.min_user_interactions = 5  # k-core threshold per user (>= 3 for leave-one-out)
    d.min_item_interactions = 0  # k-core threshold per item (0: no item filter, as ML-25M)
    d.max_len = 200  # the model sees at most this many most recent items
    # Cold start (data/cold_start.py): hold this fraction of the items out of training (the
    # newest by first appearance, or "random"), and make this fraction of the users new (only
    # their last new_user_items training interactions kept); 0: off. The evaluator then also
    # reports cold-target, warm-target and new-user metrics.
    d.update_paths = ()  # `--mode update`: folders of later interactions appended (source layout)
    d.cold_items = 0.0
    d.cold_items_by = "newest"
    d.new_users = 0.0
    d.new_user_items = 3
    d.window_stride = 0  # items between training windows of long sequences (0: max_len)
    # Training windows per user: "latest" (the last max_len + 1 training items: one example per
    # user an epoch, as the public SASRec+ code) or "all" (every window_stride-spaced window).
    # SASRec with "all": ml-latest-small validation NDCG@10 0.0748 +- 0.0033 against 0.0661 +-
    # 0.0026, but on ML-100K validation 0.1109 +- 0.0009 against 0.1104 +- 0.0015 and test
    # 0.0864 +- 0.0021 against 0.0968 +- 0.0076 (3 seeds each; BENCHMARKS.md "What each
    # difference did"): the gain did not carry to data not tuned on, so the reference's stays.
    d.windows = "latest"
    # Length buckets: each batch holds windows of one bucket, padded to its width (max_len for
    # the longest), which cuts padded positions ~40% at max_len 200 (BENCHMARKS.md). () = off.
    d.bucket_boundaries = (32, 64, 128)
    d.worker_count = 0  # Grain worker processes for the training pipeline (0: in-process)

    c.model = m = ml_collections.ConfigDict()
    m.name = "sasrec"  # a registered model (models/registry.py): pop, bpr, ncf, sasrec, tiger...
    m.dim = 64  # embedding and hidden width
    m.num_layers = 2  # Transformer blocks
    m.num_heads = 1  # attention heads (dim must divide by it)
    m.mlp_dim = 64  # feed-forward width (SASRec: dim; OneRec SwiGLU: about 2*dim)
    m.dropout = 0.1  # dropout on embeddings, attention weights and feed-forward
    m.prenorm = True  # SASRec with block "", BERT4Rec: pre-LN or post-LN (BERT, the paper)
    # SASRec as the public SASRec+ code (Klenitskiy & Vasilev 2023) builds it; each field is one
    # of the differences measured in BENCHMARKS.md "SASRec at the reference".
    m.block = "sasrec"  # SASRec: "sasrec" (norm the query only, residual from it) or "" (prenorm)
    m.init_std = 0.02  # SASRec, BERT4Rec: normal(std) embeddings and kernels (0: fan-in)
    m.norm_eps = 1e-8  # SASRec, BERT4Rec: LayerNorm epsilon
    m.attn_bias = True  # SASRec: biases on the attention projections
    # SASRec: query/key/value kernels, "torch" (the reference's MultiheadAttention:
    # Xavier-uniform over its packed [3 dim, dim] in-projection) or "fan_in" (normal, std
    # dim**-0.5; the default before 2026-12-07). Dev set, 3 seeds each, one period: validation
    # 0.0685 +- 0.0033 against 0.0652 +- 0.0031, test level (BENCHMARKS.md "qkv_init").
    m.qkv_init = "torch"
    m.position_origin = "start"  # SASRec: learned positions count from the first item or "end"
    m.embedding_norm = True  # BERT4Rec: LayerNorm(item + position) as BERT (False: sqrt(dim)*item)
    m.mlm_head = False  # BERT4Rec: BERT's dense + GELU + LayerNorm transform before the table
    m.positions = "rotary"  # OneRec: rotary, learned or none
    # OneRec: item side features (+ "semantic_ids", "vectors": features.vectors_path's vectors)
    m.side_features = ("genres", "year")
    m.semantic_ids = ""  # a `--mode tokenize` workdir (or its .npz): item codes as a feature
    m.fusion = "sum"  # OneRec: fuse side features by "sum" or "concat" (then a projection)
    m.aux_weight = 0.0  # OneRec: weight of the masked-input reconstruction loss (0: off)
    m.pop_content = False  # popularity: content-predicted popularity for untrained items
    # OneRec item head: rank items without a training interaction by their side features alone
    m.cold_content_only = False
    # SASRec / OneRec item head: a rating head beside the next-item head (layers.RatingHead),
    # trained on the targets' ratings: loss = next-item + rating_weight x squared error (0: off)
    m.rating_weight = 0.0
    m.aux_mask_prob = 0.2  # OneRec: share of input items masked for that loss
    m.negatives_per_pair = 4  # BPR, NCF: uniform negatives drawn per (user, item) training pair
    m.item_bias = True  # BPR: add a learned per-item bias to the user . item score
    m.l2 = 0.0  # BPR, NCF: weight of the L2 penalty on the embedding rows a training pair uses
    m.mlp_layers = (64, 32, 16)  # NCF: widths of the MLP tower's ReLU layers, first on the concat
    m.ncf_towers = "both"  # NCF: "both" (NeuMF), "gmf" or "mlp" (one tower alone: the ablation)
    m.ncf_loss = "bce"  # NCF: "bce" (the paper's pointwise loss) or "bpr" (pairwise, as BPR)
    m.mask_prob = 0.2  # BERT4Rec: share of real items masked for the cloze loss (>= 1 each)
    m.last_item_share = 0.1  # BERT4Rec: share of training sequences with only the last masked
    # Generative models (tiger, onerec_sid): encoder-decoder over semantic ids
    # (model.semantic_ids; empty: --mode train tokenizes into the run's workdir first).
    # OneRec: "items"; "semantic_ids" is how old runs named the onerec_sid model (read as it).
    m.head = "items"
    m.decoder_layers = 2  # decoder blocks (num_layers is the encoder's)
    # Causal generative encoders: the decoder trains on the last this many target positions of
    # each window (0: all); a dense head (loss.dense_weight) still trains on every position.
    m.decoder_slots = 0
    m.session_items = 1  # M: next items generated per example (1 = next-item recommendation)
    # Causal encoder: one pass over a training window trains a target at every slot (as SASRec),
    # ~max_len times cheaper per target than False: TIGER's bidirectional encoder, one example
    # (a full encoder pass) per target.
    m.encoder_causal = True
    m.num_experts = 0  # decoder feed-forward: 0 = dense, else a mixture of this many experts
    m.experts_per_token = 2  # top-k routing
    m.expert_capacity = 1.25  # per-expert capacity factor in training (<= 0: no token dropped)
    m.expert_group_size = 1024  # tokens routed together (capacity per group); inference: dropless
    m.moe_aux_weight = 0.01  # load-balancing loss weight (Switch Transformer)
    m.moe_z_weight = 1e-3  # router z-loss weight (ST-MoE)
    m.item_id_embedding = True  # OneRec semantic-id encoder: add an item-id embedding
    # Generative encoders: "learned" positions added to the inputs, or "rotary" (the item models')
    m.encoder_positions = "learned"
    # OneRec semantic-id encoder: its code embeddings (and the dense head's) a table of their own,
    # not the decoder's input tokens; and the dense head's item vectors with genres and year
    m.separate_item_codes = False
    m.table_side_features = False
    # Generative decoders: code logits = decoder state . the code's input-token embedding + bias
    # (the output table tied to the input one), not a head of their own
    m.tie_code_head = False
    m.user_tokens = 0  # TIGER: hashed user-id buckets prepended to the history (0: none)

    c.loss = lo = ml_collections.ConfigDict()
    lo.name = "full_softmax"  # full_softmax (chunked), sampled_softmax or bce (one negative)
    lo.chunk_size = 16384  # most items per chunk of the full softmax (one chunk: dense, faster)
    # full softmax: rows (positions) per rematerialised block, all-padding blocks skipped,
    # each block scanning the table in tiles of row_block_items items (losses.full_softmax_xent);
    # 0: every row at once. CPU-measured (BENCHMARKS.md): at ML-25M's 59,048 items 256 x 1,024
    # tiles cost 0.55x the time of [512, V] blocks, on the dev set 0.76x.
    lo.row_block = 256
    lo.row_block_items = 1024
    lo.label_smoothing = 0.0  # full softmax and generative models
    # Generative models: weight of a jointly trained dense item head (next-item softmax over
    # the encoder's slot states; 0: none), which eval.rerank_weight uses to re-rank the beam
    lo.dense_weight = 0.0
    # Generative models: weight of the decoder's code cross-entropy (0 with a dense head: the
    # encoder trained by the dense head alone, a study of what the decoder's loss costs it)
    lo.decoder_weight = 1.0
    # Generative models: the share of the decoder's gradient that reaches the encoder through its
    # memory and slot states (1: all; 0 with a dense head: the dense head alone shapes the
    # encoder, and the decoder learns to read it; the shared code embeddings still learn from
    # both unless model.separate_item_codes)
    lo.decoder_encoder_grad = 1.0
    # Generative models: each level's softmax over the codes that continue the prefix to some item
    # (as constrained beam search decodes); False: over the level's whole codebook.
    lo.valid_codes_only = True
    # Generative, with valid_codes_only: the codes of items without a training interaction (cold
    # items) are negatives of that softmax (True), or left out of it (False), so training never
    # pushes down the codes a cold item will be generated with.
    lo.untrained_negatives = True
    lo.n_negatives = 256  # sampled softmax: shared sampled negatives per step
    lo.sampler = "uniform"  # sampled softmax: "uniform" or "popularity" (training counts)
    lo.in_batch = True  # sampled softmax: other positions' targets are negatives too
    lo.in_batch_negatives = 1024  # ... drawn from this many random valid positions (0: all)
    lo.logq = True  # sampled softmax: subtract log Q (sampling-bias correction)
    lo.hard_negatives = 0  # sampled softmax: top-scoring non-targets mixed in per position
    lo.hard_pool_size = 2048  # uniformly drawn candidates the hard negatives are picked from

    c.optim = optim.default_config()  # AdamW and its schedule (models/optim.py)

    c.train = t = ml_collections.ConfigDict()
    t.batch_size = 128  # global batch size (sequences per step, over all processes)
    t.num_epochs = 400  # upper bound on epochs (early stopping usually ends sooner)
    t.num_steps = 0  # if > 0: stop after this many steps instead of num_epochs
    t.eval_every_steps = 0  # validate every this many steps (0: once per epoch)
    # Early stopping: validations without a better val NDCG@10. On MovieLens-sized data models
    # sit near popularity for 10-20 epochs of 5-10 steps before they learn (PROTOCOL.md), so a
    # short patience stops at popularity quality; large-catalogue configs count fewer.
    t.patience = 20
    t.min_epochs = 0  # early stopping never stops a run before this many epochs
    # Until a validation beats popularity's validation NDCG@10 (computed once when the run
    # starts), early stopping waits this many validations without improvement instead of
    # `patience`: some seeds sit at popularity for 30+ epochs before they learn, and `patience`
    # stopped them there (GRU4Rec, dev set, seed 1: 0.019 at step 65, stopped at step 165).
    # 0 = off (plain `patience` throughout; no popularity validation is computed).
    t.patience_below_popularity = 100
    t.log_every_steps = 50  # metrics.jsonl / TensorBoard / progress bar updates
    t.compute_dtype = "float32"  # activations: float32 or bfloat16 (params stay float32)
    # the encoder's training pass over this many sequences at a time (forward and backward),
    # so a Transformer's [rows, heads, L, L] attention stays in cache; each block draws its own
    # dropout masks. 0 = auto: 4 on one CPU device, the whole batch elsewhere
    t.encoder_rows = 0
    t.progress = True  # tqdm progress bar
    c.eval = e = ml_collections.ConfigDict()
    e.batch_size = 256  # users per evaluation batch (global)
    e.mask_history = True  # mask every item of the user's prefix before ranking (PROTOCOL.md)
    e.k = 50  # length of the top-K lists kept (metrics use K in 1, 5, 10, 20, 50)
    # Block sizes inside an evaluation batch (exact: users are independent), so each step's
    # arrays stay in cache; 0 = auto (evaluation/ranking.py `cpu_block_sizes`): on one CPU
    # device 8 users per encoder pass and 64 users x 2,048 items per ranking step, elsewhere
    # whole batches and 8,192-item chunks.
    e.chunk_size = 0  # items scored at a time
    e.state_rows = 0  # users per encoder pass (a Transformer's [rows, heads, L, L] attention)
    e.rank_rows = 0  # users ranked at a time
    # generative models: beam width of the constrained beam search; 0: eval.k, the width that
    # fills every top-k list (a narrower beam can return fewer than eval.k items)
    e.beam = 0
    e.rerank_weight = 0.0  # generative: beam items by code log-prob + this x dense log-prob
    # generative, with rerank_weight: the dense head's best unseen items the beam missed join
    # the re-ranked candidates, each scored by its codes' log-probability (0: the beam's alone)
    e.dense_candidates = 0
    # generative: at most this share of each top-K list (TIGER's epsilon) goes to items without
    # a training interaction (cold items), each scored by the log-probability of its content
    # codes; they compete with the beam's items by score. 0: beam search alone (cold items
    # only where the beam reaches them).
    e.cold_share = 0.0
    # generative, with cold_share: added to each cold item's log-probability before the merge
    # (a decoder trained on warm items scores cold codes far below warm ones; chosen on validation)
    e.cold_bonus = 0.0
    # how targets are ranked (evaluation/evaluator.py EVALUATORS): "" the model's own
    # (full_ranking for scoring models, topk_list for generative ones), or "topk_list" to
    # rank any model's targets within its top-k list
    e.evaluator = ""
    # the ranking that validates during training (early stopping, the checkpoint kept), if not
    # eval.evaluator's: e.g. "full_ranking" for a generative model with a dense head, its dense
    # ranking of the catalogue, a fraction of a beam search's cost. The kept checkpoint is then
    # validated and tested once by eval.evaluator. "": eval.evaluator throughout.
    e.select_evaluator = ""
    e.valid_users = 0  # validate on this many users (a fixed random sample; 0: all); test: all
    # with a rating head: rank by next-item logit + rating_alpha x predicted rating (0: logit)
    e.rating_alpha = 0.0

    c.features = f = ml_collections.ConfigDict()
    # Item feature matrix for the tokenizers (data/features.py): blocks, each standardised and
    # scaled by its weight, concatenated.
    # genres|year|title|tags|genome|collab|interactions
    f.blocks = ("genres", "year", "title", "tags")
    # A block the dataset lacks (ML-100K/1M: no tags): "skip" it with a warning (no block left:
    # the "interactions" block), or "error".
    f.missing = "skip"
    f.weights = ml_collections.ConfigDict(
        dict(
            genres=1.0,
            year=1.0,
            title=1.0,
            tags=1.0,
            genome=1.0,
            collab=1.0,
            interactions=1.0,
            vectors=1.0,
        )
    )  # per-block multiplier after standardisation (block norms are otherwise comparable)
    f.year_bucket_years = 5  # width of a release-year bucket (years), one-hot encoded
    f.title_dim = 32  # truncated-SVD components of the title TF-IDF
    f.tags_dim = 32  # truncated-SVD components of the aggregated user-tag TF-IDF
    f.genome_dim = 64  # principal components kept of the genome block (0: all 1,128 columns)
    f.genome_missing = "mean"  # items without a genome vector: "mean" or "zero" (+ a flag column)
    f.collab_workdir = ""  # collab block: a trained run whose best checkpoint's item table is read
    f.interactions_dim = 64  # truncated-SVD components of the items' training-user TF-IDF
    # Items without a training interaction (cold items) have no 'interactions' row of their own:
    # these content blocks predict one for them (ridge regression fitted on the items that have
    # training users), so their codes sit among the warm items of similar content. () : they all
    # share one row. The generative variants set it to the dataset's content blocks.
    f.cold_blocks = ()
    f.cold_ridge = 1.0  # the ridge regression's L2 penalty (on standardised content)
    # "vectors" block and item-head side feature: your own item vectors (data/item_vectors.py)
    f.vectors_path = ""  # .parquet (id column + list or numeric columns), .npz (ids, vectors), .npy
    f.vectors_id_column = ""  # Parquet id column ("": movieId, item_id, itemId, item or id)
    f.vectors_width = 0  # expected width (0: any)
    f.vectors_missing = "error"  # catalogue items without a vector: "error", "mean" or "zero"

    c.tokenize = tk = ml_collections.ConfigDict()
    # Semantic ids (tokenize/): items -> `levels` codes of `codebook_size` + a collision token.
    tk.method = "rqvae"  # rqvae, rqkmeans, or random (a control: uniform random codes)
    tk.levels = 3  # residual quantisation levels L (codes per item before the collision token)
    tk.codebook_size = 256  # codes per level K
    tk.latent_dim = 32  # RQ-VAE latent width
    tk.hidden_dims = (512, 256, 128)  # RQ-VAE encoder MLP widths (decoder mirrors them)
    tk.beta = 0.25  # RQ-VAE commitment weight
    tk.gradient = "ste"  # RQ-VAE gradient through quantisation: "ste" or "rotation" (trick)
    tk.dead_code_steps = 200  # RQ-VAE: restart codes unused for this many steps (0: never)
    tk.steps = 3000  # RQ-VAE training steps
    tk.batch_size = 1024  # RQ-VAE items per step
    tk.learning_rate = 1e-3  # RQ-VAE peak learning rate (AdamW via models/optim.py)
    tk.kmeans_iters = 50  # Lloyd iterations per level (RQ-KMeans; RQ-VAE codebook init)
    tk.balanced = False  # RQ-KMeans: equal-size clusters per level
    # Items that share all L codes get distinct last-level codes, the nearest free ones within
    # their prefix (tokenize/collisions.py); the collision token separates what remains.
    tk.spread_last_level = True
    tk.seed = 0  # tokenizer seed

    c.align = a = ml_collections.ConfigDict()
    # `--mode align` (align.py): DPO on the policy's own candidates, rewarded by a reward model
    # (`--mode reward`, models/reward.py) or a rating head
    a.beta = 0.1  # DPO temperature
    a.candidates = 20  # top items of the policy per user, from which chosen / rejected are picked
    a.iterations = 2  # rounds of (candidates, rewards, pairs, training)
    a.steps = 0  # optimizer steps per iteration (0: one pass over the users with a pair)
    a.batch_size = 128  # pairs per step (and the next-item batch is train.batch_size windows)
    a.learning_rate = 1e-4
    a.next_item_weight = 1.0  # the next-item loss mixed into every step (0: DPO alone)

    c.reward = r = ml_collections.ConfigDict()
    # `--mode reward` (models/reward.py): biased matrix factorisation of the training ratings,
    # the reward model of `--mode align`. Tuned on the dev set's validation RMSE.
    r.dim = 32  # user and item factors (0: mu + user bias + item bias alone)
    r.l2 = 0.1  # weight of the squared norm of the parameters each rating uses
    r.learning_rate = 0.01  # Adam
    r.batch_size = 4096  # ratings per step
    r.epochs = 100  # at most; the epoch of the best validation RMSE is kept
    r.patience = 5  # epochs without a better validation RMSE before stopping
    r.init_std = 0.01  # normal(std) initial factors

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (-1, 1, 1)  # devices over (data, fsdp, model); one -1 is filled in
    c.mesh.num_devices = 0  # use the first N devices (0: all of them)
    c.mesh.rules = DEFAULT_RULES  # logical axis -> mesh axes (parallel/sharding.py)
    return c


# The OneRec item head's component study (`:onerec_<name>`): each changes one thing.
ONEREC_ABLATIONS = {
    "nopos": {"model.positions": "none"},  # no positional information at all
    "noside": {"model.side_features": ()},  # item ids only: no genre / year embeddings
    "aux": {"model.aux_weight": 0.5},  # with the masked-input reconstruction loss
    "1layer": {"model.num_layers": 1},
    "4layers": {"model.num_layers": 4},
    "len50": {"data.max_len": 50},
    "len200": {"data.max_len": 200},
}


# Generative-retrieval studies (`:onerec_sid_<name>`, `:tiger_<name>`): one change each.
GENERATIVE_ABLATIONS = {
    "rqkmeans": {"tokenize.method": "rqkmeans"},  # residual k-means ids instead of RQ-VAE
    "random": {"tokenize.method": "random"},  # random codes: a control without semantics
    "collab": {"features.blocks": ("collab",)},  # needs features.collab_workdir (a SASRec run)
    "mixed": {"features.blocks": ("genres", "year", "title", "tags", "collab")},
    # The generative default's codes come from each item's training users (the 'interactions'
    # block), cold items' rows predicted from content. These two are what it replaced / refined:
    # codes from item content alone (the default before 2026-12-07; tags skipped where absent)
    "content": {"features.blocks": ("genres", "year", "title", "tags")},
    # the training users alone: cold items share one row (collision handling alone separates them)
    "interactions": {"features.blocks": ("interactions",), "features.cold_blocks": ()},
    "k32": {"tokenize.codebook_size": 32},
    "k64": {"tokenize.codebook_size": 64},
    "nomoe": {"model.num_experts": 0},  # dense decoder feed-forward
    "moe8": {"model.num_experts": 8},
    "beam10": {"eval.beam": 10},
    "beam50": {"eval.beam": 50},
    "session3": {"model.session_items": 3},  # session-wise: the next 3 items
    "bidir": {"model.encoder_causal": False},  # the papers' bidirectional encoder (costly)
    "allcodes": {"loss.valid_codes_only": False},
    # the decoder's code head tied to its input-token embeddings (model.tie_code_head)
    "tied": {"model.tie_code_head": True},  # softmax over the level's whole codebook
    # a dense item head on the encoder, trained jointly, re-ranks the beam's items (the
    # :onerec_sid default; a study of :tiger)
    "dense": {"loss.dense_weight": 1.0, "eval.rerank_weight": 1.0},
    # the item models' 200 items in the encoder, the decoder trained at the last 50 positions of
    # each window and a dense head at all 200 (:onerec_sid, 3 seeds on the dev set: validation
    # 0.0604 +- 0.0069 against 0.0535 +- 0.0050, test level: not separated, not the default)
    "len200": {
        "data.max_len": 200,
        "data.bucket_boundaries": (32, 64, 128),
        "model.decoder_slots": 50,
    },
    # the item head's data: every 200-item window (the decoder at the last 50 positions of each,
    # the dense head at all), validated during training by the dense head's full ranking and
    # tested by the re-ranked beam (:onerec_sid seed 0 on the dev set: the dense head's best
    # checkpoint came before the decoder's, and the re-ranked beam validated at 0.0480 and
    # tested at 0.0350, below the default; BENCHMARKS.md)
    "all200": {
        "data.max_len": 200,
        "data.bucket_boundaries": (32, 64, 128),
        "data.windows": "all",
        "model.decoder_slots": 50,
        "eval.select_evaluator": "full_ranking",
    },
    # the plain decoder: the beam's list by code log-probability alone, no dense head
    "nodense": {"loss.dense_weight": 0.0, "eval.rerank_weight": 0.0, "eval.dense_candidates": 0},
}


def _set(c: ml_collections.ConfigDict, changes: dict) -> None:
    for key, value in changes.items():
        section, field = key.split(".")
        c[section][field] = value


def _generative_variants() -> list[str]:
    """The variants of generative models: each has the studies of GENERATIVE_ABLATIONS."""
    return [
        v for v in registry.variant_names() if registry.variant(v)[0].kind == registry.GENERATIVE
    ]


def apply_variant(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
    """`configs/<dataset>.py:<variant>`: a model's own variant (declared in its file,
    models/registry.py; default sasrec) or a study of one: `onerec_<ablation>`,
    `<generative model>_<study>`."""
    arg = arg or "sasrec"
    for base in _generative_variants():
        study = arg[len(base) + 1 :] if arg.startswith(base + "_") else None
        if study in GENERATIVE_ABLATIONS:
            apply_variant(c, base)
            _set(c, GENERATIVE_ABLATIONS[study])
            return c
    if arg.startswith("onerec_") and arg[len("onerec_") :] in ONEREC_ABLATIONS:
        apply_variant(c, "onerec")
        _set(c, ONEREC_ABLATIONS[arg[len("onerec_") :]])
        return c
    found = registry.variant(arg)
    if found is None:
        studies = [f"{v}_<...>" for v in _generative_variants()]
        studies[0] = studies[0].replace("...", "|".join(GENERATIVE_ABLATIONS))
        raise ConfigError(
            f"unknown config variant {arg!r}: use {', '.join(registry.variant_names())}, an "
            f"ablation onerec_<{'|'.join(ONEREC_ABLATIONS)}> or a generative study "
            f"{' / '.join(studies)}"
        )
    spec, set_defaults = found
    c.model.name = spec.name
    set_defaults(c)
    return c


def large_catalogue(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
    """ML-20M/25M/32M (~59k items, ~160k users, 25M ratings): the OneRec item head by default.

    `arg` None or "onerec": the item head at the seed's ML-25M scale, for one accelerator (GPU or
    TPU): dim 256, 4 blocks of 8 heads, SwiGLU 512, max_len 200, batch 512, the full softmax over
    every item (one chunk), bfloat16 activations, 2,000 warmup steps then cosine decay to 0.1x.
    "cpu": the item head sized for a CPU (dim 64, 2 blocks, 2 heads, batch 128, float32, sampled
    softmax with 256 shared negatives). Any other variant (e.g. "sasrec") keeps its own model
    size with the accelerator's data and optimiser settings. Validation reads a fixed sample of
    10,000 users after every epoch (test reads all), and patience counts those validations.
    """
    cpu = arg == "cpu"
    c = apply_variant(c, "onerec" if arg in (None, "", "cpu") else arg)
    c.data.max_len = 200
    c.data.windows = "all"  # heavy users' early history is most of the data at this scale
    c.train.num_epochs = 30
    c.train.patience = 3
    c.eval.valid_users = 10_000
    c.optim.schedule, c.optim.end_lr_ratio = "cosine", 0.1
    if cpu:  # BENCHMARKS.md "MovieLens-25M at full size": ~29 min an epoch on 2 cores
        c.train.batch_size, c.optim.warmup_steps = 128, 500
        c.loss.name, c.loss.n_negatives = "sampled_softmax", 256
        return c
    c.train.batch_size, c.optim.warmup_steps = 512, 2000
    c.train.compute_dtype = "bfloat16"
    c.loss.chunk_size = 65_536  # the whole catalogue in one chunk: fastest on an accelerator
    c.loss.row_block = 0  # every row at once: row blocks were measured on a CPU only
    if arg in (None, "", "onerec"):
        m = c.model
        m.dim, m.num_layers, m.num_heads, m.mlp_dim = 256, 4, 8, 512
    return c


def load_run_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The resolved config a run saved in `workdir/config.json`, with keys added since then
    filled from `base_config()` (their defaults keep the old behaviour) and a model named as it
    was then given its name now (models/registry.py `model_name`)."""
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise UserError(f"{workdir}: no such directory. Pass the --workdir of a trained run.")
    path = workdir / "config.json"
    if not path.is_file():
        raise UserError(
            f"{path}: not found. Pass the --workdir of a run trained with --mode train."
        )
    try:
        saved = json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f"{path}: unreadable ({e}); retrain that run.") from e
    config = ml_collections.ConfigDict(_with_defaults(saved, base_config().to_dict()))
    config.model.name = registry.model_name(config.model)
    return config


def _with_defaults(saved: dict, defaults: dict) -> dict:
    out = dict(saved)
    for key, value in defaults.items():
        if key not in out:
            out[key] = value
        elif isinstance(value, dict) and isinstance(out[key], dict):
            out[key] = _with_defaults(out[key], value)
    return out


def needs_semantic_ids(config: ml_collections.ConfigDict) -> bool:
    """Whether the model reads semantic ids (its spec says: generative models always, the OneRec
    item head when they are one of its side features)."""
    return registry.model_spec(config).needs_semantic_ids(config)
