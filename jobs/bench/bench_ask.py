"""Batch answering: is `jobs/ask.py --output` limited by the model, not the plumbing? Measured side by side in one run.

    python jobs/bench/bench_ask.py                          # 96 videos, SmolLM2, batches of 8, 3 repeats

Rows (the same cache, checkpoint, batches and answer length for both):
  bare generate()       the model's generate_captions over the cache's items, already in memory, batch after batch
  ask --output          jobs/ask.py's Ray Data path: the cache read by Ray Data, the model in one actor, every answer
                        batch written as a Parquet part file (resumable); Ray's start excluded, the actor's start and
                        the model's load included (end to end) or left out (steady: from the first part file written
                        to the last, by their modification times)

The cache holds one Parquet file per batch of random token bases and maps of the default encoder's shape (K = 16 x 384, 16 x 16 x 16 maps) with a
recorded settings contract; the checkpoint is an untrained VideoPrefixLM on the LLM (its answers cost what a
trained one's do: --max-new-tokens tokens, greedy). Goal: ask / bare >= 0.9 (steady).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # local Ray stays on loopback
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # jobs/, for the script this bench runs

import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

import ask  # noqa: E402  (jobs/)
import tokendyn  # noqa: E402
from pipeline.job.config import JobConfig  # noqa: E402
from pipeline.job.run import start_ray  # noqa: E402
from pipeline.readers.cache import CachedTokenDataset  # noqa: E402
from pipeline.readers.checkpoint import load_trained_model, save_checkpoint  # noqa: E402
from pipeline.readers.video_lm import DEFAULT_LLM, VideoPrefixLM, load_llm  # noqa: E402
from pipeline.store.contract import contract_of_rows  # noqa: E402
from pipeline.store.schema import now_utc, video_row, video_schema  # noqa: E402
from pipeline.store.storage import OutputStore  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=96, help="Videos in the cache.")
    parser.add_argument("--batch-size", type=int, default=8, help="Videos per generate() call, both rows.")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="Answer length limit.")
    parser.add_argument("--llm", default=DEFAULT_LLM, help="The LLM (see train_from_cache --llm).")
    parser.add_argument("--k", type=int, default=16, help="Token-base size.")
    parser.add_argument("--dim", type=int, default=384, help="Token width.")
    parser.add_argument("--grid", type=int, default=16, help="Map side (frames and cells per side).")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of both rows (the actor's too).")
    parser.add_argument("--repeats", type=int, default=3, help="Runs of each row, alternating.")
    parser.add_argument("--workdir", default=None, help="Where the cache and answers go (default: a temp dir).")
    args = parser.parse_args(argv)
    if min(args.videos, args.batch_size, args.max_new_tokens, args.k, args.repeats, args.threads) < 1:
        parser.error("all counts must be >= 1")
    return args


def build_cache(root: Path, args) -> None:
    generator = torch.Generator().manual_seed(0)
    rows = []
    for index in range(args.videos):
        base = torch.nn.functional.normalize(torch.randn(args.k, args.dim, generator=generator), dim=-1)
        dynamics = torch.randint(0, args.k, (args.grid,) * 3, generator=generator)
        video = tokendyn.CompressedVideo(base, dynamics, torch.bincount(dynamics.reshape(-1), minlength=args.k))
        rows.append({"video_id": f"video-{index:05d}", "uri": f"/videos/{index:05d}.mp4", **video_row(
            video, frame_indices=list(range(args.grid)), fps=16.0, source_frames=args.grid, encoder="dinov2-small",
            encoder_layer=None, base_dtype="float16", created_at=now_utc())})
    table = pa.Table.from_pylist(rows, schema=video_schema(args.dim, "float16"))
    store = OutputStore(str(root))
    for start in range(0, len(rows), args.batch_size):  # one file per batch, as a job writes many: answers stream
        store.write_videos(table.slice(start, args.batch_size))
    settings = JobConfig(input="unused", encoder="dinov2-small", frames=args.grid, k=args.k)
    store.write_settings(contract_of_rows(settings, table).as_json("bench_ask"))


def bare_generate_s(model, tokenizer, items: list[dict], args) -> float:
    from pipeline.readers.cache import collate_videos

    started = time.perf_counter()
    for start in range(0, len(items), args.batch_size):
        batch = collate_videos(items[start:start + args.batch_size])
        model.generate_captions(tokenizer, batch["base"], batch["dynamics"], batch["base_mask"],
                                max_new_tokens=args.max_new_tokens)
    return time.perf_counter() - started


def ask_s(cache: Path, checkpoints: Path, answers: Path, args) -> tuple[float, float]:
    """(end-to-end seconds, steady answers/s) of one `ask --output` run."""
    shutil.rmtree(answers, ignore_errors=True)
    ask_args = ask.parse_args(["--checkpoint", str(checkpoints), "--cache", str(cache), "--output", str(answers),
                               "--batch-size", str(args.batch_size), "--flush-every", str(args.batch_size),
                               "--max-new-tokens", str(args.max_new_tokens), "--threads", str(args.threads)])
    started = time.perf_counter()
    assert ask.answer_to_parquet(ask_args) == 0
    total = time.perf_counter() - started
    parts = sorted((path.stat().st_mtime, path) for path in answers.glob("part-*.parquet"))
    import pyarrow.parquet as pq

    after_first = sum(pq.read_metadata(path).num_rows for _, path in parts[1:])
    return total, after_first / (parts[-1][0] - parts[0][0])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-ask-"))
    cache, checkpoints = work / "cache", work / "checkpoints"
    shutil.rmtree(cache, ignore_errors=True)
    build_cache(cache, args)
    lm, tokenizer = load_llm(args.llm)
    torch.manual_seed(0)
    model = VideoPrefixLM(args.dim, lm, video_heads=8, video_width=128, llm_name=args.llm)
    videos = CachedTokenDataset(str(cache), rank=0, world_size=1)
    save_checkpoint(checkpoints, model, torch.optim.AdamW(model.parameters()), 0, videos.settings())
    model, tokenizer, _, _ = load_trained_model(checkpoints, llm=(lm, tokenizer))  # as ask loads it
    items = [videos[index] for index in range(len(videos))]
    bare_generate_s(model, tokenizer, items[:args.batch_size], args)  # warm-up, not timed
    start_ray(num_cpus=args.threads + 1)  # the actor's share, and one for reading the cache
    bare, end_to_end, steady = [], [], []
    for repeat in range(args.repeats):
        bare.append(len(items) / bare_generate_s(model, tokenizer, items, args))
        total, rate = ask_s(cache, checkpoints, work / "answers", args)
        end_to_end.append(len(items) / total)
        steady.append(rate)
        print(f"repeat {repeat + 1}: bare {bare[-1]:.2f}, ask end to end {end_to_end[-1]:.2f}, "
              f"ask steady {steady[-1]:.2f} answers/s", flush=True)
    print(f"\n{args.videos} videos, batches of {args.batch_size}, {args.max_new_tokens} new tokens, LLM {args.llm}, "
          f"{args.threads} thread(s); median [min, max] of {args.repeats} runs")
    print(f"{'answers/s':24s} {'rate':>22s} {'/ bare':>8s}")
    bare_median = statistics.median(bare)
    for label, rates in (("bare generate()", bare), ("ask --output, steady", steady),
                         ("ask --output, end to end", end_to_end)):
        median = statistics.median(rates)
        print(f"{label:24s} {median:8.2f} [{min(rates):.2f}, {max(rates):.2f}] {median / bare_median:8.2f}")
    startup = [len(items) / whole - len(items) / rate for whole, rate in zip(end_to_end, steady)]
    print(f"start-up of ask (end to end minus the steady time of {len(items)} answers): median "
          f"{statistics.median(startup):.1f} s (actor start and model load; paid once per run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
