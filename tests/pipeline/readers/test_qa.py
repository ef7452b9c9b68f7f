"""Questions in the video LLM (pipeline.readers.video_lm, pipeline.readers.qa): multiple-choice log-likelihoods
against a hand computation on a tiny LM, one answer alone and in a batch of other-length questions, the question in
the prompt, and the reading of training pairs and multiple-choice sets."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from pipeline.readers.qa import (
    QuestionAnswerDataset, multiple_choice_accuracy, normalise_answer, read_multiple_choice, score_multiple_choice,
)
from pipeline.readers.video_lm import PromptFormat, VideoPrefixLM, load_llm

DIM, FRAMES, GRID = 16, 3, (2, 2)
QUESTIONS = ["Which way?", "What colour is the small object in the corner?"]
OPTIONS = [["left", "right", "up and then down"], ["red", "a pale yellow"]]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tiny_video_lm):
    return tiny_video_lm


def videos(ks: list[int], seed: int = 0) -> dict:
    """A right-padded batch as collate_videos makes it, with garbage in the padding."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.full((len(ks), max(ks), DIM), 1e3)
    mask = torch.zeros(len(ks), max(ks), dtype=torch.bool)
    for row, k in enumerate(ks):
        base[row, :k], mask[row, :k] = torch.randn(k, DIM, generator=generator), True
    dynamics = torch.stack([torch.randint(0, k, (FRAMES, *GRID), generator=generator) for k in ks])
    return {"base": base, "dynamics": dynamics, "base_mask": mask}


def hand_log_likelihood(model, tokenizer, video: dict, row: int, question: str, option: str) -> float:
    """One video, one option, no padding anywhere: sum of log p(option token | everything before it)."""
    k = int(video["base_mask"][row].sum())
    prefix = model.video_embeddings(video["base"][row:row + 1, :k], video["dynamics"][row:row + 1],
                                    video["base_mask"][row:row + 1, :k])
    prompt = PromptFormat().ids(tokenizer, question)
    option_ids = tokenizer(option, add_special_tokens=False)["input_ids"]
    text = model.lm.get_input_embeddings()(torch.tensor([prompt + option_ids]))
    logits = model.lm(inputs_embeds=torch.cat([prefix, text], dim=1)).logits[0]
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    first = k + len(prompt)  # position of the first option token
    return sum(log_probs[position - 1, token].item() for position, token in enumerate(option_ids, start=first))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_option_log_likelihoods_match_a_hand_computation(tiny, seed):
    model, tokenizer = tiny
    batch = videos([5, 2], seed)
    with torch.no_grad():
        sums, counts = model.option_log_likelihoods(tokenizer, **batch, questions=QUESTIONS, options=OPTIONS)
        for row, (question, options) in enumerate(zip(QUESTIONS, OPTIONS)):
            for column, option in enumerate(options):
                expected = hand_log_likelihood(model, tokenizer, batch, row, question, option)
                assert sums[row, column].item() == pytest.approx(expected, abs=1e-3), (row, option)
                assert counts[row, column] == len(tokenizer(option, add_special_tokens=False)["input_ids"])
    assert sums[1, 2] == float("-inf") and counts[1, 2] == 0  # the second video has only two options


def test_an_answer_is_the_same_alone_and_among_other_length_questions(tiny):
    model, tokenizer = tiny
    batch = videos([6, 3, 1], seed=4)
    questions = ["Why?", "What happens in this video from its first frame to its last?", None]
    together = model.generate_captions(tokenizer, **batch, max_new_tokens=6, questions=questions)
    for row in range(3):
        alone = {name: value[row:row + 1] for name, value in batch.items()}
        assert model.generate_captions(tokenizer, **alone, max_new_tokens=6, questions=questions[row:row + 1]) == [
            together[row]]


def test_the_question_replaces_the_caption_prompt_and_is_no_target(tiny):
    model, tokenizer = tiny
    text = model.text_batch(tokenizer, ["yes", "no"], ["Is it red?", None])
    for row, question in enumerate(["Is it red?", None]):
        prompt = PromptFormat().ids(tokenizer, question)
        assert text["input_ids"][row, :len(prompt)].tolist() == prompt
        assert (text["labels"][row, :len(prompt)] == -100).all()
    assert "Is it red?" in tokenizer.decode(text["input_ids"][0])
    assert "Describe the video." in tokenizer.decode(text["input_ids"][1])


def cached_items(batch: dict, k: int) -> list[dict]:
    """The rows of a batch of k-token videos as the cache's items."""
    return [{"base": batch["base"][row, :k], "dynamics": batch["dynamics"][row],
             "cluster_sizes": torch.ones(k, dtype=torch.long)} for row in range(len(batch["base"]))]


