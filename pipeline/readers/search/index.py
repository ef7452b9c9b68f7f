"""VideoSearch: similarity search over the job's LanceDB table: pooled-vector ANN, exact scans, MaxSim over bases.

A query is a pooled vector [D] and, for MaxSim, a query base [Kq, D]. It comes from a stored video (`by_video_id`),
a video file compressed exactly the way the table's videos were (`by_video`), a text embedded by the encoder's
text tower (`by_text`), or raw vectors (`by_vectors`). Results are `Hit(video_id, uri, score)`, best first.

Modes (`MODES`):
  ann           LanceDB vector search on `pooled`, cosine, through the job's IVF index when one exists (see
                `build_index`; tables under MIN_ROWS_FOR_VECTOR_INDEX rows have none and are scanned exactly).
                Quantised codes rank coarsely, so `refine_factor` re-scores refine_factor * k candidates with the
                full vectors. Score: cosine similarity.
  exact         the same search with the index bypassed: a brute-force cosine scan. Score: cosine similarity.
  maxsim        re-rank: `candidates` videos from the pooled ANN search, re-scored by MaxSim over their bases.
  maxsim-exact  LanceDB multivector search on `base` over every row (brute force; slow on large tables).
MaxSim(Q, C) = sum over query rows q of max over candidate rows c of cos(q, c), in [-Kq, Kq] (ColBERT's late
interaction); with a one-row query (text) it is the best cosine between the query and any base vector.
The text notes are in pipeline.readers.search.text; the MaxSim maths in pipeline.readers.search.maxsim.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.readers.search.errors import SearchError, SettingsMismatchError
from pipeline.readers.search.maxsim import bases_as_rows, maxsim_scores
from pipeline.readers.search.text import TextTower, load_text_tower
from pipeline.store.contract import ContractError, OutputContract, read_contract, same_encoder
from pipeline.store.storage import MIN_ROWS_FOR_VECTOR_INDEX, OutputStore

MODES = ("ann", "exact", "maxsim", "maxsim-exact")
RESULT_COLUMNS = ["video_id", "uri", "_distance"]


@dataclass(frozen=True)
class Hit:
    video_id: str
    uri: str
    score: float

    def as_dict(self) -> dict[str, Any]:
        return {"video_id": self.video_id, "uri": self.uri, "score": self.score}


@dataclass(frozen=True)
class SearchParams:
    """Knobs of the ANN search. The defaults reach recall@10 >= 0.95 at 100k videos (jobs/bench_search.py)."""

    nprobes: int = 20  # IVF partitions visited per query
    refine_factor: int | None = 5  # re-score refine_factor * limit candidates with the full vectors
    candidates: int = 100  # pooled-ANN candidates re-ranked by MaxSim (at least k)


# ---------------------------------------------------------------------------------------------------------------
# reading what the table records


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _differs(name: str, asked: Any, held: Any) -> bool:
    if name == "encoder":
        return not same_encoder(asked, held)
    if name == "k":
        return (asked or None) != held  # k=0 asks for adaptive K, recorded as None
    return asked != held


def _check_requested(recorded: OutputContract, requested: dict[str, Any], root: str) -> None:
    """Raise SettingsMismatchError naming every requested setting that differs from the recorded one."""
    differences = [f"{name}={asked!r} (table: {getattr(recorded, name)!r})" for name, asked in requested.items()
                   if asked is not None and _differs(name, asked, getattr(recorded, name))]
    if differences:
        raise SettingsMismatchError(
            f"the query asks for {', '.join(differences)}, but the videos in {root} were compressed otherwise; "
            "a query video must be compressed the same way to be comparable (leave these out to use the "
            "table's settings)")


# ---------------------------------------------------------------------------------------------------------------
# the search API


@dataclass
class VideoSearch:
    """Search one output root. Opening is cheap; encoders and text towers load on first use and are kept."""

    store: OutputStore
    params: SearchParams = field(default_factory=SearchParams)

    def __post_init__(self) -> None:
        self._table = None
        self._settings: OutputContract | None = None
        self._encoders: dict[tuple, Any] = {}
        self._text_tower: TextTower | None = None

    @classmethod
    def open(cls, root: str, s3_endpoint_url: str | None = None, **params: Any) -> VideoSearch:
        return cls(OutputStore(root, s3_endpoint_url), SearchParams(**params))

    # ---- table ------------------------------------------------------------------------------------------------
    @property
    def table(self):
        if self._table is None:
            self._table = self.store.lance_table()
            if self._table is None:
                raise SearchError(f"{self.store.root} holds no videos yet (no LanceDB table)")
        return self._table

    @property
    def dim(self) -> int:
        return self.table.schema.field("pooled").type.list_size

    def settings(self) -> OutputContract:
        """The settings the table's videos were made with: the output's recorded contract (pipeline.store.contract)."""
        if self._settings is None:
            try:
                self._settings = read_contract(self.store)
            except ContractError as error:
                raise SearchError(str(error)) from error
            if self._settings is None:
                raise SearchError(f"{self.store.root} holds no videos yet")
        return self._settings

    def build_index(self, min_rows: int = MIN_ROWS_FOR_VECTOR_INDEX) -> bool:
        """Build or rebuild the job's IVF index on `pooled` (cosine). False when the table is under `min_rows`."""
        built = self.store.build_vector_index(min_rows=min_rows)
        self._table = None  # reopen to see the new index version
        return built

    # ---- queries ----------------------------------------------------------------------------------------------
    def by_vectors(self, pooled: np.ndarray, base: np.ndarray | None = None, k: int = 10,
                   mode: str = "ann") -> list[Hit]:
        """The k best videos for a pooled vector [D] (ann, exact) or a query base [Kq, D] (maxsim modes)."""
        _check_mode_and_k(mode, k)
        pooled = self._as_query(pooled, "pooled vector").reshape(-1)
        if mode in ("ann", "exact"):
            return self._pooled_search(pooled, k, exact=mode == "exact")
        if base is None:
            raise SearchError(f"mode {mode!r} needs a query base [Kq, D]")
        base = self._as_query(base, "query base").reshape(-1, self.dim)
        if mode == "maxsim":
            return self._maxsim_rerank(pooled, base, k)
        return self._maxsim_scan(base, k)

    def by_video_id(self, video_id: str, k: int = 10, mode: str = "ann", include_self: bool = True) -> list[Hit]:
        """The k videos nearest to a stored video (itself included first unless include_self=False)."""
        _check_mode_and_k(mode, k)
        found = (self.table.search().where(f"video_id = {_quote(video_id)}").select(["pooled", "base"])
                 .limit(1).to_arrow())
        if found.num_rows == 0:
            raise SearchError(f"video_id {video_id!r} is not in {self.store.root}")
        pooled = found.column("pooled").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        base, _ = bases_as_rows(found.column("base"), self.dim)
        hits = self.by_vectors(pooled, base, k + (0 if include_self else 1), mode)
        if not include_self:
            hits = [hit for hit in hits if hit.video_id != video_id][:k]
        return hits

    def by_video(self, source, k: int = 10, mode: str = "ann", *, encoder: str | None = None,
                 layer: int | None = None, frames: int | None = None, fps: float | None = None,
                 base_k: int | None = None, decoder: str | None = None, device: str = "cpu",
                 s3_endpoint_url: str | None = None) -> list[Hit]:
        """The k videos nearest to a video file (local path, s3:// uri or bytes).

        The file is decoded, encoded and compressed with the settings the table records. encoder, layer, frames,
        fps and base_k (the token-base size; 0 = adaptive) may be given to state what the caller expects: any
        that differs from the table raises SettingsMismatchError. decoder and device only change how, not what.
        """
        _check_mode_and_k(mode, k)
        video = self.compress_like_table(source, encoder=encoder, layer=layer, frames=frames, fps=fps,
                                         base_k=base_k, decoder=decoder, device=device,
                                         s3_endpoint_url=s3_endpoint_url)
        pooled = video.pooled().float().cpu().numpy()
        base = video.base.float().cpu().numpy()
        return self.by_vectors(pooled, base, k, mode)

    def by_text(self, text: str, k: int = 10, mode: str = "ann") -> list[Hit]:
        """The k videos nearest to a text, embedded by the text tower of the table's encoder (SigLIP, CLIP).

        Only meaningful when the table's pooled vectors come from the vision tower's projected output; see the
        module notes. In the maxsim modes the text is a one-row query: its best cosine with any base vector.
        """
        _check_mode_and_k(mode, k)
        if not text.strip():
            raise SearchError("empty text query")
        settings = self.settings()
        if self._text_tower is None:
            self._text_tower = load_text_tower(settings.encoder)
        query = self._text_tower.query_vector(text, self.dim)
        return self.by_vectors(query, query[None, :], k, mode)

    # ---- query video compression ------------------------------------------------------------------------------
    def compress_like_table(self, source, *, encoder=None, layer=None, frames=None, fps=None, base_k=None,
                            decoder=None, device="cpu", s3_endpoint_url=None):
        """Decode, encode and compress a video exactly as the table's videos were -> tokendyn.CompressedVideo."""
        from pipeline.job.tokenizer import VideoTokenizer

        recorded = self.settings()
        _check_requested(recorded, {"encoder": encoder, "frames": frames, "fps": fps, "k": base_k}, self.store.root)
        tokenizer = VideoTokenizer(recorded, encoder=self._encoder(recorded, layer, device), decoder=decoder,
                                   s3_endpoint_url=s3_endpoint_url or self.store.s3_endpoint_url)
        return tokenizer.tokenize(source)[1]

    def _encoder(self, recorded: OutputContract, layer: int | None, device: str):
        """The table's encoder at the table's layer; a requested layer must resolve to the recorded one."""
        from pipeline.job.tokenizer import load_encoder

        if recorded.layer is None and layer is not None:
            _check_requested(recorded, {"layer": layer}, self.store.root)
        key = (recorded.encoder, recorded.layer if layer is None else layer, device)
        if key not in self._encoders:
            self._encoders[key] = load_encoder(recorded.encoder, layer=key[1], device=device,
                                               input_size=recorded.settings.get("input_size"))
        model = self._encoders[key]
        # Negative layers resolve against the model's depth, so the comparison happens after loading.
        _check_requested(recorded, {"layer": model.layer}, self.store.root)
        if model.dim != recorded.dim:
            raise SettingsMismatchError(f"{recorded.encoder} now gives {model.dim}-dim tokens, the table holds "
                                        f"{recorded.dim}-dim ones: the checkpoint changed since the table was built")
        return model

    # ---- the searches -----------------------------------------------------------------------------------------
    def _as_query(self, vectors: np.ndarray, what: str) -> np.ndarray:
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.shape[-1] != self.dim:
            raise SearchError(f"{what} has {vectors.shape[-1]} dims, the table's vectors {self.dim}")
        return vectors

    def _pooled_query(self, pooled: np.ndarray, limit: int, exact: bool):
        query = self.table.search(pooled, vector_column_name="pooled").distance_type("cosine").limit(limit)
        if exact:
            return query.bypass_vector_index()
        query = query.nprobes(self.params.nprobes)
        return query.refine_factor(self.params.refine_factor) if self.params.refine_factor else query

    def _pooled_search(self, pooled: np.ndarray, k: int, exact: bool) -> list[Hit]:
        found = self._pooled_query(pooled, k, exact).select(RESULT_COLUMNS).to_arrow()
        # LanceDB's cosine distance is 1 - cosine similarity.
        return _hits(found, 1.0 - found.column("_distance").to_numpy())

    def _maxsim_rerank(self, pooled: np.ndarray, base: np.ndarray, k: int) -> list[Hit]:
        limit = max(k, self.params.candidates)
        found = self._pooled_query(pooled, limit, exact=False).select([*RESULT_COLUMNS, "base"]).to_arrow()
        rows, lengths = bases_as_rows(found.column("base"), self.dim)
        scores = maxsim_scores(base, rows, lengths)
        best = np.argsort(-scores, kind="stable")[:k]
        return _hits(found.take(pa.array(best)), scores[best])

    def _maxsim_scan(self, base: np.ndarray, k: int) -> list[Hit]:
        found = (self.table.search(base, vector_column_name="base").distance_type("cosine").limit(k)
                 .select(RESULT_COLUMNS).to_arrow())
        # LanceDB's multivector cosine distance is the sum over query rows of (1 - max cosine) = Kq - MaxSim.
        return _hits(found, len(base) - found.column("_distance").to_numpy())


def _check_mode_and_k(mode: str, k: int) -> None:
    if mode not in MODES:
        raise SearchError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if k < 1:
        raise SearchError(f"k must be >= 1, got {k}")


def _hits(found: pa.Table, scores: np.ndarray) -> list[Hit]:
    ids, uris = found.column("video_id").to_pylist(), found.column("uri").to_pylist()
    return [Hit(video_id, uri, float(score)) for video_id, uri, score in zip(ids, uris, scores)]


def nearest_to_video(store: OutputStore, video_id: str, k: int = 3) -> list[dict]:
    """The k videos whose pooled vectors are closest (cosine) to `video_id`'s, itself excluded."""
    hits = VideoSearch(store).by_video_id(video_id, k=k, mode="ann", include_self=False)
    return [hit.as_dict() for hit in hits]
