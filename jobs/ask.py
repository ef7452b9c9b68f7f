"""Ask a trained video LLM about videos: describe them, answer a question, or score a multiple-choice set.

    python jobs/ask.py --checkpoint checkpoints --input clip.mp4                    # describe a new video
    python jobs/ask.py --checkpoint checkpoints --input clip.mp4 --question "Which way does it move?"
    python jobs/ask.py --checkpoint checkpoints --cache output --id VIDEO_ID        # a video already in a cache
    python jobs/ask.py --checkpoint checkpoints --cache output --output answers/    # all of them, to Parquet
    python jobs/ask.py --checkpoint checkpoints --cache output --mc questions.jsonl # multiple-choice accuracy

--checkpoint is what jobs/train_from_cache.py wrote (a checkpoint-<step> folder, or its --checkpoint-dir for the
last one; pickled .pt checkpoints of earlier versions are refused, see jobs/convert_checkpoint.py); it names
its LLM and records the settings of the tokens it was trained on. Videos come from --cache (the compression job's
--output: its tokens are used as they are, and refused if made with other settings) or --input (video files, a
folder, an s3:// prefix or a manifest: tokenised here exactly as the checkpoint's cache was).

Without --output, answers go to stdout (one video: the answer alone; several: "video_id<TAB>answer" lines). With
--output FOLDER, they are written as Parquet through Ray Data, the model in a pool of --workers actors (a GPU each
with --device cuda); a rerun skips the videos already answered with the same question, so a killed run resumes.
Videos that cannot be read get a row with their error and no answer.

--mc FILE scores a multiple-choice set (CSV, JSON Lines or Parquet: video_id or uri, question, options, answer =
the right option's index; see pipeline/readers/qa.py): accuracy of the option with the highest log-likelihood,
summed and per token, and exact match of the generated short answer, each with a 95 % interval.

Exit status: 0, or 2 on bad arguments, a missing checkpoint, cache or video, or tokens the checkpoint was not
trained on.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models load from local files; nothing is downloaded

import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import ray  # noqa: E402
from tqdm import tqdm  # noqa: E402

from pipeline.job.run import start_ray  # noqa: E402
from pipeline.job.tokenizer import list_videos  # noqa: E402
from pipeline.readers.answering import AnswerFiles, VideoAnswerer  # noqa: E402
from pipeline.readers.cache import SOURCES, CachedTokenDataset, EmptyCacheError, ray_dataset  # noqa: E402
from pipeline.readers.checkpoint import (  # noqa: E402
    check_cache, contract_for_new_videos, latest_checkpoint, read_checkpoint,
)
from pipeline.readers.qa import multiple_choice_accuracy, read_multiple_choice, score_multiple_choice  # noqa: E402
from pipeline.store.contract import ContractError, read_contract  # noqa: E402
from pipeline.store.schema import SchemaVersionError  # noqa: E402
from pipeline.store.storage import OutputStore  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="A checkpoint-<step> folder or a --checkpoint-dir (its last).")
    videos = parser.add_argument_group("videos (one of --cache, --input)")
    videos.add_argument("--cache", default=None, help="A compression job's --output (local path or s3://...).")
    videos.add_argument("--id", action="append", default=None, dest="ids", metavar="VIDEO_ID",
                        help="Only this video of --cache (repeatable; default: all of them).")
    videos.add_argument("--source", default="parquet", choices=SOURCES, help="Read --cache's Parquet or LanceDB (--output always reads Parquet).")
    videos.add_argument("--input", default=None,
                        help="New videos: a file, a folder, an s3:// prefix or a manifest (.csv/.jsonl/.parquet).")
    videos.add_argument("--s3-endpoint-url", default=None, help="Endpoint of an S3-compatible store.")
    asking = parser.add_argument_group("asking")
    asking.add_argument("--question", default=None, help="Asked of every video (default: describe the video).")
    asking.add_argument("--mc", default=None, metavar="FILE", help="Score this multiple-choice set instead.")
    asking.add_argument("--max-new-tokens", type=int, default=32, help="Longest answer, in tokens.")
    asking.add_argument("--batch-size", type=int, default=8, help="Videos per forward pass.")
    asking.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    asking.add_argument("--threads", type=int, default=None, help="CPU threads of torch (per actor with --output).")
    output = parser.add_argument_group("batch answering")
    output.add_argument("--output", default=None, help="Folder of Parquet answers (local or s3://); resumable.")
    output.add_argument("--workers", type=int, default=1, help="Model actors answering in parallel.")
    output.add_argument("--flush-every", type=int, default=64, help="Answers per Parquet part file.")
    args = parser.parse_args(argv)
    if args.mc and args.input:
        parser.error("--mc names its videos: by video_id in --cache, or by uri without it")
    if not args.mc and (args.cache is None) == (args.input is None):
        parser.error("give one of --cache and --input")
    if args.ids and args.cache is None:
        parser.error("--id picks videos of --cache")
    if args.mc and args.output:
        parser.error("--mc prints its scores; it takes no --output")
    for name in ("max_new_tokens", "batch_size", "workers", "flush_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


# ---------------------------------------------------------------------------------------------------------------
# videos


def cached_videos(args, answerer: VideoAnswerer) -> CachedTokenDataset:
    """The cache's videos (those of --id), after checking the checkpoint was trained on such tokens."""
    videos = CachedTokenDataset(args.cache, source=args.source, s3_endpoint_url=args.s3_endpoint_url,
                                rank=0, world_size=1)
    answerer.check_cache(videos.settings(), videos.dim, args.cache)
    if args.ids:
        missing = sorted(set(args.ids) - set(videos.rows.column("video_id").to_pylist()))
        if missing:
            raise FileNotFoundError(f"no video {', '.join(map(repr, missing))} in {args.cache}")
        videos.rows = videos.rows.filter(pc.is_in(videos.rows.column("video_id"), value_set=pa.array(args.ids)))
    return videos


