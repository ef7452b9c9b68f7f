"""pipeline.readers.search against numpy oracles, and queries by video_id, video file and text on small tables."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from pipeline.job.config import JobConfig
from pipeline.store.contract import contract_of_rows
from pipeline.store.schema import SCHEMA_VERSION, now_utc, video_schema
from pipeline.readers.search import (NoTextTowerError, SearchError, SearchParams, SettingsMismatchError, VideoSearch,
                             maxsim_scores, nearest_to_video)
from pipeline.store.storage import OutputStore

TINY_TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
TINY_IMAGE_SIZE = 64


# ---------------------------------------------------------------------------------------------------------------
# tables of given vectors


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def vector_table(pooled: np.ndarray, bases: list[np.ndarray], *, encoder: str = "efficientnet-lite0",
                 layer: int | None = None, num_frames: int = 4) -> pa.Table:
    """Video rows holding these pooled vectors [n, D] and bases ([K_i, D] each, stored as float16)."""
    n, dim = pooled.shape
    ids = [f"v{i:05d}" for i in range(n)]
    lengths = np.array([len(b) for b in bases])
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    base_rows = pa.FixedSizeListArray.from_arrays(pa.array(np.concatenate(bases).astype(np.float16).ravel()), dim)
    columns = {
        "video_id": pa.array(ids), "uri": pa.array([f"/videos/{i}.mp4" for i in ids]),
        "num_frames": pa.array(np.full(n, num_frames, np.int32)), "encoder": pa.array([encoder] * n),
        "encoder_layer": pa.array([layer] * n, pa.int32()), "dim": pa.array(np.full(n, dim, np.int32)),
        "k": pa.array(lengths.astype(np.int32)), "base": pa.ListArray.from_arrays(offsets, base_rows),
        "pooled": pa.FixedSizeListArray.from_arrays(pa.array(pooled.astype(np.float32).ravel()), dim),
        "schema_version": pa.array(np.full(n, SCHEMA_VERSION, np.int32)),
        "created_at": pa.array([now_utc()] * n, pa.timestamp("us", tz="UTC")),
    }
    schema = video_schema(dim, "float16")
    return pa.Table.from_arrays([columns.get(f.name, pa.nulls(n, f.type)) for f in schema], schema=schema)


def write_store(root, pooled, bases, *, config: dict | None = None, record: bool = True,
                **row_values) -> OutputStore:
    """An output holding these vectors. With `config`: as written before outputs recorded their settings (a run.json
    only); else with recorded settings, as the job writes it (unless record=False)."""
    store = OutputStore(str(root))
    table = vector_table(pooled, bases, **row_values)
    store.write_videos(table)
    if config is not None:
        store.write_run_summary({"config": config})
    elif record:
        encoder = row_values.get("encoder", "efficientnet-lite0")
        job = JobConfig(input="unused", encoder=encoder, frames=row_values.get("num_frames", 4), k=0)
        store.write_settings(contract_of_rows(job, table).as_json("test"))
    return store


def random_vectors(rng, n: int, dim: int, base_sizes=(4,)) -> tuple[np.ndarray, list[np.ndarray]]:
    pooled = rng.standard_normal((n, dim)).astype(np.float32)
    bases = [rng.standard_normal((int(rng.choice(base_sizes)), dim)).astype(np.float32) for _ in range(n)]
    return pooled, bases


def clustered_vectors(rng, n: int, dim: int, clusters: int) -> np.ndarray:
    centres = unit(rng.standard_normal((clusters, dim)))
    return (unit(centres[rng.integers(0, clusters, n)] + 0.4 * unit(rng.standard_normal((n, dim))))
            .astype(np.float32))


def numpy_cosine_top(pooled: np.ndarray, query: np.ndarray, k: int) -> tuple[list[str], np.ndarray]:
    scores = unit(pooled) @ unit(query)
    order = np.argsort(-scores)[:k]
    return [f"v{i:05d}" for i in order], scores[order]


def numpy_maxsim(query_base: np.ndarray, base: np.ndarray) -> float:
    """The oracle, one candidate at a time: sum over query rows of the best cosine with any candidate row."""
    return float(sum(max(float(unit(q) @ unit(c)) for c in base) for q in query_base))


# ---------------------------------------------------------------------------------------------------------------
# vectors against oracles


def test_exact_mode_matches_numpy_brute_force(tmp_path):
    rng = np.random.default_rng(0)
    pooled, bases = random_vectors(rng, 400, 16)
    search = VideoSearch(write_store(tmp_path / "out", pooled, bases))
    for query in rng.standard_normal((5, 16)).astype(np.float32):
        hits = search.by_vectors(query, k=10, mode="exact")
        ids, scores = numpy_cosine_top(pooled, query, 10)
        assert [h.video_id for h in hits] == ids
        np.testing.assert_allclose([h.score for h in hits], scores, atol=1e-5)
        assert hits[0].uri == f"/videos/{ids[0]}.mp4"


def ann_test_set(rng, kind: str, n: int = 3000, dim: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(table vectors [n, dim], 20 queries [20, dim]) of one kind of corpus."""
    if kind == "clustered":  # topics shared by many videos, as in a real corpus
        return clustered_vectors(rng, n, dim, 30), clustered_vectors(rng, 20, dim, 30)
    if kind == "small clusters in large noisy ones":  # queries aim at the 6 clusters of 10 videos each
        small = clustered_vectors(rng, 60, dim, 6)
        queries = small[rng.choice(60, 20)] + 0.05 * rng.standard_normal((20, dim)).astype(np.float32)
        return np.concatenate([clustered_vectors(rng, n - 60, dim, 3), small]), queries
    if kind == "duplicates":  # every video three times: ties at every rank
        videos = clustered_vectors(rng, n // 3, dim, 30)
        return np.concatenate([videos, videos, videos]), clustered_vectors(rng, 20, dim, 30)
    vectors = rng.standard_normal((n + 20, dim)).astype(np.float32)  # structureless noise
    return vectors[:n], vectors[n:]


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("kind, worst, mean", [
    ("clustered", 0.9, 0.98),
    ("small clusters in large noisy ones", 0.7, 0.95),
    ("duplicates", 0.9, 0.98),
    # No IVF index does well here: nearest neighbours are barely nearer than any other vector, and a query visits
    # 20 of the 54 partitions (measured 0.72-0.81 mean, 0.5 for the worst query).
    ("structureless noise", 0.2, 0.5),
])
def test_ann_recall_against_numpy_brute_force(tmp_path, seed, kind, worst, mean):
    rng = np.random.default_rng(seed)
    pooled, queries = ann_test_set(rng, kind)
    search = VideoSearch(write_store(tmp_path / "out", pooled, [p[None] for p in pooled]))
    assert search.build_index(min_rows=1000)
    # The vector index, next to the store's own index on video_id.
    assert sorted(index.columns for index in search.table.list_indices()) == [["pooled"], ["video_id"]]

    recalls = []
    for query in queries:
        hits = search.by_vectors(query, k=10, mode="ann")
        tenth_best = numpy_cosine_top(pooled, query, 10)[1][-1]
        # A hit counts when it scores as well as the 10th best video (duplicates tie).
        recalls.append(np.mean([hit.score >= tenth_best - 1e-5 for hit in hits]) if len(hits) == 10 else 0.0)
    assert min(recalls) >= worst and np.mean(recalls) >= mean, recalls


def test_maxsim_scores_equal_the_numpy_oracle(tmp_path):
    rng = np.random.default_rng(2)
    pooled, bases = random_vectors(rng, 120, 8, base_sizes=(2, 3, 5))  # K varies, as in adaptive mode
    stored = [b.astype(np.float16).astype(np.float32) for b in bases]  # what the float16 table holds
    # Enough candidates to re-rank the whole table, so the re-rank must equal exact MaxSim.
    search = VideoSearch(write_store(tmp_path / "out", pooled, bases), SearchParams(candidates=200))
    query_base = rng.standard_normal((3, 8)).astype(np.float32)
    oracle = np.array([numpy_maxsim(query_base, b) for b in stored])
    order = np.argsort(-oracle)[:5]

    # LanceDB's multivector scan computes in the column's float16, hence its looser tolerance.
    for mode, tolerance in (("maxsim", 1e-5), ("maxsim-exact", 1e-3)):
        hits = search.by_vectors(pooled[0], query_base, k=5, mode=mode)
        assert [h.video_id for h in hits] == [f"v{i:05d}" for i in order], mode
        np.testing.assert_allclose([h.score for h in hits], oracle[order], atol=tolerance, err_msg=mode)


def test_maxsim_scores_handles_bases_of_different_sizes():
    rng = np.random.default_rng(3)
    query, bases = rng.standard_normal((2, 6)), [rng.standard_normal((n, 6)) for n in (1, 4, 2)]
    scores = maxsim_scores(query, np.concatenate(bases), np.array([1, 4, 2]))
    np.testing.assert_allclose(scores, [numpy_maxsim(query, b) for b in bases], atol=1e-5)


def test_query_by_video_id_returns_itself_first_in_exact_mode(tmp_path):
    rng = np.random.default_rng(4)
    pooled, bases = random_vectors(rng, 200, 16)
    store = write_store(tmp_path / "out", pooled, bases)
    search = VideoSearch(store)

    hits = search.by_video_id("v00042", k=5, mode="exact")
    assert hits[0].video_id == "v00042" and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert [h.video_id for h in hits] == numpy_cosine_top(pooled, pooled[42], 5)[0]
    maxsim_hits = search.by_video_id("v00042", k=3, mode="maxsim")
    assert maxsim_hits[0].video_id == "v00042" and maxsim_hits[0].score == pytest.approx(4.0, abs=1e-2)

    others = nearest_to_video(store, "v00042", k=3)  # the job's helper leaves the video itself out
    assert [h["video_id"] for h in others] == [h.video_id for h in hits[1:4]]


def test_unknown_video_id_empty_output_and_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(SearchError, match="holds no videos"):
        VideoSearch(OutputStore(str(tmp_path / "empty"))).by_video_id("x")
    rng = np.random.default_rng(5)
    search = VideoSearch(write_store(tmp_path / "out", *random_vectors(rng, 10, 8)))
    with pytest.raises(SearchError, match="'nope' is not in"):
        search.by_video_id("nope")
    with pytest.raises(SearchError, match="unknown mode"):
        search.by_vectors(np.ones(8), k=3, mode="fuzzy")
    with pytest.raises(SearchError, match="has 5 dims, the table's vectors 8"):
        search.by_vectors(np.ones(5), k=3)


# ---------------------------------------------------------------------------------------------------------------
# settings recorded by the table


def tiny_config(encoder: str, **overrides) -> JobConfig:
    values = dict(input="unused", output="unused", encoder=encoder, frames=4, k=4, decoder="pyav")
    return JobConfig(**{**values, **overrides})


def test_mismatched_encoder_settings_error_before_anything_is_decoded(tmp_path, tiny_siglip_dir):
    rng = np.random.default_rng(6)
    pooled, bases = random_vectors(rng, 5, 32)
    config = dataclasses.asdict(tiny_config(str(tiny_siglip_dir)))
    search = VideoSearch(write_store(tmp_path / "out", pooled, bases, config=config,
                                     encoder=str(tiny_siglip_dir), layer=1))
    missing_file = str(tmp_path / "never-read.mp4")

    settings = search.settings()
    assert (settings.encoder, settings.layer, settings.frames, settings.fps, settings.k) == (
        str(tiny_siglip_dir), 1, 4, None, 4)
    with pytest.raises(SettingsMismatchError, match=r"encoder='efficientnet-lite0' \(table: '.*tiny_siglip"):
        search.by_video(missing_file, encoder="efficientnet-lite0")
    with pytest.raises(SettingsMismatchError, match=r"frames=8 \(table: 4\), k=0 \(table: 4\)"):
        search.by_video(missing_file, frames=8, base_k=0)
    with pytest.raises(SettingsMismatchError, match=r"layer=0 \(table: 1\)"):
        search.by_video(missing_file, layer=0)


def test_settings_come_from_the_recorded_contract_not_the_last_run_json(tmp_path):
    rng = np.random.default_rng(7)
    pooled, bases = random_vectors(rng, 6, 8, base_sizes=(3, 5))
    store = write_store(tmp_path / "out", pooled, bases, num_frames=12)
    store.write_run_summary({"config": dataclasses.asdict(tiny_config("other-encoder", frames=3, k=9, seed=5))})
    settings = VideoSearch(store).settings()
    assert (settings.encoder, settings.frames, settings.fps, settings.k, settings.k_min, settings.k_max) == (
        "efficientnet-lite0", 12, None, None, 8, 64)
    assert settings.compress_kwargs() == {"k": None, "k_min": 8, "k_max": 64, "k_rule": "fidelity",
                                          "target_fidelity": 0.9, "seed": 0}


def test_an_old_output_whose_settings_cannot_be_told_is_refused_clearly(tmp_path):
    rng = np.random.default_rng(7)
    pooled, bases = random_vectors(rng, 6, 8, base_sizes=(3, 5))
    search = VideoSearch(write_store(tmp_path / "out", pooled, bases, num_frames=12, record=False))
    with pytest.raises(SearchError, match=r"records no settings \(settings.json\), and it has no run.json"):
        search.settings()


def test_text_query_on_an_efficientnet_table_errors_clearly(tmp_path):
    rng = np.random.default_rng(8)
    search = VideoSearch(write_store(tmp_path / "out", *random_vectors(rng, 5, 8)))
    with pytest.raises(NoTextTowerError, match="efficientnet-lite0 is an image-only encoder with no text tower"):
        search.by_text("a dog on a skateboard")


def test_text_query_on_a_vision_only_checkpoint_errors_clearly(tmp_path, tiny_siglip_dir):
    rng = np.random.default_rng(9)
    search = VideoSearch(write_store(tmp_path / "out", *random_vectors(rng, 5, 32),
                                     encoder=str(tiny_siglip_dir), layer=1))
    with pytest.raises(NoTextTowerError, match="has no text tower"):
        search.by_text("a dog")


# ---------------------------------------------------------------------------------------------------------------
# a table compressed from real clips by the job's own stages, with a two-tower CLIP as encoder


@pytest.fixture(scope="module")
def tiny_two_tower_clip_dir(tmp_path_factory):
    """A CLIP with both towers (projection 16 < hidden 32), a CLIP tokenizer over a letters-only vocabulary and
    an image processor, saved like a hub checkpoint."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    path = tmp_path_factory.mktemp("tiny_clip_two_tower")
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = [*letters, *(c + "</w>" for c in letters), "<|startoftext|>", "<|endoftext|>"]
    (path / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
    bos, eos = len(vocab) - 2, len(vocab) - 1
    config = CLIPConfig(
        text_config=dict(**TINY_TOWER, vocab_size=len(vocab), max_position_embeddings=32, bos_token_id=bos,
                         eos_token_id=eos, pad_token_id=eos),
        vision_config=dict(**TINY_TOWER, patch_size=16, image_size=TINY_IMAGE_SIZE), projection_dim=16)
    CLIPModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": TINY_IMAGE_SIZE},
                          crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}).save_pretrained(path)
    return path


def compress_with_job_stages(root, clip_paths, config: JobConfig) -> OutputStore:
    """What one run of the job writes for these clips: DecodeStage, EncodeCompressStage, write, run.json (no Ray)."""
    from pipeline.job.errors import ERROR_COLUMNS
    from pipeline.job.sources import canonical_uri, video_id_for
    from pipeline.job.stages import DecodeStage, EncodeCompressStage

    stage = EncodeCompressStage(config)
    # In this process (no time-limit child: starting one costs seconds), otherwise the job's decode stage.
    decode = DecodeStage(dataclasses.replace(config, decode_timeout_s=None), input_size=tuple(stage.encoder.input_size))
    rows = [decode({"video_id": video_id_for(str(path)), "uri": canonical_uri(str(path))}) for path in clip_paths]
    written = stage(pa.Table.from_pylist(rows))
    assert written.column("error_stage").null_count == written.num_rows
    store = OutputStore(str(root))
    store.write_videos(written.drop_columns(list(ERROR_COLUMNS)))
    store.write_run_summary({"config": dataclasses.asdict(config)})
    return store


@pytest.fixture(scope="module")
def clip_table(tmp_path_factory, tiny_two_tower_clip_dir, sample_clip_paths):
    clips = [sample_clip_paths[stem] for stem in ("carphone_pristine", "carphone_distorted", "bikes")]
    root = tmp_path_factory.mktemp("clip_table") / "out"
    store = compress_with_job_stages(root, clips, tiny_config(str(tiny_two_tower_clip_dir)))
    return store, clips


def test_tiny_clip_text_query_runs_end_to_end(clip_table, tiny_two_tower_clip_dir):
    store, clips = clip_table
    search = VideoSearch(store)
    hits = search.by_text("a man on a phone", k=3, mode="exact")
    assert len(hits) == 3 and {h.uri for h in hits} == {str(c) for c in clips}

    # Oracle: the CLIP text embedding mapped through the vision projection's transpose, cosine vs pooled.
    import torch
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(tiny_two_tower_clip_dir).eval()
    tokens = CLIPTokenizer.from_pretrained(tiny_two_tower_clip_dir)(["a man on a phone"], return_tensors="pt")
    with torch.inference_mode():
        text = model.get_text_features(**tokens).pooler_output[0]
        query = (model.visual_projection.weight.T @ text).numpy()
    rows = store.read_videos(columns=["uri", "pooled"]).to_pylist()
    expected = {row["uri"]: float(unit(np.asarray(row["pooled"])) @ unit(query)) for row in rows}
    for hit in hits:
        assert hit.score == pytest.approx(expected[hit.uri], abs=1e-4)
    assert [h.uri for h in hits] == sorted(expected, key=expected.get, reverse=True)

    assert len(search.by_text("a bike", k=2, mode="maxsim")) == 2


def assert_query_video_tokens_are_the_row(store: OutputStore, clip) -> None:
    """The query video's base and map are the ones the job stored for the same file."""
    from pipeline.store.schema import compressed_video_from_row

    row = store.read_videos(filter=pc.field("uri") == str(clip)).to_pylist()[0]
    stored = compressed_video_from_row(row)
    query = VideoSearch(store).compress_like_table(str(clip))
    assert query.k == stored.k
    assert torch.equal(query.dynamics.long(), stored.dynamics.long())
    assert torch.equal(query.base.half().float(), stored.base.float())  # the rows store float16 bases


def test_a_query_video_gets_the_base_and_map_the_job_stored_for_it(clip_table):
    store, clips = clip_table
    assert_query_video_tokens_are_the_row(store, clips[0])


def test_a_clip_file_queried_against_its_table_returns_itself_first(clip_table):
    store, clips = clip_table
    search = VideoSearch(store)
    for mode in ("exact", "maxsim"):
        hits = search.by_video(str(clips[0]), k=3, mode=mode, layer=-2, frames=4, base_k=4)
        assert hits[0].uri == str(clips[0]), mode
        assert hits[0].score == pytest.approx(1.0 if mode == "exact" else 4.0, abs=1e-2)


def test_a_query_video_sampled_by_fps_gets_the_tables_frame_cap(tmp_path, tiny_siglip_dir, sample_clip_paths):
    clip = str(sample_clip_paths["carphone_pristine"])
    store = compress_with_job_stages(tmp_path / "out", [clip], tiny_config(str(tiny_siglip_dir), fps=5.0,
                                                                          max_frames=3))
    row = store.read_videos().to_pylist()[0]
    assert row["num_frames"] == 3
    query = VideoSearch(store).compress_like_table(clip)
    # The same frames went through the same compression: the query's dynamics map is the stored one.
    assert query.dynamics.shape[0] == 3
    assert np.array_equal(query.dynamics.cpu().numpy().reshape(-1), np.frombuffer(row["dynamics"], np.uint8))
    assert_query_video_tokens_are_the_row(store, clip)


def test_a_query_video_gets_the_adaptive_k_rule_of_its_table(tmp_path, tiny_siglip_dir, sample_clip_paths):
    clip = sample_clip_paths["bikes"]
    for rule, target in (("fidelity", 0.95), ("elbow", 0.9)):
        config = tiny_config(str(tiny_siglip_dir), k=0, k_min=2, k_max=9, k_rule=rule, target_fidelity=target)
        store = compress_with_job_stages(tmp_path / rule, [clip], config)
        row = store.read_videos(columns=["k", "dynamics"]).to_pylist()[0]
        query = VideoSearch(store).compress_like_table(str(clip))
        assert (query.k, query.to_storage()["dynamics"]) == (row["k"], row["dynamics"]), rule
        assert_query_video_tokens_are_the_row(store, clip)
