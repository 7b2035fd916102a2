"""What a calibration reads: token windows from one text source or a mix of them.

A calibration text is one source or several joined by ``+``, the windows shared out evenly among them:

- a plain text source of :mod:`kvquant_vllm.data` (``pydoc:train``, ``wikitext2:train``, ...), cut into windows;
- ``chat:train``: conversations in the model's chat template (:mod:`kvquant_vllm.chat`), a window per start.

The recommended text (:func:`recommended_text`) mixes plain documentation with chat-formatted conversations for
models with a chat template (what instruct models are served with), plain text otherwise.
"""

from __future__ import annotations

import torch

from kvquant_vllm.chat import chat_windows, has_chat_template
from kvquant_vllm.data import load_text

CHAT = "chat"


def recommended_text(tokenizer) -> str:
    """The calibration text to use when none is given: 'pydoc:train+chat:train' for models with a chat
    template, 'pydoc:train' otherwise."""
    return "pydoc:train+chat:train" if has_chat_template(tokenizer) else "pydoc:train"


def calibration_windows(tokenizer, text: str | None, text_file: str | None, samples: int,
                        seq_len: int) -> tuple[torch.Tensor, str]:
    """(windows [n <= samples, seq_len] int64, the text they came from) for a text spec (see module doc), a text
    file, or, with neither, :func:`recommended_text`."""
    from kvquant_vllm.eval.perplexity import make_windows, tokenize

    if text_file is not None:
        return make_windows(tokenize(tokenizer, load_text(text_file=text_file)), seq_len, samples), str(text_file)
    text = text or recommended_text(tokenizer)
    parts = text.split("+")
    shares = [samples // len(parts) + (i < samples % len(parts)) for i in range(len(parts))]
    windows = []
    for part, share in zip(parts, shares):
        if share == 0:
            continue
        name, _, split = part.partition(":")
        if name == CHAT:
            windows.append(chat_windows(tokenizer, split or "train", seq_len, share))
        else:
            windows.append(make_windows(tokenize(tokenizer, load_text(part)), seq_len, share))
    return torch.cat(windows), text
