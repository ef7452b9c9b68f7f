"""Motion benchmark: can a video LLM read direction, colour and shape from a handful of cached tokens?

    python jobs/bench/bench_motion.py                     # defaults: 200 clips, K = 16, SmolLM2, < 30 min on 2 cores
    python jobs/bench/bench_motion.py --reuse-caches --device cuda --variants tome   # train and score on a GPU

1. Generate captioned synthetic clips with PyAV: a red / green / blue / yellow circle, square or triangle moves
   left, right, up or down, or stays still, over a random textured background ("a red circle moves left").
   The combinations are dealt round-robin, so every split holds every value of every attribute. Harder suites
   (--suite): `turn`, the object first moves another way and turns or stops halfway ("a red circle moves up, then
   left"), the second way asked; `pan`, the camera pans while the object moves or stays in the scene ("a red circle
   stays still as the camera pans up"), the way in the scene asked; `two`, a second object, smaller and of another
   colour and shape, moves another way ("a red circle moves left and a small blue square moves up"), the large
   object asked.
2. Compress them with the real job (pipeline.job.run.run_job: default encoder, --frames, K = --k) into a cache of
   train and held-out clips.
3. Build the baselines at the same number of LLM tokens per video from the same encoder tokens of the same
   frames (tokendyn.baselines): uniform spatio-temporal pooling, ToMe merging, one token per frame.
4. Train the video LLM from each cache with jobs/train_from_cache.py (frozen LLM; the cross-dynamics attention
   and the projector train) and compare on the held-out clips: caption loss, and the accuracy of the generated
   caption on direction, colour and shape separately. Variants:
       token-dynamics   token base + dynamics map through cross-dynamics attention
       token-base       the same token base, no dynamics map
       uniform-pool     tokendyn.baselines.uniform_pool
       tome             tokendyn.baselines.tome_merge
       frame-pool       tokendyn.baselines.frame_pool
   With --task qa the same clips train on three questions per clip instead of the caption ("Which way does the
   object move?", "What colour is the object?", "What shape is the object?"; the answer is one word), and each
   attribute is scored as multiple choice, NextQA-style: every value of the attribute is an option and the one of
   highest log-likelihood (summed over its tokens, and per token) is the model's choice; the generated short answer
   is scored too (exact match).
5. Training samples/s from the cache vs from the raw videos (decode + encode + compress inside each step).

All variants use the same LLM, seed, steps, batch and learning rate. Chance levels: direction 1/5, colour 1/4,
shape 1/3. Results go to --workdir/results.json as well as to stdout.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # local Ray stays on loopback
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # jobs/, for the training job this bench runs

import av  # noqa: E402,F401  before decord (see pipeline/job/decode.py)
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

import tokendyn  # noqa: E402
import train_from_cache  # noqa: E402  (jobs/)
from pipeline.job.config import JobConfig  # noqa: E402
from pipeline.job.run import init_ray, run_job  # noqa: E402
from pipeline.job.tokenizer import VideoTokenizer  # noqa: E402
from pipeline.readers.cache import HEAVY_COLUMNS, CachedTokenDataset, collate_videos  # noqa: E402
from pipeline.readers.evaluation.probe import accuracy_interval  # noqa: E402
from pipeline.readers.qa import MC_SCORES, score_multiple_choice  # noqa: E402
from pipeline.readers.video_lm import DEFAULT_LLM, load_llm  # noqa: E402
from pipeline.store.contract import read_contract  # noqa: E402
from pipeline.store.schema import now_utc, video_row  # noqa: E402
from pipeline.store.storage import OutputStore  # noqa: E402
from tokendyn.baselines import frame_pool, tome_merge, uniform_pool  # noqa: E402

COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (40, 80, 230), "yellow": (235, 215, 40)}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0), "still": (0, 0)}
ATTRIBUTES = {"direction": tuple(DIRECTIONS), "colour": tuple(COLOURS), "shape": SHAPES}
# basic: one object, one direction. The harder suites keep the same attributes but break any reader of where the
# object is on average or of its first-to-last displacement: in `turn` the object first moves another way and turns
# (or stops) halfway, and the direction asked is the second one; in `pan` the camera pans while the object moves
# (or stays) in the scene, and the direction asked is the object's in the scene, not on the screen; in `two` a second,
# smaller object of another colour and shape moves another way (or stays), and what is asked is the large object's.
SUITES = ("basic", "turn", "pan", "two")
OTHER_SCALE = 0.6  # the second object's size against the first's (suite `two`)
MOVING = ("left", "right", "up", "down")
BASELINES = {"uniform-pool": uniform_pool, "tome": tome_merge, "frame-pool": frame_pool}
# variant -> (cache, train_from_cache flags)
VARIANTS = {"token-dynamics": ("token-dynamics", []), "token-base": ("token-dynamics", ["--no-dynamics"]),
            "uniform-pool": ("uniform-pool", ["--no-dynamics"]), "tome": ("tome", ["--no-dynamics"]),
            "frame-pool": ("frame-pool", ["--no-dynamics"])}
SPLITS = ("train", "heldout")
TASKS = ("caption", "qa")
# What the qa task asks of each clip (the answer is the attribute's value, a single word); the direction question
# names what the suite asks: the second way in `turn`, the way in the scene in `pan`; in `two` every question names
# the large object.
QUESTIONS = {"direction": {"basic": "Which way does the object move?",
                           "turn": "Which way does the object move at the end?",
                           "pan": "Which way does the object move in the scene?",
                           "two": "Which way does the large object move?"},
             "colour": {"basic": "What colour is the object?", "two": "What colour is the large object?"},
             "shape": {"basic": "What shape is the object?", "two": "What shape is the large object?"}}


def question_of(attribute: str, suite: str) -> str:
    question = QUESTIONS[attribute]
    return question.get(suite, question["basic"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="bench_motion", help="Clips, caches, checkpoints and results.")
    parser.add_argument("--clips", type=int, default=200, help="Synthetic clips in all.")
    parser.add_argument("--heldout", type=float, default=0.2, help="Fraction of the clips held out.")
    parser.add_argument("--clip-frames", type=int, default=32, help="Frames per generated clip.")
    parser.add_argument("--clip-size", type=int, default=96, help="Width and height of the generated clips.")
    parser.add_argument("--suite", default="basic", choices=SUITES,
                        help="basic: one move; turn: a move, then another (or a stop) halfway, the second asked; "
                             "pan: the camera pans while the object moves in the scene; two: a smaller second "
                             "object moves another way, the large one asked.")
    parser.add_argument("--task", default="caption", choices=TASKS,
                        help="caption: train on the caption and score its words; qa: train on one question per "
                             "attribute and score multiple choice (log-likelihood of each value) and exact match.")
    parser.add_argument("--object-scale", type=float, default=1.0,
                        help="Size of the moving object against the default (radius 12-17%% of the clip).")
    parser.add_argument("--frames", type=int, default=16, help="Frames the job samples per clip.")
    parser.add_argument("--k", type=int, default=16, help="Token-base size, and every baseline's token budget.")
    parser.add_argument("--encoder", default="efficientnet-lite0", help="Vision encoder of the job.")
    parser.add_argument("--llm", default=DEFAULT_LLM, help="Pretrained causal LM (see train_from_cache --llm).")
    parser.add_argument("--llm-train", default="none", help="LLM weights that train (see train_from_cache).")
    parser.add_argument("--steps", type=int, default=120, help="Training steps per variant.")
    parser.add_argument("--eval-every", type=int, default=None,
                        help="Held-out loss every this many steps, for the curve (default: at the end only).")
    parser.add_argument("--batch-size", type=int, default=8, help="Videos per training step.")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate.")
    parser.add_argument("--llm-lr", type=float, default=None, help="Learning rate of the LLM blocks --llm-train opens.")
    parser.add_argument("--video-width", type=int, default=128, help="Width of the cross-dynamics attention.")
    parser.add_argument("--video-heads", type=int, default=8, help="Heads of the cross-dynamics attention.")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="Comma-separated variants to train.")
    parser.add_argument("--raw-steps", type=int, default=3, help="Steps timed from raw videos (0 skips).")
    parser.add_argument("--max-new-tokens", type=int, default=10, help="Caption length limit when generating.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the clips, the models and the data order.")
    parser.add_argument("--no-untrained", action="store_true",
                        help="Do not score the untrained model (one held-out evaluation less).")
    parser.add_argument("--clips-only", action="store_true",
                        help="Only write the captioned clips and their manifests (--workdir/train.jsonl, "
                             "heldout.jsonl: caption, questions, answers) and stop: example data for the job.")
    parser.add_argument("--caches-only", action="store_true",
                        help="Write the clips and build every variant's caches (--workdir/caches), then stop: train "
                             "them elsewhere (a GPU machine, say) with --reuse-caches.")
    parser.add_argument("--reuse-caches", action="store_true",
                        help="Keep the clips and caches of an earlier run in --workdir; only train and evaluate.")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of torch (default: torch's).")
    parser.add_argument("--device", default="cpu", help="Where the LLM trains and is scored: cpu, cuda, cuda:1, ...")
    args = parser.parse_args(argv)
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variant(s) {sorted(unknown)}; choose from {list(VARIANTS)}")
    if sum((args.clips_only, args.caches_only, args.reuse_caches)) > 1:
        parser.error("--clips-only, --caches-only and --reuse-caches exclude one another")
    if args.clips < 2 or not 0 < args.heldout < 1 or min(args.steps, args.k, args.frames, args.batch_size) < 1:
        parser.error("need --clips >= 2, 0 < --heldout < 1 and positive --steps, --k, --frames, --batch-size")
    return args


# ---------------------------------------------------------------------------------------------------------------
# 1. captioned synthetic clips


def caption_of(colour: str, shape: str, direction: str, *, first: str | None = None, pan: str | None = None,
               other: tuple[str, str, str] | None = None) -> str:
    """"a red circle moves left"; with `first` (turn suite) "a red circle moves up, then left" / "..., then stops";
    with `pan` (pan suite) "a red circle moves left as the camera pans up"; with `other` (colour, shape, direction
    of the second object, suite two) "a red circle moves left and a small blue square moves up"."""
    if first is not None:
        return f"a {colour} {shape} moves {first}, then " + ("stops" if direction == "still" else direction)
    caption = f"a {colour} {shape} " + ("stays still" if direction == "still" else f"moves {direction}")
    if other is not None:
        caption += " and a small " + caption_of(*other)[2:]
    return caption if pan is None else f"{caption} as the camera pans {pan}"


def shape_mask(shape: str, size: int, radius: float, cy: float, cx: float) -> np.ndarray:
    """[size, size] bool: the shape's pixels, centred at (cy, cx)."""
    y, x = np.mgrid[0:size, 0:size] + 0.5
    dy, dx = y - cy, x - cx
    if shape == "circle":
        return dy * dy + dx * dx <= radius * radius
    if shape == "square":
        return (np.abs(dy) <= radius * 0.85) & (np.abs(dx) <= radius * 0.85)
    return (dy <= radius * 0.8) & (dy >= -radius) & (np.abs(dx) <= (dy + radius) * 0.6)  # triangle, apex up


