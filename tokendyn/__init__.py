"""Token Dynamics: a video's patch tokens as a token base (K centroids) and a dynamics map (a centroid id per cell).

Pure torch, no I/O; everything runs on the device of its inputs.

    compress / compress_batch   tokens [T, H, W, D] -> CompressedVideo (fixed K, or adaptive with k=None)
    CompressedVideo             base [K, D], dynamics [T, H, W], sizes [K]; decompress, pooled, storage form
    CrossDynamicsAttention      (base, dynamics) -> K motion-aware tokens for an LLM
    kmeans                      the spherical k-means behind it (fixed and adaptive K)
    clustering                  its steps: seeding, Ward merging, choosing K, Lloyd, split/merge repair
    baselines, metrics          equal-budget baselines and fidelity measures for evaluation
"""

from tokendyn import baselines, metrics
from tokendyn.attention import CrossDynamicsAttention, motion_features
from tokendyn.compress import CompressedVideo, compress, compress_batch
from tokendyn.kmeans import (
    KMeansResult,
    adaptive_kmeans,
    adaptive_kmeans_batch,
    fidelity_k,
    select_k,
    spherical_kmeans,
    spherical_kmeans_batch,
)

__all__ = [
    "CompressedVideo",
    "CrossDynamicsAttention",
    "KMeansResult",
    "adaptive_kmeans",
    "adaptive_kmeans_batch",
    "baselines",
    "compress",
    "compress_batch",
    "fidelity_k",
    "metrics",
    "motion_features",
    "select_k",
    "spherical_kmeans",
    "spherical_kmeans_batch",
]