def test_multiple_choice_picks_the_likeliest_option_and_scores_exact_match(tiny):
    model, tokenizer = tiny
    batch = videos([4, 4], seed=1)
    items = cached_items(batch, 4)
    with torch.no_grad():
        sums, counts = model.option_log_likelihoods(tokenizer, **batch, questions=QUESTIONS, options=OPTIONS)
    best = [int(sums[row].argmax()) for row in range(2)]
    worst = [int(torch.where(torch.isinf(sums[row]), float("inf"), sums[row]).argmin()) for row in range(2)]
    questions = [{"video_id": str(row), "question": QUESTIONS[row], "options": OPTIONS[row], "answer": answer}
                 for row, answer in enumerate(best)]
    records = score_multiple_choice(model, tokenizer, questions, items, batch_size=1)
    assert [record["likelihood"] for record in records] == best
    assert multiple_choice_accuracy(records)["likelihood"][0] == 1.0
    wrong = [{**question, "answer": answer} for question, answer in zip(questions, worst)]
    assert multiple_choice_accuracy(score_multiple_choice(model, tokenizer, wrong, items))["likelihood"][0] == 0.0
    # exact match compares the generated answer with the right option, normalised
    class Says(type(model)):  # the same model, answering with fixed text
        def generate_captions(self, *args, **kwargs):
            return ["The Left.", "a pale  yellow"]

    model.__class__, original = Says, model.__class__
    try:
        records = score_multiple_choice(model, tokenizer, [{**question, "answer": answer} for question, answer in
                                                           zip(questions, [0, 1])], items)
    finally:
        model.__class__ = original
    assert [record["exact-match_correct"] for record in records] == [True, True]
    assert [record["generated"] for record in records] == ["The Left.", "a pale  yellow"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_multiple_choice_on_a_cuda_model_scores_as_on_the_cpu(tiny):
    model, tokenizer = tiny
    items = cached_items(videos([4, 4], seed=2), 4)
    questions = [{"video_id": str(row), "question": QUESTIONS[row], "options": OPTIONS[row], "answer": 0}
                 for row in range(2)]
    on_cpu = score_multiple_choice(model, tokenizer, questions, items)
    # the cache's items stay on the CPU; the scorer moves each batch to the model
    on_gpu = score_multiple_choice(copy.deepcopy(model).cuda(), tokenizer, questions, items)
    assert [(record["likelihood"], record["generated"]) for record in on_gpu] == [
        (record["likelihood"], record["generated"]) for record in on_cpu]


def test_normalised_answers():
    assert normalise_answer("The Red circle.") == "red circle" == normalise_answer("  red   circle ")
    assert normalise_answer("Left!") == "left" and normalise_answer("an apple") == "apple"


def test_multiple_choice_sets_are_read_and_checked(tmp_path):
    good = tmp_path / "set.csv"
    good.write_text('video_id,question,options,answer\nv1,Which way?,"[""left"", ""right""]",1\n')
    assert read_multiple_choice(good) == [{"video_id": "v1", "question": "Which way?", "options": ["left", "right"],
                                           "answer": 1}]
    cases = {
        '{"question": "q", "options": ["a", "b"], "answer": 0}': "video_id or a uri",
        '{"video_id": "v", "question": "q", "options": ["a"], "answer": 0}': "at least 2",
        '{"video_id": "v", "question": "q", "options": ["a", "b"], "answer": 2}': "index of the right option",
        '{"video_id": "v", "question": "", "options": ["a", "b"], "answer": 0}': "needs a question",
    }
    for line, message in cases.items():
        bad = tmp_path / "bad.jsonl"
        bad.write_text(line + "\n")
        with pytest.raises(ValueError, match=message):
            read_multiple_choice(bad)


class FakeVideos:
    """Stands in for a CachedTokenDataset: rows with list or plain answer columns."""

    def __init__(self, items):
        self.items = items
        self.rows = type("Rows", (), {"column_names": list(items[0])})()

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return dict(self.items[index])

    def settings(self):
        return None


def test_training_pairs_come_from_plain_or_list_columns():
    pairs = FakeVideos([{"video_id": "a", "qs": ["q1", "q2", "q3"], "as": ["a1", "a2", "a3"]}])
    dataset = QuestionAnswerDataset(pairs, "as", "qs")
    torch.manual_seed(0)
    drawn = {(item["question"], item["answer"]) for item in (dataset[0] for _ in range(60))}
    assert drawn == {("q1", "a1"), ("q2", "a2"), ("q3", "a3")}  # every pair, always together
    captions = QuestionAnswerDataset(FakeVideos([{"video_id": "a", "caption": "a cat"}]), "caption")
    assert (captions[0]["question"], captions[0]["answer"]) == (None, "a cat")
    uneven = QuestionAnswerDataset(FakeVideos([{"video_id": "a", "qs": ["q1"], "as": ["a1", "a2"]}]), "as", "qs")
    with pytest.raises(ValueError, match="2 answers need as many questions"):
        uneven[0]


def test_a_set_file_of_another_kind_is_refused(tmp_path):
    other = tmp_path / "set.txt"
    other.write_text(json.dumps({}))
    with pytest.raises(ValueError, match=r"\.csv, \.jsonl or \.parquet"):
        read_multiple_choice(other)
