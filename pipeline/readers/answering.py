"""Asking a trained video LLM about videos: cached tokens or new video files in, answers out.

`VideoAnswerer` holds one checkpoint's model. A video reaches it either as a cached item (pipeline.readers.cache)
or as a uri that it tokenises with `VideoTokenizer` under the settings the checkpoint's cache recorded, through
the same float16 storage rounding as the cache (`item_from_video`): one video gives the same tokens, and so the
same answer, either way. Tokens made with other settings, or of another width, are refused (`CheckpointMismatch`).

Many videos go through Ray Data with `VideoAnswerer` as the actor of a pool (`answer_rows` is its batch body) and
the answers land in an `AnswerFiles` folder: part-*.parquet files, each written whole under a temporary name and
then renamed, holding (video_id, uri, question, answer, error, checkpoint, checkpoint_step, llm). A rerun skips
the (video, question) pairs already in a part file, so a killed run resumes where its last file ended.
"""

from __future__ import annotations

import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.job.tokenizer import DecodeError, VideoTokenizer
from pipeline.readers.cache import TENSOR_KEYS, collate_videos, item_from_video, python_value
from pipeline.readers.checkpoint import (
    CheckpointMismatch, check_cache, contract_for_new_videos, load_trained_model, video_contract,
)
from pipeline.store.contract import OutputContract
from pipeline.store.filesystem import filesystem_for

ANSWER_SCHEMA = pa.schema([
    pa.field("video_id", pa.string(), nullable=False),
    pa.field("uri", pa.string()),
    pa.field("question", pa.string()),  # null: the caption question (the video was described)
    pa.field("answer", pa.string()),  # null when the video could not be read (see error)
    pa.field("error", pa.string()),
    pa.field("checkpoint", pa.string()),
    pa.field("checkpoint_step", pa.int64()),
    pa.field("llm", pa.string()),
])
# Failures of one video that become its error row; anything else is a bug and stops the run.
VIDEO_ERRORS = (DecodeError, OSError, ValueError)