def new_videos(rows: list[dict], answerer: VideoAnswerer) -> dict[str, dict | Exception]:
    """video_id -> the item of each new video (tokenised as the checkpoint's were), or why it cannot be read."""
    return {row["video_id"]: answerer.item_or_error(row)
            for row in tqdm(rows, desc="tokenising", unit="video", disable=len(rows) < 2)}


# ---------------------------------------------------------------------------------------------------------------
# the three ways of asking


def answer_to_stdout(args, answerer: VideoAnswerer) -> int:
    if args.cache is not None:
        videos = cached_videos(args, answerer)
        items = {item["video_id"]: item for item in (videos[i] for i in range(len(videos)))}
    else:
        items = new_videos(list_videos(args.input, s3_endpoint_url=args.s3_endpoint_url), answerer)
    if not items:
        raise FileNotFoundError(f"no video in {args.cache or args.input}")
    readable = [(video_id, item) for video_id, item in items.items() if not isinstance(item, Exception)]
    for video_id, item in items.items():
        if isinstance(item, Exception):
            print(f"error: {video_id}: {type(item).__name__}: {item}", file=sys.stderr)
    for start in range(0, len(readable), args.batch_size):
        chunk = readable[start:start + args.batch_size]
        for (video_id, _), answer in zip(chunk, answerer.answer([item for _, item in chunk])):
            print(answer if len(items) == 1 else f"{video_id}\t{answer}", flush=True)
    return 0 if len(readable) == len(items) else 1


