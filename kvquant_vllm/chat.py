"""Chat-formatted text built offline: calibration conversations and evaluation prompts in the model's own
chat template, from Python's documentation topics (``pydoc_data.topics``).

Instruct models are served with a chat template: role markers and a system text come first, exactly where the
attention sink and the first-come-first-kept outlier lists of a page spend their budget. So a calibration for
them should see that format, and their quality is best measured on chat answers.

The topics split as the ``pydoc`` text source does (:mod:`kvquant_vllm.data`): a topic belongs to ``train``
when it starts in the first half of the concatenated text, else to ``test``, so chat calibration (``train``)
and the evaluation prompts (``test``) share no topic, and neither overlaps ``pydoc:test`` perplexity text.
"""

from __future__ import annotations

import random

import torch

# The demo's questions: part of the built-in evaluation set.
DEMO_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence what a Python list is.",
    "Give three tips for staying focused while studying.",
]

# Questions a user asks about a documentation topic ({title}: its heading, {passage}: its first paragraph).
QUESTIONS = [
    "What is {title} in Python? Answer briefly.",
    "Explain {title} in Python with a short example.",
    "When would a Python programmer use {title}? Give one reason.",
    "Summarize this passage from the Python documentation in two sentences:\n\n{passage}",
]
ANSWER_CHARS = 1500  # assistant turns of the calibration conversations: a topic's text, cut at a paragraph


def pydoc_topics(split: str) -> list[tuple[str, str]]:
    """(title, text) of the documentation topics of ``split`` ('train' or 'test'), in sorted key order."""
    from pydoc_data.topics import topics

    if split not in ("train", "test"):
        raise ValueError(f"chat text has splits train and test, not {split!r}")
    keys = sorted(topics)
    half = sum(len(topics[k]) + 2 for k in keys) / 2
    chosen, start = [], 0
    for key in keys:
        if (start < half) == (split == "train"):
            text = topics[key].strip()
            title = text.splitlines()[0].strip()
            chosen.append((title[0].lower() + title[1:] if title[1:2].islower() else title, text))
        start += len(topics[key]) + 2
    return chosen


def _first_paragraph(text: str) -> str:
    paragraphs = [p.strip() for p in text.split("\n\n")[1:] if len(p.strip()) > 80 and not p.startswith("*")]
    return paragraphs[0] if paragraphs else text[:400]


def _cut(text: str, limit: int) -> str:
    """text up to the last paragraph break before ``limit`` characters (at least its first paragraph)."""
    if len(text) <= limit:
        return text
    cut = text.rfind("\n\n", 0, limit)
    return text[: cut if cut > 0 else limit]


def chat_prompts(split: str = "test") -> list[str]:
    """The built-in evaluation prompts: every question template for every topic of ``split``, then the demo's
    questions (120 prompts for ``test``)."""
    prompts = [q.format(title=title, passage=_first_paragraph(text))
               for title, text in pydoc_topics(split) for q in QUESTIONS]
    return prompts + DEMO_PROMPTS


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of a one-turn chat ``prompt`` in the model's template, ready for the assistant's answer."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def conversations(split: str, seed: int = 0) -> list[list[dict]]:
    """Calibration conversations: per topic of ``split``, a user question (a random template) and the topic's
    text as the assistant's answer, then a follow-up question answered by the next topic; shuffled."""
    rng = random.Random(seed)
    topics = pydoc_topics(split)
    chats = []
    for i, (title, text) in enumerate(topics):
        next_title, next_text = topics[(i + 1) % len(topics)]
        chats.append([
            {"role": "user", "content": rng.choice(QUESTIONS).format(title=title, passage=_first_paragraph(text))},
            {"role": "assistant", "content": _cut(text, ANSWER_CHARS)},
            {"role": "user", "content": f"And what about {next_title}?"},
            {"role": "assistant", "content": _cut(next_text, ANSWER_CHARS)},
        ])
    rng.shuffle(chats)
    return chats


def chat_windows(tokenizer, split: str, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Windows [n, seq_len] of chat-formatted calibration text, each from the start of a conversation (the
    template's system text at position 0, as a served chat has it) through the conversations that follow."""
    if not has_chat_template(tokenizer):
        raise ValueError("this tokenizer has no chat template: use a plain text source (e.g. pydoc:train)")
    streams = [tokenizer(tokenizer.apply_chat_template(c, tokenize=False), add_special_tokens=False)["input_ids"]
               for c in conversations(split)]
    windows, i = [], 0
    while max_windows is None or len(windows) < max_windows:
        window = []
        while len(window) < seq_len and i < len(streams):
            window += streams[i]
            i += 1
        if len(window) < seq_len:
            break
        windows.append(window[:seq_len])  # the rest of the last conversation is dropped
    if not windows:
        raise ValueError(f"the {split} conversations hold fewer than {seq_len} tokens")
    return torch.tensor(windows, dtype=torch.long)
