"""Item vectors computed elsewhere (a text or image encoder), keyed by item id.

`features.vectors_path` names the file; the feature block "vectors" (data/features.py, for the
tokenizers) and the item head's side feature "vectors" (`model.side_features`) read it. Layouts:

- `.parquet`: an id column (`features.vectors_id_column`; default the first of movieId,
  item_id, itemId, item, id) and either one list-of-float column (the vector) or one numeric
  column per dimension (every other column);
- `.npz`: arrays `ids` [n] and `vectors` [n, d];
- `.npy`: one [n, 1 + d] float array whose first column holds the item ids.

Checked, each with one error naming the problem and the fix: the file and its layout, ids
appearing twice or not whole numbers, rows of another width than the others or than
`features.vectors_width` (when > 0), NaN or infinite values (the first such item named), and
catalogue items without a vector: an error by default (`features.vectors_missing="error"`), or
"mean" / "zero" filled with an extra "has no vector" column. Ids the catalogue lacks are
ignored (counted in a log line).
"""

from __future__ import annotations

from pathlib import Path

import ml_collections
import numpy as np
from absl import logging

from onerec_jax.data.sequences import SequenceData
from onerec_jax.errors import ConfigError, DataFormatError

ID_COLUMNS = ("movieId", "item_id", "itemId", "item", "id")
MISSING = ("error", "mean", "zero")


def read_vectors(path: str | Path, id_column: str = "") -> tuple[np.ndarray, np.ndarray]:
    """(ids [n], vectors [n, d] float64) of a vectors file, as stored (no alignment yet)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"features.vectors_path={path}: no such file. Point it at a .parquet, .npz or .npy "
            "file of item vectors keyed by item id (data/item_vectors.py)."
        )
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return _read_parquet(path, id_column)
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                if "ids" not in z or "vectors" not in z:
                    raise DataFormatError(
                        f"{path}: an .npz of item vectors needs arrays 'ids' [n] and 'vectors' "
                        f"[n, d]; it has {sorted(z.files)}."
                    )
                return np.asarray(z["ids"]), _matrix(z["vectors"], path)
        if suffix == ".npy":
            a = np.load(path, allow_pickle=False)
            if a.ndim != 2 or a.shape[1] < 2:
                raise DataFormatError(
                    f"{path}: a .npy of item vectors must be [n, 1 + d] (the item id, then the "
                    f"vector); it is {list(a.shape)}."
                )
            return a[:, 0], _matrix(a[:, 1:], path)
    except (ValueError, OSError) as e:
        raise DataFormatError(f"{path}: unreadable as {suffix} ({e}).") from e
    raise ConfigError(
        f"features.vectors_path={path}: unknown extension {suffix!r}; use .parquet, .npz or .npy."
    )


def _matrix(a, path: Path) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 2 or a.dtype.kind not in "fiu":
        raise DataFormatError(
            f"{path}: the vectors must be a 2-D numeric array [n, d]; got {a.dtype} "
            f"{list(a.shape)}."
        )
    return a.astype(np.float64)


def _read_parquet(path: Path, id_column: str) -> tuple[np.ndarray, np.ndarray]:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    names = table.column_names
    key = id_column or next((c for c in ID_COLUMNS if c in names), "")
    if key not in names:
        raise DataFormatError(
            f"{path}: no item id column ({id_column or ' / '.join(ID_COLUMNS)}) among {names}; "
            "name it with features.vectors_id_column."
        )
    ids = table[key].to_numpy()
    rest = [c for c in names if c != key]
    kind = table.schema.field(rest[0]).type if len(rest) == 1 else None
    if kind is not None and (
        pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)
    ):
        column = table[rest[0]].combine_chunks()
        widths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
        if column.null_count:
            bad = ids[np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0]]
            raise DataFormatError(f"{path}: item {bad} has no vector (null); give every row one.")
        if len(widths) and (widths != widths[0]).any():
            j = int(np.flatnonzero(widths != widths[0])[0])
            raise DataFormatError(
                f"{path}: item {ids[j]}'s vector has {widths[j]} values, item {ids[0]}'s "
                f"{widths[0]}: every vector must have the same width."
            )
        flat = column.flatten().to_numpy(zero_copy_only=False).astype(np.float64)
        return ids, flat.reshape(len(ids), int(widths[0]) if len(widths) else 0)
    kinds = {c: table.schema.field(c).type for c in rest}
    bad = [c for c, t in kinds.items() if not (pa.types.is_floating(t) or pa.types.is_integer(t))]
    if not rest or bad:
        raise DataFormatError(
            f"{path}: besides the id column {key!r}, give one list-of-float column or numeric "
            f"columns only; {bad or 'no other column'} {'is' if len(bad) == 1 else 'are'} not."
        )
    cols = [table[c].to_numpy(zero_copy_only=False).astype(np.float64) for c in rest]
    return ids, np.stack(cols, axis=1)


def _keys(ids: np.ndarray, catalogue_ids: np.ndarray, path: Path) -> np.ndarray:
    """`ids` in the catalogue's id type; whole numbers for integer catalogues."""
    if catalogue_ids.dtype.kind in "iu":
        if ids.dtype.kind == "f":
            whole = np.isfinite(ids) & (ids == np.round(ids))
            if not whole.all():
                raise DataFormatError(
                    f"{path}: item id {ids[~whole][0].item()!r} is not a whole number; the "
                    "catalogue's ids are integers."
                )
        elif ids.dtype.kind not in "iu":
            try:
                return ids.astype(np.int64)
            except ValueError as e:
                raise DataFormatError(f"{path}: item ids are not integers ({e}).") from e
        return ids.astype(np.int64)
    return ids.astype(str)


