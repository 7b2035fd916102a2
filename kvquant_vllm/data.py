"""Text sources for calibration and evaluation.

A source is ``NAME`` or ``NAME:SPLIT`` with SPLIT one of ``train``, ``validation``, ``test``:

- ``pydoc``: Python's own documentation topics (``pydoc_data.topics``), offline, ~110K tokens.
  Its ``train`` split is the first half of the text, ``validation``/``test`` the second half.
- ``wikitext2``, ``c4``: through ``datasets`` when the hub is reachable.
"""

from __future__ import annotations

from pathlib import Path

SPLITS = ("train", "validation", "test")
SOURCES = ("pydoc", "wikitext2", "c4")


class TextSourceError(RuntimeError):
    """A text source that cannot be loaded (unknown, unreachable or empty)."""


def parse_source(source: str) -> tuple[str, str | None]:
    """``'pydoc:test'`` -> ``('pydoc', 'test')``; ``'pydoc'`` -> ``('pydoc', None)``."""
    name, _, split = source.partition(":")
    if name not in SOURCES:
        raise TextSourceError(f"unknown text source {name!r}; known: {', '.join(SOURCES)} (or use --text-file PATH)")
    if split and split not in SPLITS:
        raise TextSourceError(f"unknown split {split!r} in {source!r}; known: {', '.join(SPLITS)}")
    return name, split or None


def _pydoc(split: str | None) -> str:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    if split is None:
        return text
    # Cut at a paragraph break so that neither half starts mid-sentence.
    cut = text.find("\n\n", len(text) // 2)
    return text[:cut] if split == "train" else text[cut + 2 :]


def _hub_dataset(name: str, split: str | None) -> str:
    try:
        import datasets
    except ImportError as e:
        raise TextSourceError(f"text source {name!r} needs the `datasets` package: pip install datasets") from e
    split = split or "test"
    try:
        if name == "wikitext2":
            rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"]
            return "".join(rows)
        c4_split = "train" if split == "train" else "validation"
        files = {c4_split: f"en/c4-{c4_split}.00000-of-0{'1024' if c4_split == 'train' else '0008'}.json.gz"}
        rows = datasets.load_dataset("allenai/c4", data_files=files, split=c4_split)["text"]
        return "\n\n".join(rows[:5000])
    except Exception as e:  # the hub raises many types; all mean the same thing here
        raise TextSourceError(
            f"text source {name!r} could not be loaded from the Hugging Face hub ({type(e).__name__}: {e}); "
            "use --text pydoc (offline) or --text-file PATH"
        ) from e


def load_text(source: str | None = None, text_file: str | Path | None = None) -> str:
    """The text of ``source`` (see module doc) or of ``text_file``; exactly one must be given."""
    if (source is None) == (text_file is None):
        raise TextSourceError("give exactly one of a text source (--text) or a text file (--text-file)")
    if text_file is not None:
        path = Path(text_file)
        if not path.is_file():
            raise TextSourceError(f"text file {path} does not exist")
        text = path.read_text(encoding="utf-8", errors="replace")
        origin = str(path)
    else:
        name, split = parse_source(source)
        text = _pydoc(split) if name == "pydoc" else _hub_dataset(name, split)
        origin = source
    if not text.strip():
        raise TextSourceError(f"text from {origin} is empty")
    return text
