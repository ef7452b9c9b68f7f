"""Search benchmark: latency p50/p95 and recall@10 against exact search, on a synthetic corpus.

Builds a LanceDB table of --videos synthetic videos in the job's row schema (a temporary output root), builds the
same vector index the job builds (OutputStore.build_vector_index: IVF on `pooled`, cosine), then times held-out queries
through pipeline.readers.search:

    pooled exact    LanceDB brute-force scan              recall vs a numpy cosine oracle (a sanity check: 1.0)
    pooled ANN      LanceDB IVF index + refine            recall vs the same oracle
    MaxSim re-rank  ANN candidates re-scored by MaxSim    recall vs a numpy MaxSim oracle over every base
    MaxSim exact    LanceDB multivector scan              on --exact-maxsim-queries queries only (slow)

Synthetic videos have cluster structure like a real corpus (topics shared by many videos): a video picks one of
--clusters centres, its own direction is the centre plus noise, and its --base-k base vectors are that direction
plus more noise; the pooled vector is the size-weighted mean of the base, as Token Dynamics defines it.

    python jobs/bench/bench_search.py                       # 100k videos, dim 64 (about two minutes on 2 cores)
    python jobs/bench/bench_search.py --videos 2000 --queries 10

Exit status 1 when pooled ANN or MaxSim re-rank recall@10 is under --min-recall.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

import lancedb
import numpy as np
import pyarrow as pa

from pipeline.job.config import JobConfig
from pipeline.readers.search import SearchParams, VideoSearch
from pipeline.store.contract import OutputContract
from pipeline.store.schema import now_utc, video_schema
from pipeline.store.storage import TABLE_NAME, OutputStore

WRITE_BATCH_ROWS = 20_000


@dataclass
class Corpus:
    pooled: np.ndarray  # [n, D] float32
    bases: np.ndarray  # [n, K, D] float16, as the job stores them

    @property
    def size(self) -> int:
        return len(self.pooled)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def synthetic_corpus(rng: np.random.Generator, centres: np.ndarray, n: int, base_k: int,
                     topic_noise: float = 0.35, row_noise: float = 0.5) -> Corpus:
    """n videos around `centres` [C, D] (see the module notes)."""
    dim = centres.shape[1]
    cluster = rng.integers(0, len(centres), n)
    direction = _unit(centres[cluster] + topic_noise * _unit(rng.standard_normal((n, dim), dtype=np.float32)))
    bases = _unit(direction[:, None, :]
                  + row_noise * _unit(rng.standard_normal((n, base_k, dim), dtype=np.float32)))
    sizes = rng.dirichlet(np.ones(base_k), size=n).astype(np.float32)  # cluster sizes as fractions
    pooled = np.einsum("nk,nkd->nd", sizes, bases)
    return Corpus(pooled=pooled.astype(np.float32), bases=bases.astype(np.float16))


def _fixed_size_lists(values: np.ndarray, dim: int) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), dim)


def corpus_rows(corpus: Corpus, start: int, stop: int, schema: pa.Schema, encoder: str = "synthetic",
                first_id: int = 0) -> pa.Table:
    """Rows [start, stop) in the job's schema, numbered from first_id + start; columns search never reads are null."""
    n, base_k, dim = stop - start, corpus.bases.shape[1], corpus.bases.shape[2]
    ids = [f"synthetic-{i:07d}" for i in range(first_id + start, first_id + stop)]
    offsets = pa.array(np.arange(0, n * base_k + 1, base_k, dtype=np.int32))
    columns = {
        "video_id": pa.array(ids),
        "uri": pa.array([f"synthetic://{video_id}" for video_id in ids]),
        "encoder": pa.array([encoder] * n),
        "dim": pa.array(np.full(n, dim, dtype=np.int32)),
        "k": pa.array(np.full(n, base_k, dtype=np.int32)),
        "base": pa.ListArray.from_arrays(offsets, _fixed_size_lists(corpus.bases[start:stop], dim)),
        "pooled": _fixed_size_lists(corpus.pooled[start:stop], dim),
        "schema_version": pa.array(np.ones(n, dtype=np.int32)),
        "created_at": pa.array([now_utc()] * n, pa.timestamp("us", tz="UTC")),
    }
    arrays = [columns[f.name] if f.name in columns else pa.nulls(n, f.type) for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


def write_corpus_table(store: OutputStore, corpus: Corpus, encoder: str = "synthetic") -> None:
    """The LanceDB table of an output root (no Parquet copy: search reads only LanceDB) and its settings.json."""
    dim = corpus.bases.shape[2]
    store.write_settings(OutputContract(JobConfig(encoder=encoder, k=corpus.bases.shape[1]).output_settings(),
                                        encoder=encoder, layer=None, dim=dim).as_json("bench"))
    schema = video_schema(dim, base_dtype="float16")
    table = lancedb.connect(store.lancedb_uri).create_table(TABLE_NAME, schema=schema, mode="overwrite")
    for start in range(0, corpus.size, WRITE_BATCH_ROWS):
        table.add(corpus_rows(corpus, start, min(start + WRITE_BATCH_ROWS, corpus.size), schema, encoder))


# ---------------------------------------------------------------------------------------------------------------
# oracles


def cosine_top_k(corpus: Corpus, query: np.ndarray, k: int) -> np.ndarray:
    scores = _unit(corpus.pooled) @ _unit(query)
    return np.argsort(-scores)[:k]


class MaxSimOracle:
    """Brute-force MaxSim of a query base against every video's base."""

    def __init__(self, corpus: Corpus):
        n, base_k, dim = corpus.bases.shape
        self.rows = _unit(corpus.bases.astype(np.float32)).reshape(n * base_k, dim)
        self.base_k = base_k

    def top_k(self, query_base: np.ndarray, k: int) -> np.ndarray:
        sims = _unit(query_base.astype(np.float32)) @ self.rows.T  # [Q, n * K]
        scores = sims.reshape(len(query_base), -1, self.base_k).max(axis=2).sum(axis=0)
        return np.argsort(-scores)[:k]


# ---------------------------------------------------------------------------------------------------------------
# measuring


@dataclass
class Row:
    name: str
    latencies_ms: list[float]
    recall: float

    def as_dict(self) -> dict:
        p50, p95 = np.percentile(self.latencies_ms, [50, 95])
        return {"search": self.name, "queries": len(self.latencies_ms), "p50_ms": round(float(p50), 2),
                "p95_ms": round(float(p95), 2), "recall_at_k": round(self.recall, 4)}


def measure(name: str, search_fn, truths: list[np.ndarray], k: int) -> Row:
    """Run search_fn(i) -> hits for every query i; recall@k against truths[i] (row numbers)."""
    latencies, recalls = [], []
    for i, truth in enumerate(truths):
        started = time.perf_counter()
        hits = search_fn(i)
        latencies.append((time.perf_counter() - started) * 1000)
        found = {int(hit.video_id.rsplit("-", 1)[1]) for hit in hits}
        recalls.append(len(found & set(int(t) for t in truth)) / k)
    return Row(name, latencies, float(np.mean(recalls)))


def format_table(rows: list[Row], k: int) -> str:
    lines = [f"| search | queries | p50 ms | p95 ms | recall@{k} |", "|---|---:|---:|---:|---:|"]
    for row in rows:
        d = row.as_dict()
        lines.append(f"| {d['search']} | {d['queries']} | {d['p50_ms']:.1f} | {d['p95_ms']:.1f} "
                     f"| {d['recall_at_k']:.3f} |")
    return "\n".join(lines)


def run_benchmark(args: argparse.Namespace, root: str) -> tuple[list[Row], dict]:
    rng = np.random.default_rng(args.seed)
    clusters = args.clusters or max(1, args.videos // 100)
    centres = _unit(rng.standard_normal((clusters, args.dim), dtype=np.float32))
    info = {"videos": args.videos, "dim": args.dim, "base_k": args.base_k, "clusters": clusters}

    started = time.perf_counter()
    corpus = synthetic_corpus(rng, centres, args.videos, args.base_k)
    queries = synthetic_corpus(rng, centres, args.queries, args.base_k)  # held out: not in the table
    store = OutputStore(root)
    write_corpus_table(store, corpus)
    info["write_s"] = round(time.perf_counter() - started, 1)

    params = SearchParams(nprobes=args.nprobes, refine_factor=args.refine_factor or None,
                          candidates=args.candidates)
    search = VideoSearch(store, params)
    started = time.perf_counter()
    search.build_index(min_rows=1)
    info["index_s"] = round(time.perf_counter() - started, 1)
    info["index"] = search.table.list_indices()[0].index_type

    k = args.k
    cosine_truth = [cosine_top_k(corpus, q, k) for q in queries.pooled]
    oracle = MaxSimOracle(corpus)
    maxsim_truth = [oracle.top_k(b, k) for b in queries.bases]
    del oracle

    def query(i: int, mode: str):
        return search.by_vectors(queries.pooled[i], queries.bases[i].astype(np.float32), k, mode)

    rows = [
        measure("pooled exact (LanceDB flat scan)", lambda i: query(i, "exact"), cosine_truth, k),
        measure(f"pooled ANN ({info['index']}, nprobes={params.nprobes}, refine_factor={params.refine_factor})",
                lambda i: query(i, "ann"), cosine_truth, k),
        measure(f"MaxSim re-rank of {max(k, params.candidates)} ANN candidates",
                lambda i: query(i, "maxsim"), maxsim_truth, k),
    ]
    if args.exact_maxsim_queries:
        subset = maxsim_truth[: args.exact_maxsim_queries]
        rows.append(measure("MaxSim exact (LanceDB multivector scan)", lambda i: query(i, "maxsim-exact"),
                            subset, k))
    return rows, info


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = SearchParams()
    parser.add_argument("--videos", type=int, default=100_000, help="Synthetic videos in the table.")
    parser.add_argument("--dim", type=int, default=64, help="Vector size D.")
    parser.add_argument("--base-k", type=int, default=8, help="Base vectors per video.")
    parser.add_argument("--clusters", type=int, default=0, help="Topic clusters (0: one per 100 videos).")
    parser.add_argument("--queries", type=int, default=100, help="Held-out queries timed per search.")
    parser.add_argument("--exact-maxsim-queries", type=int, default=10,
                        help="Queries for the slow exact MaxSim scan (0 = skip it).")
    parser.add_argument("--k", type=int, default=10, help="Results per query; recall is recall@k.")
    parser.add_argument("--nprobes", type=int, default=defaults.nprobes, help="IVF partitions visited.")
    parser.add_argument("--refine-factor", type=int, default=defaults.refine_factor,
                        help="Exact re-scoring of refine-factor x k index candidates (0 = off).")
    parser.add_argument("--candidates", type=int, default=defaults.candidates,
                        help="ANN candidates re-ranked by MaxSim.")
    parser.add_argument("--min-recall", type=float, default=0.95, help="Exit 1 below this recall@k.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", help="Keep the table here instead of a temporary directory.")
    parser.add_argument("--json", action="store_true", help="Print the results as JSON instead of a table.")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    root = args.workdir or tempfile.mkdtemp(prefix="bench_search_")
    try:
        rows, info = run_benchmark(args, root)
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps({**info, "results": [row.as_dict() for row in rows]}, indent=2))
    else:
        print(", ".join(f"{key} {value}" for key, value in info.items()))
        print(format_table(rows, args.k))
    gated = rows[1:3]  # pooled ANN and MaxSim re-rank
    return 0 if all(row.recall >= args.min_recall for row in gated) else 1


if __name__ == "__main__":
    sys.exit(main())