def aligned_vectors(
    cfg: ml_collections.ConfigDict, data: SequenceData
) -> tuple[np.ndarray, np.ndarray]:
    """(vectors [n_items, d] float64 in dense-id order (row i-1 = dense item i), has [n_items]
    bool) of `cfg.vectors_path` (the config's `features` section), checked as the module says."""
    path = Path(cfg.vectors_path).expanduser() if cfg.get("vectors_path", "") else None
    if path is None:
        raise ConfigError(
            "the 'vectors' item feature needs features.vectors_path: a .parquet, .npz or .npy "
            "file of your own item vectors keyed by item id (data/item_vectors.py)."
        )
    missing = cfg.get("vectors_missing", "error")
    if missing not in MISSING:
        raise ConfigError(f"features.vectors_missing={missing!r}: use one of {MISSING}.")
    ids, vectors = read_vectors(path, cfg.get("vectors_id_column", ""))
    if len(ids) != len(vectors):
        raise DataFormatError(f"{path}: {len(ids)} ids but {len(vectors)} vectors.")
    width = int(cfg.get("vectors_width", 0))
    if vectors.shape[1] == 0 or (width and vectors.shape[1] != width):
        raise DataFormatError(
            f"{path}: the vectors are {vectors.shape[1]} wide; features.vectors_width={width} "
            "expects another width (0 accepts any width >= 1)."
            if width
            else f"{path}: the vectors have no values."
        )
    catalogue = data.item_ids[1:]
    keys = _keys(np.asarray(ids), catalogue, path)
    unique, counts = np.unique(keys, return_counts=True)
    if (counts > 1).any():
        raise DataFormatError(
            f"{path}: item {unique[counts > 1][0]} has {counts[counts > 1][0]} vectors; give "
            "each item one row."
        )
    finite = np.isfinite(vectors).all(axis=1)
    if not finite.all():
        raise DataFormatError(
            f"{path}: item {keys[~finite][0]}'s vector holds NaN or infinite values "
            f"({int((~finite).sum())} rows do); fix or drop those rows."
        )
    order = np.argsort(keys, kind="stable")
    pos = np.searchsorted(keys[order], catalogue)
    pos = np.minimum(pos, len(keys) - 1)
    has = keys[order][pos] == catalogue if len(keys) else np.zeros(len(catalogue), bool)
    unused = len(keys) - int(has.sum())
    if unused:
        logging.info("%s: %d vectors of items outside the catalogue ignored.", path, unused)
    out = np.zeros((len(catalogue), vectors.shape[1]))
    out[has] = vectors[order][pos[has]]
    if not has.all():
        lacking = catalogue[~has]
        if missing == "error":
            raise DataFormatError(
                f"{path}: {len(lacking):,} of the catalogue's {len(catalogue):,} items have no "
                f"vector (e.g. {', '.join(str(x) for x in lacking[:5])}); add them, or set "
                "features.vectors_missing=mean or zero to fill them (with a 'has no vector' "
                "column)."
            )
        if missing == "mean" and has.any():
            out[~has] = out[has].mean(axis=0)
    return out, has


def vectors_block(cfg: ml_collections.ConfigDict, data: SequenceData) -> np.ndarray:
    """[n_items, d (+ 1)]: the aligned vectors, plus a "has no vector" column when some lack one
    (only possible with vectors_missing mean or zero)."""
    out, has = aligned_vectors(cfg, data)
    if has.all():
        return out
    return np.concatenate([out, (~has).astype(np.float64)[:, None]], axis=1)
