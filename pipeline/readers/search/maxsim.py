"""MaxSim (ColBERT's late interaction) of a query base against token bases stored back to back: pure numpy.

MaxSim(Q, C) = sum over query rows q of max over candidate rows c of cos(q, c), in [-Kq, Kq]; with a one-row query
(text) it is the best cosine between the query and any base vector.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def _normalise_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def maxsim_scores(query_base: np.ndarray, rows: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """MaxSim of one query against many bases stored back to back.

    query_base [Q, D]; rows [sum(lengths), D] (candidate i owns the next lengths[i] rows); -> scores [len(lengths)].
    Candidates with no rows score -inf.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    scores = np.full(len(lengths), -np.inf, dtype=np.float32)
    present = lengths > 0
    if not present.any():
        return scores
    sims = _normalise_rows(query_base) @ _normalise_rows(rows).T  # [Q, total rows]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])[present]
    scores[present] = np.maximum.reduceat(sims, starts, axis=1).sum(axis=0)
    return scores


def bases_as_rows(column: pa.ChunkedArray | pa.Array, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """The `base` column (list<fixed_size_list<float>[dim]>) -> (rows [sum K, dim] float32, K per video)."""
    lists = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    lengths = pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False)
    values = lists.flatten().flatten().to_numpy(zero_copy_only=False)
    return values.astype(np.float32, copy=False).reshape(-1, dim), lengths