class VideoAnswerer:
    """One checkpoint's model with its tokenizer, answering batches of videos.

    checkpoint: a checkpoint-<step> folder or a --checkpoint-dir (its last one). question: asked of every video (None:
    the caption question the model was trained with). threads: CPU threads of torch (a Ray actor's share).
    """

    def __init__(self, checkpoint: str, *, question: str | None = None, device: str = "cpu",
                 max_new_tokens: int = 32, s3_endpoint_url: str | None = None, threads: int | None = None,
                 llm=None):
        if threads:
            torch.set_num_threads(threads)
        self.model, self.tokenizer, self.state, self.checkpoint = load_trained_model(checkpoint, device=device,
                                                                                     llm=llm)
        self.step, self.question, self.device = self.state["step"], question, device
        self.max_new_tokens, self.s3_endpoint_url = max_new_tokens, s3_endpoint_url
        self.contract = video_contract(self.state, str(self.checkpoint))
        self._video_tokenizer: VideoTokenizer | None = None

    # ---- tokens ---------------------------------------------------------------------------------------------------
    def check_cache(self, cache_contract: OutputContract | None, dim: int, where: str) -> None:
        """Refuse a cache whose tokens the model was not trained on (other settings, or another width)."""
        check_cache(self.state, self.checkpoint, cache_contract, dim, where)

    @property
    def video_tokenizer(self) -> VideoTokenizer:
        if self._video_tokenizer is None:
            self._video_tokenizer = VideoTokenizer(contract_for_new_videos(self.state, self.checkpoint),
                                                   device=self.device, s3_endpoint_url=self.s3_endpoint_url)
        return self._video_tokenizer

    def item_from_uri(self, row: dict) -> dict:
        """A new video (row: video_id, uri, ...) -> the item its cached tokens would be."""
        _, video = self.video_tokenizer.tokenize(row["uri"])
        item = item_from_video(video, self.contract.base_dtype, **row)
        self.check_cache(None, item["base"].shape[-1], row["uri"])
        return item

    def item_or_error(self, row: dict) -> dict | Exception:
        """`item_from_uri`, or the error that keeps this one video from being read (the error policy: it becomes
        the video's error row). A checkpoint that cannot tokenise new videos at all stops the caller instead."""
        try:
            return self.item_from_uri(row)
        except CheckpointMismatch:
            raise
        except VIDEO_ERRORS as error:
            return error

    # ---- answers --------------------------------------------------------------------------------------------------
    def answer(self, items: list[dict], questions: list[str | None] | None = None) -> list[str]:
        """Greedy answers for a batch of items, each to its question (default: the answerer's question)."""
        batch = collate_videos(items)
        videos = {name: batch[name].to(self.device) for name in ("base", "dynamics", "base_mask")}
        return self.model.generate_captions(self.tokenizer, **videos, max_new_tokens=self.max_new_tokens,
                                            questions=questions or [self.question] * len(items))

    def answer_rows(self, rows: list[dict]) -> pa.Table:
        """Rows of cached items or of uris -> their answer rows (ANSWER_SCHEMA); a video that cannot be read
        becomes a row with its error and no answer."""
        items, records = [], []
        for row in rows:
            record = {"video_id": row["video_id"], "uri": row.get("uri"), "question": self.question,
                      "answer": None, "error": None, "checkpoint": str(self.checkpoint),
                      "checkpoint_step": self.step, "llm": self.model.llm_name}
            item = row if "base" in row else self.item_or_error(row)
            if isinstance(item, Exception):
                record["error"] = f"{type(item).__name__}: {item}"
            else:
                items.append(item)
            records.append(record)
        answers = iter(self.answer(items) if items else [])
        for record in records:
            if record["error"] is None:
                record["answer"] = next(answers)
        return pa.Table.from_pylist(records, schema=ANSWER_SCHEMA)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """Ray Data batch body: a batch of cached items (pipeline.readers.cache.ray_dataset) or of uri rows."""
        rows = []
        for i in range(len(batch["video_id"])):
            row = {name: python_value(batch[name][i]) for name in ("video_id", "uri")}
            if "base" in batch:  # a copy of each tensor: Ray's buffers are read-only
                row.update({name: torch.from_numpy(np.array(batch[name][i])) for name in TENSOR_KEYS})
            rows.append(row)
        return self.answer_rows(rows)


class AnswerFiles:
    """A folder of answer part files (local path or s3://): what is answered, and writing more."""

    PART_PREFIX, TEMPORARY_SUFFIX = "part-", ".parquet.partial"

    def __init__(self, root: str, *, s3_endpoint_url: str | None = None):
        self.root = root
        self.fs, self.path = filesystem_for(root, s3_endpoint_url)
        self.fs.create_dir(self.path, recursive=True)

    def _files(self):
        from pyarrow.fs import FileSelector

        return self.fs.get_file_info(FileSelector(self.path, allow_not_found=True))

    def remove_partial_files(self) -> int:
        """Delete the files a killed run left half-written; returns how many."""
        partial = [info.path for info in self._files() if info.base_name.endswith(self.TEMPORARY_SUFFIX)]
        for path in partial:
            self.fs.delete_file(path)
        return len(partial)

    def read(self) -> pa.Table:
        parts = sorted(info.path for info in self._files() if info.base_name.startswith(self.PART_PREFIX)
                       and info.base_name.endswith(".parquet"))
        tables = [pq.read_table(path, filesystem=self.fs) for path in parts]
        return pa.concat_tables(tables).cast(ANSWER_SCHEMA) if tables else ANSWER_SCHEMA.empty_table()

    def answered(self) -> set[tuple[str, str | None]]:
        """(video_id, question) of every answer or error row written so far."""
        table = self.read()
        return set(zip(table.column("video_id").to_pylist(), table.column("question").to_pylist()))

    def write(self, table: pa.Table) -> str:
        """One part file, written under a temporary name and renamed: readers never see half of one."""
        name = f"{self.PART_PREFIX}{uuid.uuid4().hex}"
        partial, final = (f"{self.path}/{name}{suffix}" for suffix in (self.TEMPORARY_SUFFIX, ".parquet"))
        pq.write_table(table.cast(ANSWER_SCHEMA), partial, filesystem=self.fs)
        self.fs.move(partial, final)
        return final