def textured_background(size: int, rng: np.random.Generator) -> np.ndarray:
    """[size, size, 3] uint8: coarse random greyish blocks plus fine noise (no colour of the objects)."""
    block = max(size // 12, 1)
    coarse = rng.integers(70, 180, (size // block + 1, size // block + 1, 1))
    tint = rng.integers(-15, 16, (1, 1, 3))
    image = np.kron(coarse, np.ones((block, block, 1)))[:size, :size] + tint
    return np.clip(image + rng.integers(-12, 13, image.shape), 0, 255).astype(np.uint8)


def object_centre(track: dict, frame: int) -> tuple[float, float]:
    """(y, x) in pixels of the object of a clip written by `write_clip` (its returned track) in source frame `frame`:
    on the screen, between the track's waypoints [progress, y, x] (progress 0 at the first frame, 1 at the last)."""
    progress = frame / max(track["frames"] - 1, 1)
    waypoints = np.array(track["waypoints"])
    return (float(np.interp(progress, waypoints[:, 0], waypoints[:, 1])),
            float(np.interp(progress, waypoints[:, 0], waypoints[:, 2])))


def object_mask(track: dict, frame: int) -> np.ndarray:
    """[size, size] bool: the object's pixels in source frame `frame` of a clip written by `write_clip`."""
    return shape_mask(track["shape"], track["size"], track["radius"], *object_centre(track, frame))


def straight_path(direction: str, size: int, radius: float, rng: np.random.Generator) -> list[list[float]]:
    """Waypoints [progress, y, x] of one straight move (or none) that stays inside the frame."""
    dy, dx = DIRECTIONS[direction]
    travel = size * rng.uniform(0.35, 0.5)  # distance covered over the clip
    margin = radius + 2
    start = [rng.uniform(margin, size - margin), rng.uniform(margin, size - margin)]
    for axis, step in ((0, dy), (1, dx)):  # start far enough from the edge it moves towards
        if step > 0:
            start[axis] = rng.uniform(margin, size - margin - travel)
        elif step < 0:
            start[axis] = rng.uniform(margin + travel, size - margin)
    return [[0.0, start[0], start[1]], [1.0, start[0] + dy * travel, start[1] + dx * travel]]


def screen_path(legs: list[tuple[float, str, float]], camera: tuple[float, float], size: int, radius: float,
                rng: np.random.Generator) -> list[list[float]]:
    """Waypoints [progress, y, x] on the screen of an object that makes `legs` (until progress, direction, distance)
    in the scene while the camera moves by `camera` (dy, dx) over the clip; the start is drawn so that the whole
    path stays inside the frame (centred where it cannot)."""
    offsets, position, progress = [(0.0, 0.0, 0.0)], np.zeros(2), 0.0
    for until, direction, distance in legs:
        position = position + np.array(DIRECTIONS[direction]) * distance
        progress = until
        offsets.append((progress, *(position - np.array(camera) * progress)))
    offsets = np.array(offsets)
    margin = radius + 2
    low, high = margin - offsets[:, 1:].min(0), size - margin - offsets[:, 1:].max(0)
    start = np.where(low <= high, rng.uniform(np.minimum(low, high), np.maximum(low, high)), (low + high) / 2)
    return [[float(p), float(start[0] + y), float(start[1] + x)] for p, y, x in offsets]


def write_clip(path: Path, colour: str, shape: str, direction: str, *, frames: int, size: int,
               rng: np.random.Generator, object_scale: float = 1.0, first: str | None = None,
               pan: str | None = None, other: tuple[str, str, str] | None = None) -> dict:
    """Write the clip; returns its track (shape, size, frames, radius, waypoints on the screen, camera) for
    `object_mask` / `object_centre`. object_scale: the object's size against the benchmark's own. first (turn suite):
    the object moves this way for the first half, then `direction`. pan (pan suite): the camera pans this way
    while the object moves `direction` in the scene. other (suite two): the colour, shape and direction of a second
    object, OTHER_SCALE times the size, drawn under the first; its track is the track's "other"."""
    background = textured_background(size, rng)  # drawn first in every suite: a seed's basic clips stay the same
    radius = size * rng.uniform(0.12, 0.17) * object_scale
    camera = (0.0, 0.0)
    if first is not None:
        travel = size * rng.uniform(0.35, 0.5)
        waypoints = screen_path([(0.5, first, travel / 2), (1.0, direction, travel / 2)], camera, size, radius, rng)
    elif pan is not None:
        camera = tuple(float(step * size * rng.uniform(0.15, 0.25)) for step in DIRECTIONS[pan])
        background = textured_background(size + int(np.ceil(np.abs(camera).max())) + 1, rng)  # the scene
        waypoints = screen_path([(1.0, direction, size * rng.uniform(0.25, 0.35))], camera, size, radius, rng)
    else:
        waypoints = straight_path(direction, size, radius, rng)
    track = {"shape": shape, "size": size, "frames": frames, "radius": float(radius), "direction": direction,
             "waypoints": waypoints, "camera": list(camera)}
    drawn = [(track, colour)]
    if other is not None:
        other_radius = radius * OTHER_SCALE
        track["other"] = {"shape": other[1], "size": size, "frames": frames, "radius": float(other_radius),
                          "direction": other[2], "waypoints": straight_path(other[2], size, other_radius, rng)}
        drawn.insert(0, (track["other"], other[0]))
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=16)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18", "preset": "veryfast"}
        for t in range(frames):
            progress = t / max(frames - 1, 1)
            # The view into the scene: it starts where the camera's move keeps it inside the background.
            top, left = (round(max(0.0, -step) + step * progress) for step in camera)
            frame = background[top: top + size, left: left + size].copy()
            for drawn_track, drawn_colour in drawn:
                frame[object_mask(drawn_track, t)] = COLOURS[drawn_colour]
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return track


def generate_clips(folder: Path, args) -> dict[str, Path]:
    """Clips + one manifest per split ({split: manifest.jsonl}); combinations dealt round-robin, then shuffled.
    Each clip's track (`write_clip`) goes to folder/tracks.json, keyed by video_id. Besides the caption, a row holds
    one question per attribute and its answer (list columns `questions`, `answers`)."""
    rng = np.random.default_rng(args.seed)
    combos = [(c, s, d) for c in COLOURS for s in SHAPES for d in DIRECTIONS]
    order = rng.permutation(len(combos))
    rows, tracks = [], {}
    for index in range(args.clips):
        colour, shape, direction = combos[order[index % len(combos)]]
        path = folder / "clips" / f"clip-{index:04d}.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        motion = {}
        if args.suite == "turn":  # any other way first, so that where it went first never names the answer
            motion["first"] = str(rng.choice([d for d in MOVING if d != direction]))
        elif args.suite == "pan":
            motion["pan"] = str(rng.choice(MOVING))
        elif args.suite == "two":  # every attribute differs from the large object's
            motion["other"] = tuple(str(rng.choice([value for value in values if value != mine]))
                                    for values, mine in ((tuple(COLOURS), colour), (SHAPES, shape),
                                                         (tuple(DIRECTIONS), direction)))
        tracks[f"clip-{index:04d}"] = write_clip(path, colour, shape, direction, frames=args.clip_frames,
                                                 size=args.clip_size, rng=rng,
                                                 object_scale=args.object_scale, **motion)
        values = {"colour": colour, "shape": shape, "direction": direction}
        rows.append({"video_id": f"clip-{index:04d}", "uri": str(path),
                     "caption": caption_of(colour, shape, direction, **motion), **values,
                     "questions": [question_of(attribute, args.suite) for attribute in ATTRIBUTES],
                     "answers": [values[attribute] for attribute in ATTRIBUTES]})
    heldout = max(1, round(args.clips * args.heldout))
    held = set(rng.permutation(args.clips)[:heldout].tolist())
    manifests = {}
    for split in SPLITS:
        manifests[split] = folder / f"{split}.jsonl"
        manifests[split].write_text("".join(json.dumps(row) + "\n" for index, row in enumerate(rows)
                                            if (index in held) == (split == "heldout")))
    (folder / "tracks.json").write_text(json.dumps(tracks))
    return manifests


# ---------------------------------------------------------------------------------------------------------------
# 2. the real job, 3. baselines from the same encoder tokens


def compress_with_job(manifest: Path, output: Path, args) -> None:
    config = JobConfig.from_args(["--input", str(manifest), "--output", str(output), "--encoder", args.encoder,
                                  "--frames", str(args.frames), "--k", str(args.k), "--neighbours", "0",
                                  "--num-cpus", "2"])
    init_ray(config)  # a local Ray on loopback unless one is running already
    summary = run_job(config)
    if summary.failed:
        raise RuntimeError(f"the job failed on {summary.failed} clips: {summary.failed_by_stage}")


def write_baseline_caches(job_cache: Path, outputs: dict[str, Path], args) -> None:
    """For each clip of the job's cache: the same frames through the same encoder, each baseline at K tokens."""
    store = OutputStore(str(job_cache))
    table = store.read_videos()
    light = table.drop_columns(list(HEAVY_COLUMNS)).to_pylist()
    video_tokenizer = VideoTokenizer(read_contract(store))  # decode and encode as the job did
    rows = {baseline: [] for baseline in outputs}
    for row in light:
        clip = video_tokenizer.decode(row["uri"])
        assert list(clip.frame_indices) == list(row["frame_indices"]), "the job sampled other frames"
        tokens = video_tokenizer.encode(clip.frames)
        for baseline in outputs:
            kept, assignment = BASELINES[baseline](tokens, row["k"])
            video = tokendyn.CompressedVideo(kept, assignment, torch.bincount(assignment.reshape(-1),
                                                                              minlength=len(kept)))
            rows[baseline].append({**row, **video_row(
                video, frame_indices=row["frame_indices"], fps=row["fps"], source_frames=row["source_frames"],
                encoder=row["encoder"], encoder_layer=row["encoder_layer"], base_dtype="float16", created_at=now_utc())})
    for baseline, output in outputs.items():
        OutputStore(str(output)).write_videos(pa.Table.from_pylist(rows[baseline], schema=table.schema))


# ---------------------------------------------------------------------------------------------------------------
# 4. training and held-out evaluation


def attribute_values(caption: str) -> dict[str, str | None]:
    """The value of each attribute a caption names (None when it names none or several)."""
    about_the_object = caption.lower().split(" as the camera")[0].split(" and a small ")[0]
    words = about_the_object.replace(",", " ").replace(".", " ").split()
    found = {}
    for attribute, values in ATTRIBUTES.items():
        named = [value for value in values if value in words]
        if attribute == "direction":
            if "then" in words:  # the turn suite asks where the object went second
                after = words[words.index("then") + 1:]
                named = ["still"] if after[:1] == ["stops"] else [value for value in values if value in after[:1]]
            elif not named and "stays" in words:
                named = ["still"]
        found[attribute] = named[0] if len(named) == 1 else None
    return found


def heldout_batches(heldout: CachedTokenDataset, args):
    for start in range(0, len(heldout), args.batch_size):
        yield collate_videos([heldout[i] for i in range(start, min(start + args.batch_size, len(heldout)))])


def heldout_texts(batch: dict, args) -> tuple[list[dict], list[str], list[str | None]]:
    """The held-out targets of a batch: (one item per target, answers, questions). caption: each clip's caption;
    qa: each clip's question-answer pairs, all of them."""
    items = [{name: batch[name][row] for name in ("base", "dynamics", "base_mask")} for row in range(len(batch["caption"]))]
    if args.task == "caption":
        return items, batch["caption"], [None] * len(items)
    pairs = [(item, question, answer) for item, questions, answers in zip(items, batch["questions"], batch["answers"])
             for question, answer in zip(questions, answers)]
    return [item for item, _, _ in pairs], [answer for *_, answer in pairs], [question for _, question, _ in pairs]


@torch.no_grad()
def heldout_loss(model, tokenizer, heldout: CachedTokenDataset, args) -> float:
    """Mean loss of the held-out targets (captions, or every answer)."""
    model.eval()
    losses = []
    for batch in heldout_batches(heldout, args):
        items, answers, questions = heldout_texts(batch, args)
        videos = {name: torch.stack([item[name] for item in items]) for name in ("base", "dynamics", "base_mask")}
        inputs = {**videos, **model.text_batch(tokenizer, answers, questions)}
        losses.append(model.video_losses(**{name: value.to(args.device) for name, value in inputs.items()}).cpu())
    model.train()
    return torch.cat(losses).mean().item()


@torch.no_grad()
def evaluate(model, tokenizer, heldout: CachedTokenDataset, args) -> dict:
    """Held-out loss and, per attribute, the accuracy of the generated caption (caption task) or of multiple choice
    and the generated short answer (qa task), each with a 95 % interval (a bootstrap over the held-out clips)."""
    loss = heldout_loss(model, tokenizer, heldout, args)
    model.eval()
    correct = {attribute: [] for attribute in ATTRIBUTES}
    samples = []
    if args.task == "qa":
        mc = {(attribute, score): [] for attribute in ATTRIBUTES for score in MC_SCORES}
        items = [heldout[index] for index in range(len(heldout))]
        questions = [{"video_id": item["video_id"], "question": question_of(attribute, args.suite),
                      "options": list(values), "answer": values.index(item[attribute]), "attribute": attribute}
                     for item in items for attribute, values in ATTRIBUTES.items()]
        records = score_multiple_choice(model, tokenizer, questions, [item for item in items for _ in ATTRIBUTES],
                                        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
        for question, record in zip(questions, records):
            for score in MC_SCORES:
                mc[question["attribute"], score].append(record[f"{score}_correct"])
            samples.append((question["question"], question["options"][question["answer"]], record["generated"]))
        correct = {attribute: mc[attribute, "exact-match"] for attribute in ATTRIBUTES}
    else:
        for batch in heldout_batches(heldout, args):
            videos = {name: batch[name].to(args.device) for name in ("base", "dynamics", "base_mask")}
            generated = model.generate_captions(tokenizer, **videos, max_new_tokens=args.max_new_tokens)
            for truth, caption in zip(batch["caption"], generated):
                expected, got = attribute_values(truth), attribute_values(caption)
                for attribute in ATTRIBUTES:
                    correct[attribute].append(got[attribute] == expected[attribute])
                samples.append((truth, caption))
    model.train()
    scores = {"heldout_loss": loss, "examples": samples[:5]}
    for attribute, values in correct.items():
        scores[f"{attribute}_acc"], *scores[f"{attribute}_interval"] = accuracy_interval(np.array([values]))
    if args.task == "qa":
        for (attribute, score), values in mc.items():
            scores[f"{attribute}_{score}"] = accuracy_interval(np.array([values]))
    return scores


def train_variant(variant: str, caches: Path, args, llm) -> dict:
    cache, flags = VARIANTS[variant]
    if args.llm_train != "none":  # the LLM trains too: every variant starts from the pretrained weights
        llm = (copy.deepcopy(llm[0]), llm[1])
    checkpoints = Path(args.workdir) / "checkpoints" / variant
    shutil.rmtree(checkpoints, ignore_errors=True)  # every run trains from scratch
    raw_steps = args.raw_steps if variant == "token-dynamics" else 0
    every = args.eval_every or args.steps

    def train_args(steps: int, raw: int):
        return train_from_cache.parse_args([
            "--cache", str(caches / cache / "train"), "--checkpoint-dir", str(checkpoints), "--steps", str(steps),
            "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--save-every", str(every),
            "--log-every", str(max(args.steps // 4, 1)), "--seed", str(args.seed), "--raw-steps", str(raw),
            "--llm", args.llm, "--llm-train", args.llm_train, *(["--llm-lr", str(args.llm_lr)] if args.llm_lr else []),
            "--video-width", str(args.video_width), "--video-heads", str(args.video_heads), "--device", args.device,
            *flags,
            *(["--question-column", "questions", "--answer-column", "answers"] if args.task == "qa" else [])])

    heldout = CachedTokenDataset(str(caches / cache / "heldout"))
    before = None
    if variant == "token-dynamics" and not args.no_untrained:  # the same initialisation, untrained: to beat
        model = train_from_cache.new_model(train_args(args.steps, 0), heldout.dim, llm[0]).to(args.device)
        before = evaluate(model, llm[1], heldout, args)
        del model
    print(f"\n== {variant}: {' '.join(flags) or 'cross-dynamics attention'}", flush=True)
    started, losses, curve = time.perf_counter(), [], []
    for steps in [*range(every, args.steps, every), args.steps]:  # resumes from the last checkpoint each time
        result = train_from_cache.run(train_args(steps, raw_steps if steps == args.steps else 0), llm=llm)
        losses += result["losses"]
        curve.append((steps, heldout_loss(result["model"], llm[1], heldout, args)))
        print(f"   step {steps}: held-out loss {curve[-1][1]:.3f}", flush=True)
    train_s = time.perf_counter() - started
    scores = evaluate(result["model"], llm[1], heldout, args)
    print(f"   held-out loss {scores['heldout_loss']:.3f}; accuracy " + ", ".join(
        f"{name} {scores[f'{name}_acc']:.2f}" for name in ATTRIBUTES) + (", multiple choice " + ", ".join(
            f"{name} {scores[f'{name}_likelihood'][0]:.2f}" for name in ATTRIBUTES) if args.task == "qa" else "")
          + f"; e.g. {scores['examples'][:2]}", flush=True)
    return {**scores, "untrained": before, "train_s": train_s, "first_loss": losses[0], "last_loss": losses[-1],
            "heldout_curve": curve, "cache": result["cache"], "raw": result["raw"], "ratios": result["ratios"]}


# ---------------------------------------------------------------------------------------------------------------


def print_table(results: dict, args) -> None:
    if args.task == "qa":
        print_multiple_choice_table(results, args)
    what = "caption" if args.task == "caption" else "short answer (exact match)"
    print(f"\nHeld-out accuracy of the generated {what} ({args.k} LLM tokens per video; chance: direction "
          f"0.20, colour 0.25, shape 0.33)")
    print(f"{'variant':16s} {'direction':>17s} {'colour':>17s} {'shape':>17s} {'held-out loss':>14s} "
          f"{'train samples/s':>16s}")
    for variant, scores in results["variants"].items():
        cache = scores["cache"]
        accuracies = " ".join(f"{scores[f'{name}_acc']:5.2f} [{scores[f'{name}_interval'][0]:.2f}, "
                              f"{scores[f'{name}_interval'][1]:.2f}]" for name in ATTRIBUTES)
        print(f"{variant:16s} {accuracies} {scores['heldout_loss']:14.3f} "
              f"{cache['samples'] / (cache['tokens_s'] + cache['train_s']):16.2f}")
    untrained = results["variants"].get("token-dynamics", {}).get("untrained")
    if untrained:
        print(f"{'(untrained)':16s} " + " ".join(f"{untrained[f'{name}_acc']:5.2f}{'':12s}" for name in ATTRIBUTES) +
              f" {untrained['heldout_loss']:14.3f}")
    for variant, scores in results["variants"].items():
        print(f"held-out loss curve of {variant}: " + ", ".join(f"{step}: {loss:.3f}"
                                                               for step, loss in scores["heldout_curve"]))
    print(f"whole benchmark: {results['timings']['total_s'] / 60:.1f} min; {results['timings']}")


def print_multiple_choice_table(results: dict, args) -> None:
    print(f"\nHeld-out multiple-choice accuracy, the option of highest log-likelihood ({args.k} LLM tokens per video; "
          "chance: direction 0.20, colour 0.25, shape 0.33); summed over the option's tokens / per token")
    print(f"{'variant':16s} " + " ".join(f"{name:>35s}" for name in ATTRIBUTES))
    for variant, scores in results["variants"].items():
        cells = []
        for attribute in ATTRIBUTES:
            (summed, low, high), (mean, mean_low, mean_high) = (scores[f"{attribute}_{score}"]
                                                                for score in MC_SCORES[:2])
            cells.append(f"{summed:.2f} [{low:.2f}, {high:.2f}] / {mean:.2f} [{mean_low:.2f}, {mean_high:.2f}]")
        print(f"{variant:16s} " + " ".join(f"{cell:>35s}" for cell in cells))


def build_caches(workdir: Path, caches: Path, args) -> dict:
    """Steps 1-3: clips, the job's caches and the baselines' caches (train and held-out); returns their times."""
    shutil.rmtree(caches, ignore_errors=True)
    timings = {}
    started = time.perf_counter()
    manifests = generate_clips(workdir, args)
    timings["generate_s"] = time.perf_counter() - started

    import ray

    started_ray = not ray.is_initialized()
    started = time.perf_counter()
    try:
        for split in SPLITS:
            compress_with_job(manifests[split], caches / "token-dynamics" / split, args)
    finally:
        if started_ray:
            ray.shutdown()
    timings["job_s"] = time.perf_counter() - started
    started = time.perf_counter()
    for split in SPLITS:
        write_baseline_caches(caches / "token-dynamics" / split,
                              {baseline: caches / baseline / split for baseline in BASELINES}, args)
    timings["baselines_s"] = time.perf_counter() - started
    return timings


def run(args: argparse.Namespace, llm=None) -> dict:
    """The whole benchmark; llm: an already loaded (lm, tokenizer) for --llm. Returns the results dict."""
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    workdir = Path(args.workdir)
    caches = workdir / "caches"
    timings = {}
    if args.clips_only:
        manifests = generate_clips(workdir, args)
        print(f"{args.clips} clips in {workdir / 'clips'}; manifests: {', '.join(map(str, manifests.values()))}")
        return {"manifests": manifests}
    if not args.reuse_caches:
        timings = build_caches(workdir, caches, args)
    if args.caches_only:
        print(f"caches of {args.clips} clips in {caches}: {', '.join(sorted(path.name for path in caches.iterdir()))}")
        return {"caches": caches, "timings": timings}
    llm = llm or load_llm(args.llm)
    results = {"settings": {name: value for name, value in vars(args).items()}, "variants": {}, "timings": timings}
    for variant in args.variants.split(","):
        results["variants"][variant] = train_variant(variant, caches, args, llm)
    results["timings"]["total_s"] = time.perf_counter() - started
    print_table(results, args)
    (workdir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    return results


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
