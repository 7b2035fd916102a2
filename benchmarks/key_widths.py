"""What per-channel key code widths would buy kvquant (harness only); writes results/NAME.{json,md}.

    python benchmarks/key_widths.py --name quality-key-widths --model smollm2-135m --methods kvquant3,kvquant4 \\
        --calibrate-on pydoc:train+chat:train --calib-samples 4

kvquant3 codes every key channel in 3 bits (kvquant4 in 4). The channels' rounding errors do not cost the
same: a channel's error costs its Fisher information (squared loss gradients) times its squared range, and both
vary by orders of magnitude across a head's channels. Here each channel of a kv head takes a width of 1 to
MAX_WIDTH bits, with a Fisher-weighted codebook of that size of its own, and the widths are chosen greedily, one
bit at a time to the channel whose Fisher-weighted rounding error it lowers most, until they sum to
bits x head_dim per head (:func:`allocate_widths`). The widths are calibration tables, so a token's key takes the
same bits: only the code widths inside a page would differ. Ranges, outliers, values and sink stay the method's,
with its calibration.

With ``--width-groups``, a third row per method keeps each RoPE pair in one width and fixes the number of pairs
of each width in every head (:func:`allocate_width_groups`): the layout that ``docs/layout-v3.md`` proposes.

No page layout holds mixed widths: this measures, with fake quantization (kvquant_vllm.eval), whether a layout
should. Rows: greedy agreement on the built-in chat prompts (kvquant_vllm.eval.agreement) and perplexity on
--text windows, every row in one run.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import shlex
import sys
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from kvquant_vllm.calib.collect import LayerActivations, collect_activations
from kvquant_vllm.calib.file import read_calibration
from kvquant_vllm.calib.layer import channel_codebooks
from kvquant_vllm.calib.run import cached_calibrations
from kvquant_vllm.calib.text import calibration_windows
from kvquant_vllm.chat import chat_prompts
from kvquant_vllm.data import load_text
from kvquant_vllm.eval.agreement import greedy_answers, teacher_forced
from kvquant_vllm.eval.perplexity import load_eval_model, make_windows, tokenize, window_nll
from kvquant_vllm.fsutil import atomic_write_text
from kvquant_vllm.models import resolve_model
from kvquant_vllm.quant.codebook import lookup, nearest_code
from kvquant_vllm.quant.codec import Kind, Unquantized
from kvquant_vllm.quant.geometry import attention_geometry
from kvquant_vllm.quant.kvquant import KVQuantCalibration, KVQuantCodec, KVQuantOptions, normalize_per_channel
from kvquant_vllm.quant.registry import calibration_spec

RESULTS = Path(__file__).resolve().parent / "results"
MAX_WIDTH = 6


def width_costs(act: LayerActivations, key_scale: torch.Tensor, key_offset: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """For every key channel and width 1..MAX_WIDTH: its Fisher-weighted codebook and rounding error.

    Returns books [MAX_WIDTH, H, D, 2**MAX_WIDTH] float32 (a width's book padded with its last entry, so that
    every code decodes to an entry of that width) and costs [H, D, MAX_WIDTH] float64: sum over the channel's inliers
    of Fisher x (range x rounding error)**2.
    """
    kn, outlier = normalize_per_channel(act.keys, key_scale, key_offset, True)
    kn, fisher = kn.clamp(-1, 1), act.key_grad.square()
    books, costs = [], []
    for width in range(1, MAX_WIDTH + 1):
        book = channel_codebooks(kn, fisher, outlier, 1 << width)  # [H, D, 2**width]
        error = (kn - lookup(book, nearest_code(kn, book).long())) * key_scale
        costs.append((error.square() * fisher * ~outlier).sum(0).double())
        books.append(torch.cat([book, book[..., -1:].expand(*book.shape[:2], (1 << MAX_WIDTH) - book.shape[-1])], -1))
    return torch.stack(books), torch.stack(costs, -1)


def allocate_widths(costs: torch.Tensor, mean_bits: int) -> torch.Tensor:
    """Widths [H, D] int64 in 1..MAX_WIDTH summing to mean_bits x D per head, for costs [H, D, MAX_WIDTH] (a
    channel's error at each width): from 1 bit everywhere, each next bit of a head goes to the channel whose
    error it lowers most."""
    h, d, _ = costs.shape
    widths = torch.ones(h, d, dtype=torch.int64)
    # The gain of a channel's next bit; none past MAX_WIDTH.
    gains = torch.cat([costs[..., :-1] - costs[..., 1:], torch.full((h, d, 1), -math.inf, dtype=costs.dtype)], -1)
    heads = torch.arange(h)
    for _ in range((mean_bits - 1) * d):
        best = gains.gather(-1, (widths - 1)[..., None])[..., 0].argmax(-1)
        widths[heads, best] += 1
    return widths


def allocate_width_groups(costs: torch.Tensor, pairs_per_width: dict[int, int]) -> torch.Tensor:
    """Widths [H, D] int64 with each RoPE pair (channels c and c + D/2) in one width and a fixed number of pairs
    per width in every head (``pairs_per_width``: width -> pairs, summing to D/2): the layout of
    ``docs/layout-v3.md``. Per head, the cheapest such assignment for costs [H, D, MAX_WIDTH].

    From any start, pairs move between widths along cycles (pair of width a to width b, one of b to c, ...,
    one of the last width back to a) while a cycle lowers the cost. A transport problem is at its optimum when
    no such cycle does, so the result is exact.
    """
    h, d, _ = costs.shape
    if sum(pairs_per_width.values()) != d // 2:
        raise ValueError(f"width groups {pairs_per_width} hold {sum(pairs_per_width.values())} pairs, not {d // 2}")
    pair_costs = costs[:, : d // 2] + costs[:, d // 2 :]  # [H, D/2, MAX_WIDTH]
    classes = sorted(pairs_per_width)
    cycles = [c for k in range(2, len(classes) + 1) for c in itertools.permutations(classes, k) if c[0] == min(c)]
    widths = torch.empty(h, d // 2, dtype=torch.int64)
    for head in range(h):
        cost = pair_costs[head]
        width = torch.tensor([w for w in classes for _ in range(pairs_per_width[w])])
        improved = True
        while improved:
            improved = False
            for cycle in cycles:
                # Per step a -> b: (pair, b, cost change) of the pair of width a that moves to b most cheaply.
                moves = []
                for a, b in zip(cycle, cycle[1:] + cycle[:1]):
                    delta = torch.where(width == a, cost[:, b - 1] - cost[:, a - 1], math.inf)
                    moves.append((int(delta.argmin()), b, float(delta.min())))
                if sum(m[2] for m in moves) < -1e-12 * float(cost.abs().max()):
                    for pair, b, _ in moves:
                        width[pair] = b
                    improved = True
        widths[head] = width
    return torch.cat([widths, widths], 1)


class KeyWidthsCodec(KVQuantCodec):
    """kvquant with each key channel coded in its own width: per-channel books [H, D, 2**MAX_WIDTH] per layer.
    Codes are held one per byte (the harness packs nothing mixed); bits per element are kvquant's, since the
    widths average the spec's bits."""

    def __init__(self, name: str, options: KVQuantOptions, calibration: KVQuantCalibration,
                 key_books: list[torch.Tensor]) -> None:
        super().__init__(name, options, calibration)
        self.key_books = key_books
        self.bits = 8

    def codebooks(self, kind: Kind, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        if kind == "key":
            return self.key_books[layer], self.key_books[layer]
        return super().codebooks(kind, layer)

    def bits_per_element(self, head_dim: int, seq_len: int) -> float:
        return KVQuantCodec(self.name, self.options, self.calibration).bits_per_element(head_dim, seq_len)


def key_width_books(activations: list[LayerActivations], calibration: KVQuantCalibration,
                    allocators: list[Callable[[torch.Tensor], torch.Tensor]]
                    ) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
    """For each allocator (costs [H, D, MAX_WIDTH] -> widths [H, D]): per layer the allocated books
    [H, D, 2**MAX_WIDTH] of every key channel, and the widths [L, H, D]. Each layer's costs are computed once."""
    books: list[list[torch.Tensor]] = [[] for _ in allocators]
    widths: list[list[torch.Tensor]] = [[] for _ in allocators]
    for layer, act in enumerate(tqdm(activations, desc=f"key widths at {calibration.spec.bits} bits")):
        tables = calibration.layers[layer]
        width_books, costs = width_costs(act, tables.key_scale, tables.key_offset)
        for allocate, layer_books, layer_widths in zip(allocators, books, widths):
            layer_widths.append(allocate(costs))
            index = (layer_widths[-1] - 1)[None, ..., None].expand(1, *width_books.shape[1:])
            layer_books.append(width_books.gather(0, index)[0])
    return [(b, torch.stack(w)) for b, w in zip(books, widths)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="results file stem under benchmarks/results/")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", default="kvquant3", help="comma-separated, of kvquant2, kvquant3, kvquant4")
    p.add_argument("--calibrate-on", default="pydoc:train+chat:train")
    p.add_argument("--calib-samples", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--text", default="pydoc:test", help="perplexity text")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--width-groups", help="also rows with RoPE pairs in fixed width groups (docs/layout-v3.md), "
                   "as WIDTH:PAIRS,...: 4:8,3:16,2:8 is 8 pairs at 4 bits, 16 at 3, 8 at 2 per kv head")
    p.add_argument("--notes", type=Path, help="markdown file appended under the table (the reading of it)")
    args = p.parse_args()
    methods = args.methods.split(",")
    if not set(methods) <= {"kvquant2", "kvquant3", "kvquant4"}:
        p.error(f"--methods: kvquant2, kvquant3 or kvquant4, got {args.methods}")
    try:
        groups = args.width_groups and {int(w): int(n) for w, n in (g.split(":") for g in args.width_groups.split(","))}
    except ValueError:
        p.error(f"--width-groups: WIDTH:PAIRS,... (e.g. 4:8,3:16,2:8), got {args.width_groups}")

    specs = {m: calibration_spec(m) for m in methods}
    paths = cached_calibrations(args.model, list(specs.values()), args.calibrate_on, args.calib_samples, args.seq_len)
    model, tokenizer = load_eval_model(resolve_model(args.model))
    geometry = attention_geometry(model.config)
    pairs = geometry.head_dim // 2
    for method, spec in specs.items():
        if groups and (sum(groups.values()) != pairs or sum(w * n for w, n in groups.items()) != spec.bits * pairs
                       or not set(groups) <= set(range(1, MAX_WIDTH + 1))):
            p.error(f"--width-groups {args.width_groups}: {method} needs widths of 1 to {MAX_WIDTH} bits for the "
                    f"{pairs} RoPE pairs of a kv head, {spec.bits} bits per channel on average")
    windows, _ = calibration_windows(tokenizer, args.calibrate_on, None, args.calib_samples, args.seq_len)
    activations = collect_activations(model, windows)
    codecs: list = [Unquantized()]
    histograms = {}
    for method, spec in specs.items():
        calibration = read_calibration(paths[spec], geometry)
        allocators = [functools.partial(allocate_widths, mean_bits=spec.bits)]
        if groups:
            allocators.append(functools.partial(allocate_width_groups, pairs_per_width=groups))
        (books, widths), *grouped = key_width_books(activations, calibration, allocators)
        histograms[method] = torch.bincount(widths.reshape(-1), minlength=MAX_WIDTH + 1)[1:].tolist()
        options = KVQuantOptions(spec)
        codecs += [KVQuantCodec(method, options, calibration),
                   KeyWidthsCodec(f"{method} + key widths", options, calibration, books)]
        codecs += [KeyWidthsCodec(f"{method} + width groups {args.width_groups}", options, calibration, group_books)
                   for group_books, _ in grouped]
    del activations

    answers = greedy_answers(model, tokenizer, chat_prompts("test"), args.max_new_tokens)
    answer_tokens = sum(len(a.answer) for a in answers)
    test = make_windows(tokenize(tokenizer, load_text(args.text)), args.seq_len)
    rows = []
    for codec in tqdm(codecs, desc="methods"):
        agree, answer_nll, _ = teacher_forced(model, answers, codec)
        nll, count = window_nll(model, test, codec)
        rows.append({"method": codec.name, "bits_per_element": codec.bits_per_element(geometry.head_dim, args.seq_len),
                     "agreement": agree / answer_tokens, "answer_ppl": math.exp(answer_nll / answer_tokens),
                     "ppl": math.exp(nll / count)})
    for row in rows:
        row["answer_ppl_delta"] = row["answer_ppl"] - rows[0]["answer_ppl"]
        row["ppl_delta"] = row["ppl"] - rows[0]["ppl"]

    command = "python " + shlex.join(["benchmarks/key_widths.py", *sys.argv[1:]])
    payload = {"command": command, "model": args.model,
               "calibration": {"text": args.calibrate_on, "samples": args.calib_samples, "seq_len": args.seq_len,
                               "files": {m: paths[s].name for m, s in specs.items()}},
               "chat_prompts": len(answers), "answer_tokens": answer_tokens, "text": args.text, "windows": len(test),
               "key_width_histograms": histograms, "results": rows}
    RESULTS.mkdir(exist_ok=True)
    atomic_write_text(RESULTS / f"{args.name}.json", json.dumps(payload, indent=2) + "\n")
    lines = ["| method | bits/elem | agreement | answer ppl delta | ppl | ppl delta |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['bits_per_element']:.2f} | {100 * r['agreement']:.1f} % "
                     f"| {r['answer_ppl_delta']:+.3f} | {r['ppl']:.3f} | {r['ppl_delta']:+.3f} |")
    width_lines = "\n".join(f"- {m}: {h}" for m, h in histograms.items())
    markdown = (
        "# Per-channel key code widths for kvquant (harness only)\n\n"
        f"Model `{args.model}`, fake quantization (fp32, keys pre-RoPE). Calibration on {args.calibrate_on}, "
        f"{args.calib_samples} x {args.seq_len} tokens; the widths and their codebooks from the same activations. "
        f"Agreement and answer perplexity: {len(answers)} built-in chat prompts, greedy 16-bit answers of up to "
        f"{args.max_new_tokens} tokens ({answer_tokens} answer tokens) teacher-forced. Perplexity: {len(test)} "
        f"windows of {args.seq_len} tokens of `{args.text}`. Bits per element on those windows.\n\n"
        f"Command: `{command}`\n\n" + "\n".join(lines) + "\n\n"
        f"Key channels by width (1 to {MAX_WIDTH} bits, all layers and kv heads):\n\n{width_lines}\n"
        + (f"\n{args.notes.read_text()}" if args.notes else "")
    )
    atomic_write_text(RESULTS / f"{args.name}.md", markdown)
    print(markdown)


if __name__ == "__main__":
    main()
