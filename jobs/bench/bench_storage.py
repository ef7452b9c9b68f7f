"""Output-store benchmark: how commit, resume start-up, search and fragment count change with the table's size.

For each --sizes N, an output root is filled with N synthetic videos (dim --dim) through the job's own write path
(OutputStore.write_videos: Parquet file, then LanceDB merge_insert) and closed as a finished run would be (vector
index, finish_run). Then, as the next run would:

    resume start-up   a new OutputStore after a clean run: reconcile() + done_ids() of a listing of --listing ids
                      (half of them held, at random)
    commit            --commits files of --rows-per-file new rows each, one write_videos per file (p50 and mean;
                      the mean includes the compactions that commits trigger)
    index refresh     build_vector_index() after those commits (new rows join the trained index)
    search            pooled ANN through pipeline.readers.search (the job's IVF index): p50 / p95 latency of --queries
                      held-out queries, recall@10 against an exact numpy cosine scan of every row
    fragments         LanceDB fragments after the commits: those awaiting compaction (what a scan or an id lookup
                      pays for per row), all of them, and the mean rows per fragment

Synthetic rows come from jobs/bench/bench_search.py (topic-clustered pooled vectors, --base-k base vectors each; columns
neither path reads are null). Sizes are filled first, then measured round by round (each round times every size
once, so load from other processes hits all sizes alike) and printed side by side with the ratio of the largest to
the smallest. With --workdir and --reuse-fills, a fill made by an earlier run is measured again (on a hard-linked
copy) instead of being made again.

    python jobs/bench/bench_storage.py                             # 10k, 100k and 1M rows, dim 256
    python jobs/bench/bench_storage.py --sizes 10000 40000 --commits 12 --queries 20
    python jobs/bench/bench_storage.py --workdir /data/bench --reuse-fills   # fill once, measure many times

Exit status 1 when a figure at the largest size exceeds --max-ratio times its value at the smallest
(--max-search-ratio for search latency).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench_search import _unit, corpus_rows, synthetic_corpus
from pipeline.readers.search import SearchParams, VideoSearch
from pipeline.store.schema import video_schema
from pipeline.store.storage import OutputStore, _unindexed_fragments

FILL_COMPLETE = "_bench_fill_complete"  # written once a fill has finished: only then is it reused
FILL_ROWS_PER_FILE = 20_000  # the fill writes bigger files than a job would, to be quick; commits use real sizes


def synthetic_batches(rng, centres, first_id: int, n: int, base_k: int, schema, pooled_out: list):
    """Tables of synthetic rows numbered first_id.. in files of FILL_ROWS_PER_FILE; pooled vectors kept."""
    for start in range(0, n, FILL_ROWS_PER_FILE):
        size = min(FILL_ROWS_PER_FILE, n - start)
        corpus = synthetic_corpus(rng, centres, size, base_k)
        pooled_out.append(corpus.pooled)
        yield corpus_rows(corpus, 0, size, schema, first_id=first_id + start)


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


@dataclass
class Output:
    """One filled output root and what the measurements need to know about it."""

    size: int
    root: str
    rng: np.random.Generator
    centres: np.ndarray
    pooled: list[np.ndarray] = field(default_factory=list)  # every row's pooled vector, in id order
    store: OutputStore | None = None  # the resumed run's store
    figures: dict = field(default_factory=dict)

    def new_rows(self, args: argparse.Namespace, schema):
        first_id = sum(len(p) for p in self.pooled)
        (table,) = synthetic_batches(self.rng, self.centres, first_id, args.rows_per_file, args.base_k, schema,
                                     self.pooled)
        return table


def fill(args: argparse.Namespace, size: int, root: str, schema, write: bool = True) -> Output:
    """An output holding `size` rows, closed as a finished run leaves it (vector index built, finish_run).

    write=False: the rows are already there (a kept fill); only the pooled vectors and the generator's state are
    made again, and the output is closed once more in case the store's code now keeps more than the fill did.
    """
    rng = np.random.default_rng(args.seed)
    output = Output(size, root, rng, _unit(rng.standard_normal((max(1, size // 100), args.dim), dtype=np.float32)))
    started = time.perf_counter()
    store = OutputStore(root)
    store.reconcile()
    for table in synthetic_batches(rng, output.centres, 0, size, args.base_k, schema, output.pooled):
        if write:
            store.write_videos(table)
    store.build_vector_index()
    store.finish_run()
    output.figures.update(rows=size, fill_s=round(time.perf_counter() - started, 1))
    return output


def measure(args: argparse.Namespace, outputs: list[Output], schema) -> None:
    """Time every output round by round, so that load from other processes hits every size alike."""
    startups = {id(o): [] for o in outputs}
    for _ in range(args.repeats):
        for output in outputs:
            held = [f"synthetic-{i:07d}" for i in output.rng.choice(output.size, args.listing // 2, replace=False)]
            listing = held + [f"synthetic-{output.size + i:07d}" for i in range(args.listing - len(held))]
            output.store = OutputStore(output.root)
            found: set[str] = set()
            startups[id(output)].append(timed(
                lambda: (output.store.reconcile(), found.update(output.store.done_ids(listing)))))
            assert found == set(held), "the resume listing disagrees with what was written"
            output.store.finish_run()  # each timed start-up follows a run that ended cleanly

    commits = {id(o): [] for o in outputs}
    for _ in range(args.commits):
        for output in outputs:
            table = output.new_rows(args, schema)
            commits[id(output)].append(timed(lambda: output.store.write_videos(table)))

    for output in outputs:
        dataset = output.store.lance_table().to_lance()
        fragments = len(dataset.get_fragments())
        awaiting = len(_unindexed_fragments(dataset))
        index_s = timed(output.store.build_vector_index)
        output.store.finish_run()
        output.figures.update(
            commit_p50_ms=1000 * float(np.median(commits[id(output)])),
            commit_mean_ms=1000 * float(np.mean(commits[id(output)])),
            startup_ms=1000 * float(np.median(startups[id(output)])), index_refresh_s=index_s,
            fragments=fragments, fragments_awaiting=awaiting,
            rows_per_fragment=dataset.count_rows() / fragments)

    searches = [(o, VideoSearch(o.store, SearchParams()), _unit(np.concatenate(o.pooled))) for o in outputs]
    latencies, recalls = {id(o): [] for o in outputs}, {id(o): [] for o in outputs}
    for _ in range(args.queries):
        for output, search, everything in searches:
            query = synthetic_corpus(output.rng, output.centres, 1, args.base_k).pooled[0]  # held out
            truth = set(np.argsort(-(everything @ _unit(query)))[: args.k].tolist())
            started = time.perf_counter()
            hits = search.by_vectors(query, k=args.k, mode="ann")
            latencies[id(output)].append(time.perf_counter() - started)
            recalls[id(output)].append(len({int(h.video_id.rsplit("-", 1)[1]) for h in hits} & truth) / args.k)
    for output in outputs:
        p50, p95 = np.percentile(latencies[id(output)], [50, 95])
        output.figures.update(search_p50_ms=1000 * float(p50), search_p95_ms=1000 * float(p95),
                              recall_at_10=float(np.mean(recalls[id(output)])))


FIGURES = [  # (key, label, format, ratio limit attribute or None)
    ("commit_p50_ms", "commit of a {rows_per_file}-row file, p50 (ms)", "{:.0f}", "max_ratio"),
    ("commit_mean_ms", "commit, mean incl. compaction (ms)", "{:.0f}", "max_ratio"),
    ("startup_ms", "resume start-up, {listing} listed (ms)", "{:.0f}", "max_ratio"),
    ("index_refresh_s", "vector index refresh after the commits (s)", "{:.2f}", None),
    ("search_p50_ms", "pooled ANN search p50 (ms)", "{:.1f}", "max_search_ratio"),
    ("search_p95_ms", "pooled ANN search p95 (ms)", "{:.1f}", "max_search_ratio"),
    ("recall_at_10", "recall@10", "{:.3f}", None),
    ("fragments_awaiting", "LanceDB fragments awaiting compaction", "{:d}", "max_ratio"),
    ("fragments", "LanceDB fragments, all", "{:d}", None),
    ("rows_per_fragment", "rows per fragment, mean", "{:,.0f}", None),
    ("fill_s", "fill (not a goal; s; when it was filled)", "{:.0f}", None),
]


def format_table(results: list[dict], args: argparse.Namespace) -> str:
    header = ["measure", *(f"{r['rows']:,} rows" for r in results), "largest / smallest"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for key, label, fmt, _ in FIGURES:
        first, last = results[0][key], results[-1][key]
        ratio = f"{last / first:.2f}×" if first else "–"
        cells = [fmt.format(r[key]) for r in results]
        lines.append(f"| {label.format(**vars(args))} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines)


def over_limit(results: list[dict], args: argparse.Namespace) -> list[str]:
    failed = []
    for key, _, _, limit in FIGURES:
        first, last = results[0][key], results[-1][key]
        if limit and first and last / first > getattr(args, limit):
            failed.append(f"{key}: {last / first:.2f}× > {getattr(args, limit)}×")
    return failed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000],
                        help="Table sizes (rows) to measure, smallest first.")
    parser.add_argument("--dim", type=int, default=256, help="Vector size D.")
    parser.add_argument("--base-k", type=int, default=4, help="Base vectors per video.")
    parser.add_argument("--rows-per-file", type=int, default=1024, help="Rows per measured commit.")
    parser.add_argument("--commits", type=int, default=40, help="Measured commits per size.")
    parser.add_argument("--listing", type=int, default=1024, help="Ids listed by the resumed run (half held).")
    parser.add_argument("--repeats", type=int, default=5, help="Resume start-ups timed per size (median kept).")
    parser.add_argument("--queries", type=int, default=100, help="Held-out search queries per size.")
    parser.add_argument("--k", type=int, default=10, help="Results per query; recall is recall@k.")
    parser.add_argument("--max-ratio", type=float, default=1.5, help="Goal: largest / smallest for each figure.")
    parser.add_argument("--max-search-ratio", type=float, default=2.0, help="Goal for search latency.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", help="Keep the output roots here instead of a temporary directory.")
    parser.add_argument("--reuse-fills", action="store_true",
                        help="With --workdir: measure copies of the outputs a previous run filled there (same "
                             "--sizes, --dim, --base-k, --seed) instead of filling them again. Refill (leave this "
                             "out) after changing how the store lays out its files.")
    parser.add_argument("--json", action="store_true", help="Print the results as JSON instead of a table.")
    return parser


def run_benchmark(args: argparse.Namespace, workdir: Path) -> list[dict]:
    schema = video_schema(args.dim, base_dtype="float16")
    outputs = []
    for size in sorted(args.sizes):
        filled = workdir / f"filled-{size}-d{args.dim}-k{args.base_k}-s{args.seed}"
        root = workdir / f"rows-{size}"
        shutil.rmtree(root, ignore_errors=True)
        reuse = args.reuse_fills and (filled / FILL_COMPLETE).exists()
        if not reuse:
            shutil.rmtree(filled, ignore_errors=True)
            fill_s = fill(args, size, str(filled), schema).figures["fill_s"]
            (filled / FILL_COMPLETE).write_text(str(fill_s))
        # Measured on a copy, so that the fill can be measured again. Hard links: nothing rewrites a file in place.
        shutil.copytree(filled, root, copy_function=os.link)
        outputs.append(fill(args, size, str(root), schema, write=False))
        outputs[-1].figures["fill_s"] = float((filled / FILL_COMPLETE).read_text())
        print(f"{'reused' if reuse else 'filled'} {size:,} rows", file=sys.stderr, flush=True)
    measure(args, outputs, schema)
    return [output.figures for output in outputs]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_storage_"))
    try:
        results = run_benchmark(args, workdir)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    failed = over_limit(results, args)
    if args.json:
        print(json.dumps({"results": results, "over_limit": failed}, indent=2))
    else:
        print(format_table(results, args))
        for line in failed:
            print(f"over the goal: {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