def blocks_for(videos: int, args) -> int:
    """Read blocks of about --flush-every videos: the actor's answers reach the driver (and a part file) a block at
    a time, so this is what a kill can lose and how smoothly progress moves."""
    return max(1, -(-videos // args.flush_every))


def answer_to_parquet(args) -> int:
    """All the videos through Ray Data with the model in an actor pool; the answers in part files."""
    files = AnswerFiles(args.output, s3_endpoint_url=args.s3_endpoint_url)
    files.remove_partial_files()
    answered = {video_id for video_id, question in files.answered() if question == args.question}
    answerer_kwargs = {"checkpoint": args.checkpoint, "question": args.question, "device": args.device,
                       "max_new_tokens": args.max_new_tokens, "s3_endpoint_url": args.s3_endpoint_url,
                       "threads": args.threads}
    checkpoint = latest_checkpoint(args.checkpoint)
    state = read_checkpoint(checkpoint)
    start_ray()  # before any dataset is made: Ray Data would start a Ray of its own, not on loopback
    if args.cache is not None:
        store = OutputStore(args.cache, s3_endpoint_url=args.s3_endpoint_url)
        index = store.read_videos(columns=["video_id", "dim"])
        if index is None or index.num_rows == 0:
            raise EmptyCacheError(f"no compressed videos in {args.cache}")
        check_cache(state, checkpoint, read_contract(store), index.column("dim")[0].as_py(), args.cache)
        listed = index.column("video_id").to_pylist()
        missing = sorted(set(args.ids or []) - set(listed))
        if missing:
            raise FileNotFoundError(f"no video {', '.join(map(repr, missing))} in {args.cache}")
        todo = [video_id for video_id in listed if video_id not in answered and (not args.ids or video_id in args.ids)]
        todo_set = set(todo)
        videos = ray_dataset(args.cache, metadata_columns=["uri"], s3_endpoint_url=args.s3_endpoint_url,
                             override_num_blocks=blocks_for(len(listed), args)).filter(
            lambda item: item["video_id"] in todo_set)
    else:
        contract_for_new_videos(state, checkpoint)
        todo = [row for row in list_videos(args.input, s3_endpoint_url=args.s3_endpoint_url)
                if row["video_id"] not in answered]
        videos = ray.data.from_items([{"video_id": row["video_id"], "uri": row["uri"]} for row in todo],
                                     override_num_blocks=blocks_for(len(todo), args))
    print(f"{len(todo)} videos to answer ({len(answered)} answered before) -> {args.output}")
    if not todo:
        return 0
    on_gpu = args.device.startswith("cuda")
    answers = videos.map_batches(VideoAnswerer, fn_constructor_kwargs=answerer_kwargs, batch_size=args.batch_size,
                                 batch_format="numpy", concurrency=args.workers, num_gpus=1 if on_gpu else 0,
                                 num_cpus=args.threads or 1)
    errors = 0
    with tqdm(total=len(todo), unit="video", desc="answering") as progress:
        for batch in answers.iter_batches(batch_size=args.flush_every, batch_format="pyarrow"):
            files.write(batch)
            errors += batch.num_rows - batch.column("error").null_count
            progress.update(batch.num_rows)
    print(f"{len(todo) - errors} answered, {errors} failed; {files.read().num_rows} answer rows in {args.output}")
    return 0 if errors == 0 else 1


def score_mc(args, answerer: VideoAnswerer) -> int:
    """Multiple-choice accuracy over a set whose videos are in --cache (by video_id) or files (by uri)."""
    questions = read_multiple_choice(args.mc)
    if args.cache is not None:
        videos = cached_videos(args, answerer)
        items = {item["video_id"]: item for item in (videos[i] for i in range(len(videos)))}
        keys = [question.get("video_id") for question in questions]
    else:
        keys = [question.get("uri") for question in questions]
        items = new_videos([{"video_id": uri, "uri": uri} for uri in dict.fromkeys(keys) if uri], answerer)
    unreadable = sorted({str(key) for key in keys if isinstance(items.get(key, KeyError(key)), Exception)})
    if unreadable:
        where = f"in {args.cache}" if args.cache else "readable"
        raise FileNotFoundError(f"{len(unreadable)} video(s) of {args.mc} are not {where}: {unreadable[:5]}")
    records = score_multiple_choice(answerer.model, answerer.tokenizer, questions, [items[key] for key in keys],
                                    batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    print(f"{len(records)} questions of {args.mc}; checkpoint step {answerer.step}")
    for score, (accuracy, low, high) in multiple_choice_accuracy(records).items():
        print(f"  {score:16s} {accuracy:.3f}  [{low:.3f}, {high:.3f}]")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.output:
            return answer_to_parquet(args)
        answerer = VideoAnswerer(args.checkpoint, question=args.question, device=args.device,
                                 max_new_tokens=args.max_new_tokens, s3_endpoint_url=args.s3_endpoint_url,
                                 threads=args.threads)
        return score_mc(args, answerer) if args.mc else answer_to_stdout(args, answerer)
    except (FileNotFoundError, ValueError, ContractError, EmptyCacheError, SchemaVersionError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
