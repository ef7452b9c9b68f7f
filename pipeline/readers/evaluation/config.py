"""The evaluation's settings (see pipeline.readers.evaluation.run for what it measures)."""

from __future__ import annotations

from dataclasses import dataclass

ADAPTIVE = "adaptive"  # the budget of adaptive K


@dataclass(frozen=True)
class EvaluationConfig:
    frames: int = 8  # T, frames per video (segment)
    segments: int = 6  # videos cut from each clip
    ks: tuple[int, ...] = (8, 16, 32, 64)  # fixed budgets
    adaptive: bool = True
    k_min: int = 8
    k_max: int = 64
    k_rule: str = "fidelity"  # adaptive K rule, see tokendyn.kmeans
    target_fidelity: float = 0.9
    seed: int = 0
    decoder: str = "decord"
    encode_batch: int = 8  # frames per encoder call (small batches run faster on CPU here)

    def __post_init__(self) -> None:
        if self.frames < 1:
            raise ValueError(f"frames must be >= 1, got {self.frames}")
        if self.segments < 1:
            raise ValueError(f"segments must be >= 1, got {self.segments}")
        if self.encode_batch < 1:
            raise ValueError(f"encode_batch must be >= 1, got {self.encode_batch}")
        if not self.ks and not self.adaptive:
            raise ValueError("nothing to evaluate: give at least one K or keep adaptive on")
        if any(k < 1 for k in self.ks):
            raise ValueError(f"every K must be >= 1, got {list(self.ks)}")
        if self.adaptive and not 1 <= self.k_min <= self.k_max:
            raise ValueError(f"need 1 <= k_min <= k_max, got k_min={self.k_min}, k_max={self.k_max}")
        if self.adaptive and (self.k_rule not in ("fidelity", "elbow") or not 0.0 < self.target_fidelity <= 1.0):
            raise ValueError(f"need k_rule fidelity or elbow and 0 < target_fidelity <= 1, got {self.k_rule!r}, "
                             f"{self.target_fidelity}")

    @property
    def budgets(self) -> list[int | str]:
        return [*sorted(set(self.ks)), *([ADAPTIVE] if self.adaptive else [])]
