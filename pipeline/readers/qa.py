"""Questions about videos: training pairs from manifest columns, multiple-choice sets and their scoring.

Training pairs (`QuestionAnswerDataset`): an answer column (a string, or a list of strings for several per video)
and an optional question column (a string, or a list with one question per answer). Each time a video is drawn
one of its pairs is chosen at random, so shards keep one item per video (equal across DDP ranks).

Multiple-choice sets (`read_multiple_choice`), as NextQA-MC: a CSV, JSON Lines or Parquet file with the columns

    video_id or uri   the video (an id of the cache asked, or a video file / s3:// uri)
    question          the question
    options           the answers to choose from: a list column (CSV: a JSON list, e.g. ["left", "right"])
    answer            the index of the right option (0-based)

Each option is scored by the model's log-likelihood given the video and the question, summed over its tokens and
divided by their number (both reported); the model's own generated short answer is also compared with the right
option after normalisation (exact match).
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import Dataset

from pipeline.readers.cache import CachedTokenDataset, MissingColumnError, collate_videos
from pipeline.readers.evaluation.probe import accuracy_interval
from pipeline.store.contract import SettingsUnknown

VIDEO_INPUTS = ("base", "dynamics", "base_mask")
MC_SCORES = ("likelihood", "mean-likelihood", "exact-match")


# ---------------------------------------------------------------------------------------------------------------
# training pairs


class QuestionAnswerDataset(Dataset):
    """The items of a CachedTokenDataset, each with "question" (None: the caption question) and "answer"."""

    def __init__(self, videos: CachedTokenDataset, answer_column: str, question_column: str | None = None):
        if question_column is not None and question_column not in videos.rows.column_names:
            raise MissingColumnError(f"the cache has no column {question_column!r}; its columns are "
                                     f"{videos.rows.column_names}")
        self.videos, self.answer_column, self.question_column = videos, answer_column, question_column
        try:
            self.contract = videos.settings()  # what the tokens were made with; recorded in checkpoints
        except SettingsUnknown:
            self.contract = None

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, index: int) -> dict:
        return self.with_pair(self.videos[index])

    def with_pair(self, item: dict) -> dict:
        """item + "question", "answer": its pair, or one of its pairs drawn at random."""
        answers = item[self.answer_column]
        questions = item[self.question_column] if self.question_column else None
        if isinstance(answers, list):
            if questions is not None and (not isinstance(questions, list) or len(questions) != len(answers)):
                raise ValueError(f"video {item['video_id']!r}: {len(answers)} answers need as many questions, "
                                 f"got {questions!r}")
            pick = int(torch.randint(len(answers), ()))
            answers, questions = answers[pick], questions[pick] if questions is not None else None
        return {**item, "question": questions or None, "answer": answers}

    # the rest is the cache's
    @property
    def dim(self) -> int:
        return self.videos.dim

    @property
    def rank(self) -> int:
        return self.videos.rank

    @property
    def world_size(self) -> int:
        return self.videos.world_size

    @property
    def rows(self) -> pa.Table:
        return self.videos.rows

    def settings(self):
        return self.videos.settings()


# ---------------------------------------------------------------------------------------------------------------
# multiple choice


def read_multiple_choice(path: str | Path) -> list[dict]:
    """The questions of a multiple-choice set (see the module docstring), checked; a ValueError names the row."""
    import pyarrow.csv
    import pyarrow.json
    import pyarrow.parquet

    suffix = Path(path).suffix.lower()
    readers = {".csv": pyarrow.csv.read_csv, ".jsonl": pyarrow.json.read_json, ".ndjson": pyarrow.json.read_json,
               ".parquet": pyarrow.parquet.read_table}
    if suffix not in readers:
        raise ValueError(f"{path}: a multiple-choice set is a .csv, .jsonl or .parquet file")
    rows = readers[suffix](str(path)).to_pylist()
    for line, row in enumerate(rows, start=1):
        where = f"{path}, row {line}"
        if not (row.get("video_id") or row.get("uri")):
            raise ValueError(f"{where}: needs a video_id or a uri")
        if not isinstance(row.get("question"), str) or not row["question"].strip():
            raise ValueError(f"{where}: needs a question")
        options = row.get("options")
        if isinstance(options, str):
            try:
                options = json.loads(options)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: options must be a list (in CSV, a JSON list): {error}") from error
        if not isinstance(options, list) or len(options) < 2 or not all(
                isinstance(option, str) and option.strip() for option in options):
            raise ValueError(f"{where}: options must be a list of at least 2 non-empty strings, got {options!r}")
        answer = row.get("answer")
        if not isinstance(answer, int) or not 0 <= answer < len(options):
            raise ValueError(f"{where}: answer must be the index of the right option in 0..{len(options) - 1}, "
                             f"got {answer!r}")
        row["options"] = options
    return rows


def normalise_answer(text: str) -> str:
    """Lower case, no punctuation, no leading article, single spaces: how a short answer is compared."""
    words = text.lower().translate(str.maketrans("", "", string.punctuation)).split()
    return " ".join(words[1:] if words[:1] in (["a"], ["an"], ["the"]) else words)


@torch.no_grad()
def score_multiple_choice(model, tokenizer, questions: list[dict], items: list[dict], *,
                          batch_size: int = 8, max_new_tokens: int = 8) -> list[dict]:
    """Each question scored against its video's item (items[i]: the video of questions[i]).

    Returns one record per question: the chosen option by summed and by mean log-likelihood, the generated answer,
    and whether each is right."""
    records = []
    device = next(model.parameters()).device
    for start in range(0, len(questions), batch_size):
        chunk = questions[start:start + batch_size]
        batch = collate_videos(items[start:start + batch_size])
        videos = {name: batch[name].to(device) for name in VIDEO_INPUTS}
        texts = [question["question"] for question in chunk]
        sums, counts = model.option_log_likelihoods(tokenizer, **videos, questions=texts,
                                                    options=[question["options"] for question in chunk])
        means = sums / counts.clamp_min(1)
        generated = model.generate_captions(tokenizer, **videos, max_new_tokens=max_new_tokens, questions=texts)
        for row, question in enumerate(chunk):
            truth = question["answer"]
            records.append({
                "video_id": question.get("video_id"), "uri": question.get("uri"), "question": question["question"], "answer": truth,
                "likelihood": int(sums[row].argmax()), "mean-likelihood": int(means[row].argmax()),
                "generated": generated[row],
                "likelihood_correct": int(sums[row].argmax()) == truth,
                "mean-likelihood_correct": int(means[row].argmax()) == truth,
                "exact-match_correct": normalise_answer(generated[row]) == normalise_answer(
                    question["options"][truth]),
            })
    return records


def multiple_choice_accuracy(records: Iterable[dict]) -> dict[str, tuple[float, float, float]]:
    """{score: (accuracy, 95 % interval low, high)} over the questions (a bootstrap over them)."""
    records = list(records)
    return {score: accuracy_interval(np.array([[record[f"{score}_correct"] for record in records]]))
            for score in MC_SCORES}
