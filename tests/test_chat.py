"""Chat-formatted calibration text and evaluation prompts, built offline from the documentation topics."""

import pytest
import torch
from transformers import AutoTokenizer

from kvquant_vllm.calib.text import calibration_windows, recommended_text
from kvquant_vllm.chat import DEMO_PROMPTS, chat_prompts, chat_windows, prompt_ids, pydoc_topics


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


def test_topic_splits_are_disjoint_and_cover_every_topic():
    from pydoc_data.topics import topics

    train, test = pydoc_topics("train"), pydoc_topics("test")
    assert len(train) + len(test) == len(topics)
    assert not {t for _, t in train} & {t for _, t in test}
    with pytest.raises(ValueError, match="splits train and test"):
        pydoc_topics("validation")


def test_prompts_are_many_distinct_and_end_with_the_demo():
    prompts = chat_prompts("test")
    assert len(prompts) >= 100 and len(set(prompts)) == len(prompts)
    assert prompts[-4:] == DEMO_PROMPTS
    train_titles = [title for title, _ in pydoc_topics("train")]
    assert not any(f"is {title} in Python" in p for p in prompts for title in train_titles)


def test_chat_windows_start_where_a_served_chat_starts(tokenizer):
    windows = chat_windows(tokenizer, "train", 512, max_windows=5)
    assert windows.shape == (5, 512)
    start = prompt_ids(tokenizer, "x")[:8]  # the template's opening: role marker and system text
    assert all(w[:8].tolist() == start for w in windows)
    assert len({tuple(w[8:40].tolist()) for w in windows}) == 5  # different conversations follow


def test_calibration_text_mixes_sources(tokenizer):
    assert recommended_text(tokenizer) == "pydoc:train+chat:train"
    windows, text = calibration_windows(tokenizer, None, None, samples=5, seq_len=256)
    assert text == "pydoc:train+chat:train" and windows.shape == (5, 256)
    chat_start = prompt_ids(tokenizer, "x")[0]
    assert [int(w[0]) == chat_start for w in windows] == [False] * 3 + [True] * 2
    plain, _ = calibration_windows(tokenizer, "pydoc:train", None, samples=3, seq_len=256)
    assert torch.equal(plain, windows[:3])


def test_calibration_text_without_a_chat_template(tokenizer):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = None
    assert recommended_text(tokenizer) == "pydoc:train"
    with pytest.raises(ValueError, match="no chat template"):
        calibration_windows(tokenizer, "chat:train", None, samples=2, seq_len=256)
