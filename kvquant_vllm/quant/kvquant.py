"""The KVQuant codec (Hooper et al., 2024).

- Keys per channel with calibrated (scale, offset), quantized **before RoPE** by default.
- Values per token and kv head, (scale, offset) from the token's inliers, computed online, in a fixed
  rotated basis by default (:mod:`kvquant_vllm.quant.rotation`), where they need no outliers.
- Values' fp16 scale and offset refitted to the codes they get (:func:`refit_per_vector`), so a vector's codes
  and its line through the codebook match each other rather than its two extremes: by least squares at 4 bits,
  by matching the inliers' mean and spread at 3 bits.
- Non-uniform codebooks, in the normalised space [-1, 1], learned offline by Fisher-weighted k-means:
  for keys one per channel by default (the calibrated scale and offset already make the key tables per
  channel; the paper's is one per layer), for values one per layer.
- Dense-and-sparse: outliers kept exactly (fp16) in a sparse list and left out of the dense range;
  keys by calibrated per-channel thresholds, values (where the spec keeps any) by an online per-vector
  top-k. As in the paged cache, each kv head of a block of ``block_size`` tokens lists at most its capacity
  of key outliers, first come first kept (see :func:`first_come_ranks`), so the codec gives what the vLLM engine stores.
- Q-Norm: the dequantization codebook rescaled to keep the calibration mean/std (used at 2 bits).
- Attention sink: the first tokens of a sequence kept in 16 bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal

import torch

from kvquant_vllm.quant.codebook import lookup, nearest_code, uniform_codebook
from kvquant_vllm.quant.codec import Kind, KVCodec
from kvquant_vllm.quant.geometry import AttentionGeometry
from kvquant_vllm.quant.packing import pack_codes, unpack_codes
from kvquant_vllm.quant.rotation import value_rotation

OUTLIER_BITS = 32  # fp16 value + 16-bit position
SIDE_BITS = 16  # fp16 per-vector scale and offset
# Tokens per page of a kvquant cache unless vLLM's --block-size says otherwise: a 256-token page
# amortises its sink slot and key outlier list over more tokens (see paged.bits_per_element).
DEFAULT_BLOCK_SIZE = 256
# Share of the key outlier fraction that calibrated thresholds leave out, by code width (held-out perplexity in
# benchmarks/results/quality-kvquant.md): headroom in the page lists pays at 3 and 4 bits; at 2 bits the wider
# dense range that it costs weighs more than the clamped outliers it saves.
KEY_THRESHOLD_SHARE = {2: 1.0, 3: 0.75, 4: 0.75}
# Refits of a value vector's scale and offset (refit_per_vector) at 3 and 4 bits, and what each fits, by code
# width (perplexity on held-out text in benchmarks/results/quality-kvquant.md): least squares shrinks the decoded
# spread towards the mean, which costs more than its lower squared error gains at 3 bits, less at 4.
VALUE_REFITS = 2
VALUE_FIT: dict[int, Literal["least-squares", "moments"]] = {3: "moments", 4: "least-squares"}


@dataclass(frozen=True)
class CalibrationSpec:
    """What a calibration was computed for; a method runs only with a calibration of its spec."""

    bits: int
    outlier_fraction: float = 0.01
    fisher: bool = True
    key_position: Literal["pre-rope", "post-rope"] = "pre-rope"
    key_granularity: Literal["channel", "token"] = "channel"
    value_outliers: bool = False  # per-vector top-k value outliers (k from outlier_fraction)
    value_rotation: bool = True  # values quantized in the basis of quant.rotation.value_rotation
    key_books: Literal["channel", "layer"] = "channel"  # a key codebook per channel, or one per layer
    # How a kv head's key outlier budget is shared among its channels: "fisher" where it most reduces the
    # Fisher-weighted rounding error (calib.layer.allocated_thresholds), "even" the same fraction per channel.
    outlier_allocation: Literal["fisher", "even"] = "fisher"
    # The share of outlier_fraction (the page lists' capacity) that the calibrated key thresholds leave out:
    # text unlike the calibration text has more outliers, and a full list clamps the rest. None: the code
    # width's share in KEY_THRESHOLD_SHARE.
    key_threshold_share: float | None = None
    family: ClassVar[str] = "kvquant"

    def __post_init__(self) -> None:
        if self.key_threshold_share is None:
            object.__setattr__(self, "key_threshold_share", KEY_THRESHOLD_SHARE.get(self.bits, 1.0))

    @classmethod
    def from_header(cls, fields: dict) -> CalibrationSpec:
        """The spec recorded in a calibration file's header; fields that files of older versions did not
        record take the behaviour of those versions (even key outliers, unrotated values with outliers, one
        key codebook per layer, key thresholds at the whole outlier fraction)."""
        older = {"outlier_allocation": "even", "value_outliers": True, "value_rotation": False, "key_books": "layer",
                 "key_threshold_share": 1.0}
        return cls(**{**older, **fields})

    def value_outliers_per_vector(self, head_dim: int) -> int:
        """Value outliers kept exactly per token-head vector."""
        return outliers_per_vector(self.outlier_fraction, head_dim) if self.value_outliers else 0

    def calibrate_flags(self) -> str:
        """The `kvquant-vllm calibrate` flags that produce a calibration of this spec."""
        flags = [f"--bits {self.bits}", f"--outliers {self.outlier_fraction:g}"]
        if not self.fisher:
            flags.append("--no-fisher")
        if self.key_position == "post-rope":
            flags.append("--post-rope")
        if self.key_granularity == "token":
            flags.append("--per-token-keys")
        if self.value_outliers:
            flags.append("--value-outliers")
        if not self.value_rotation:
            flags.append("--no-value-rotation")
        if self.key_books == "layer":
            flags.append("--layer-key-books")
        if self.outlier_allocation == "even":
            flags.append("--even-outliers")
        if self.key_threshold_share != CalibrationSpec(self.bits).key_threshold_share:
            flags.append(f"--key-threshold-share {self.key_threshold_share:g}")
        return " ".join(flags)


@dataclass(frozen=True)
class KVQuantOptions:
    """One kvquant method: the calibration it needs plus run-time switches (for ablations)."""

    spec: CalibrationSpec
    nonuniform: bool = True
    qnorm: bool = False
    sink_tokens: int = 1
    value_refits: int = VALUE_REFITS  # rounds of refit_per_vector for values; 0: scale and offset from the range
    value_fit: Literal["least-squares", "moments"] | None = None  # what the refits fit; None: VALUE_FIT's
    # Key outlier lists are per page of this many tokens, with a fixed capacity; None: unbounded lists.
    block_size: int | None = DEFAULT_BLOCK_SIZE

    def __post_init__(self) -> None:
        if self.value_fit is None:
            object.__setattr__(self, "value_fit", VALUE_FIT.get(self.spec.bits, "least-squares"))

    @property
    def match_moments(self) -> bool:
        """Whether the value refits match the inliers' mean and spread (else they fit least squares)."""
        return self.value_fit == "moments"


@dataclass
class LayerCalibration:
    """One layer's tables. Keys: inliers of channel c lie in offset[c] +- scale[c]."""

    key_scale: torch.Tensor  # [num_kv_heads, head_dim] float32
    key_offset: torch.Tensor  # [num_kv_heads, head_dim] float32
    key_codebook: torch.Tensor  # [num_kv_heads, head_dim, 2**bits] (per channel) or [2**bits] float32, sorted
    value_codebook: torch.Tensor  # [2**bits] float32, sorted
    key_qnorm: torch.Tensor  # [2] float32: scale, offset applied to the key codebook
    value_qnorm: torch.Tensor  # [2] float32

    TENSORS: ClassVar[tuple[str, ...]] = (
        "key_scale", "key_offset", "key_codebook", "value_codebook", "key_qnorm", "value_qnorm"
    )

    @classmethod
    def shapes(cls, geometry: AttentionGeometry, spec: CalibrationSpec) -> dict[str, tuple[int, ...]]:
        """The shape of every tensor, as the calibration file must hold it."""
        return {
            "key_scale": (geometry.num_kv_heads, geometry.head_dim),
            "key_offset": (geometry.num_kv_heads, geometry.head_dim),
            "key_codebook": ((geometry.num_kv_heads, geometry.head_dim) if spec.key_books == "channel" else ())
            + (1 << spec.bits,),
            "value_codebook": (1 << spec.bits,),
            "key_qnorm": (2,),
            "value_qnorm": (2,),
        }

    def kv_heads(self, heads: range) -> LayerCalibration:
        """The tables of kv heads ``heads`` only: the per-channel ones [len(heads), head_dim, ...], the rest shared."""
        book = self.key_codebook
        return replace(self, key_scale=self.key_scale[heads.start : heads.stop],
                       key_offset=self.key_offset[heads.start : heads.stop],
                       key_codebook=book[heads.start : heads.stop] if book.dim() > 1 else book)


@dataclass
class KVQuantCalibration:
    """A whole model's calibration, as held in the calibration file: KVQuant's (``CalibrationSpec``,
    ``LayerCalibration`` per layer) or another calibrated method's (its spec and tables types)."""

    spec: Any  # CalibrationSpec, or another method's spec (quant/cq.py, skvq.py, wkvquant.py)
    geometry: AttentionGeometry
    layers: list[Any]  # one tables object per layer, of the spec's family
    model_name: str = ""
    info: dict = field(default_factory=dict)  # text source, sample count and length

    def kv_heads(self, heads: range) -> KVQuantCalibration:
        """The calibration of kv heads ``heads`` (consecutive, e.g. one tensor-parallel rank's) as a calibration
        of its own: every per-head table sliced to them, ``geometry.num_kv_heads == len(heads)``, so that pages
        and codecs built from it hold those heads only (head i of the result is model head heads[i])."""
        total = self.geometry.num_kv_heads
        if heads.step != 1 or not 0 <= heads.start < heads.stop <= total:
            raise ValueError(f"kv heads {heads} are not consecutive heads of the calibration's {total}")
        return replace(self, geometry=replace(self.geometry, num_kv_heads=len(heads)),
                       layers=[layer.kv_heads(heads) for layer in self.layers])


def outliers_per_vector(outlier_fraction: float, head_dim: int) -> int:
    """Outliers kept per token-head vector when selected online by top-k (at least 1 if any)."""
    return 0 if outlier_fraction <= 0 else max(1, round(outlier_fraction * head_dim))


def key_outlier_capacity(outlier_fraction: float, block_size: int, head_dim: int) -> int:
    """Entries of one kv head's key outlier list in a page: the nominal fraction of its block_size x D keys."""
    if outlier_fraction <= 0:
        return 0
    return math.ceil(outlier_fraction * block_size * head_dim)


def run_starts(ids: torch.Tensor) -> torch.Tensor:
    """ids [M] with equal ids contiguous -> [M] int64: the index of the first element of each one's run."""
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[1:] = ids[1:] != ids[:-1]
    index = torch.arange(len(ids), device=ids.device)
    return torch.where(starts, index, 0).cummax(0).values


def first_come_ranks(page: torch.Tensor) -> torch.Tensor:
    """Rank of every outlier within its page's new entries: page [M] int64, equal ids contiguous, entries
    in (token, head, channel) order -> [M] int64.

    A page's key outlier list keeps entries in that order until it is full; later ones are left to the
    dense part (clamped). So a token's stored form is final once written: what a query sees does not
    depend on later tokens or on how a prompt was split into chunks.
    """
    return torch.arange(len(page), device=page.device) - run_starts(page)


def vector_outlier_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` elements of each vector (last dim) farthest from the vector's median: bool, shape of x."""
    mask = torch.zeros_like(x, dtype=torch.bool)
    if k == 0:
        return mask
    deviation = (x - x.median(dim=-1, keepdim=True).values).abs()
    return mask.scatter_(-1, deviation.topk(k, dim=-1).indices, True)


def normalize_per_vector(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-vector normalisation of x [..., D] around the range of its inliers.

    returns xn (inliers in [-1, 1]), outlier mask, scale and offset ([..., 1] fp16, as stored).
    """
    x = x.float()
    mask = vector_outlier_mask(x, k)
    hi = torch.where(mask, -math.inf, x).amax(-1, keepdim=True)
    lo = torch.where(mask, math.inf, x).amin(-1, keepdim=True)
    offset = ((hi + lo) / 2).half()
    scale = ((hi - lo) / 2).clamp_min(1e-4).half()
    return (x - offset.float()) / scale.float(), mask, scale, offset


# The refit's sums are of fixed-point integers (float32 numbers times a power of two, truncated towards zero):
# integer addition is associative, so every store (torch, Triton, C++) gets the same sums in any order, and so
# makes the same choices. Normalised values and codebook entries are clamped to +-FIT_LIMIT (an inlier of the
# range fit lies in [-1, 1]), squared errors in units of the range scale to ERROR_LIMIT; the products and sums of
# up to 256 of them stay far inside int64.
FIT_LIMIT, FIT_ONE = 4.0, 2.0**20
ERROR_LIMIT, ERROR_ONE = 2.0**20, 2.0**24


def to_fixed(x: torch.Tensor, limit: float, one: float) -> torch.Tensor:
    """x float32 clamped to [-limit, limit] (NaN to limit) -> int64 x * one, truncated towards zero."""
    x = torch.where(x < limit, x, limit)
    return (torch.where(x > -limit, x, -limit) * one).long()


def inlier_error(x: torch.Tensor, outlier: torch.Tensor, codes: torch.Tensor, book: torch.Tensor,
                 scale: torch.Tensor, offset: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """Squared error of the inliers of x [..., D] float32 decoded as book[codes] * scale + offset, in units of
    ``unit`` squared (scale, offset, unit [..., 1] float32), fixed-point: [..., 1] int64."""
    error = (x - (book[codes.long()] * scale + offset)) / unit
    square = error * error
    square = torch.where(square < ERROR_LIMIT, square, ERROR_LIMIT)  # NaN too
    return torch.where(outlier, 0, (square * ERROR_ONE).long()).sum(-1, keepdim=True)


def refit_per_vector(
    x: torch.Tensor, outlier: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, codes: torch.Tensor,
    book: torch.Tensor, rounds: int, match_moments: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A scale and offset of per-vector codes (from :func:`normalize_per_vector`) fitted to the codes.

    The range of a vector's inliers maps its two extremes onto the codebook's ends, which is seldom the line
    through the codebook that fits its codes best. Each round fits a line xn = a * book[codes] + c to the inliers
    normalised by the range fit (xn = (x - offset) / scale), stores scale * a in fp16 and then the offset that
    is best for that fp16 scale (it matches the means), and recodes the vector to the nearest entries of ``book``
    under them. Least squares (a = cov(xn, b) / var(b)) keeps the lowest inlier squared error of the range fit
    and the rounds, so a vector is never worse off by that measure; ``match_moments`` (a = std(xn) / std(b), the
    decoded inliers keep the spread that least squares shrinks) keeps the last round that fits. The sums are
    fixed-point integers (``FIT_ONE``, ``ERROR_ONE``).

    x: [..., D] float32; outlier: [..., D] bool (kept exactly, out of the fit); scale, offset: [..., 1] fp16;
    codes: [..., D] uint8; book: [2**bits] float32, the decode codebook. Returns (codes, scale, offset) as given.
    """
    inlier = ~outlier
    range_scale, range_offset = scale, offset
    s0, o0 = scale.float(), offset.float()
    fixed_x = torch.where(inlier, to_fixed((x - o0) / s0, FIT_LIMIT, FIT_ONE), 0)
    count = inlier.sum(-1, keepdim=True)
    sum_x = fixed_x.sum(-1, keepdim=True)
    if match_moments:
        spread_x = count * (fixed_x * fixed_x).sum(-1, keepdim=True) - sum_x * sum_x  # count^2 FIT_ONE^2 var(xn)
    else:
        best = inlier_error(x, outlier, codes, book, s0, o0, s0)
    current = codes
    for _ in range(rounds):
        fixed_b = torch.where(inlier, to_fixed(book[current.long()], FIT_LIMIT, FIT_ONE), 0)
        sum_b = fixed_b.sum(-1, keepdim=True)
        variance = count * (fixed_b * fixed_b).sum(-1, keepdim=True) - sum_b * sum_b  # count^2 FIT_ONE^2 var(b)
        if match_moments:
            slope = torch.sqrt(spread_x.float() / variance.float())
        else:
            covariance = count * (fixed_b * fixed_x).sum(-1, keepdim=True) - sum_b * sum_x
            slope = covariance.float() / variance.float()
        fit_scale = (s0 * slope).half()
        s = fit_scale.float()
        # The best offset for the fp16 scale: the mean of xn less (s / s0) times the mean of book[codes].
        fit_offset = (o0 + s0 * ((sum_x.float() - s / s0 * sum_b.float()) / (count.float() * FIT_ONE))).half()
        o = fit_offset.float()
        fits = (variance > 0) & (s > 0) & (s < math.inf) & (o.abs() < math.inf)
        fit_scale, fit_offset = torch.where(fits, fit_scale, range_scale), torch.where(fits, fit_offset, range_offset)
        s, o = fit_scale.float(), fit_offset.float()
        current = nearest_code((x - o) / s, book)
        if match_moments:
            take = fits
        else:
            error = inlier_error(x, outlier, current, book, s, o, s0)
            take = error < best
            best = torch.where(take, error, best)
        codes = torch.where(take, current, codes)
        scale, offset = torch.where(take, fit_scale, scale), torch.where(take, fit_offset, offset)
    return codes, scale, offset


def code_per_vector(
    x: torch.Tensor, k: int, encode_book: torch.Tensor, decode_book: torch.Tensor, refits: int,
    match_moments: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-vector codes of x [..., D]: normalised around its inliers' range (:func:`normalize_per_vector`, k
    outliers), the nearest entries of ``encode_book``, then ``refits`` rounds of :func:`refit_per_vector` against
    ``decode_book`` (books [2**bits] float32; ``match_moments`` as there). Returns codes [..., D] uint8, the
    outlier mask [..., D] bool, and the fp16 scale and offset [..., 1]."""
    x = x.float()
    xn, mask, scale, offset = normalize_per_vector(x, k)
    codes = nearest_code(xn.clamp(-1, 1), encode_book)
    if refits:
        codes, scale, offset = refit_per_vector(x, mask, scale, offset, codes, decode_book, refits, match_moments)
    return codes, mask, scale, offset


def normalize_per_channel(
    x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, outliers: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H, D] normalised by calibrated per-channel scale/offset [H, D]; outliers lie outside [-1, 1]."""
    xn = (x.float() - offset) / scale
    mask = xn.abs() > 1 if outliers else torch.zeros_like(xn, dtype=torch.bool)
    return xn, mask


@dataclass
class KVQuantPacked:
    kind: Kind
    layer: int
    shape: tuple[int, int, int]  # [num_tokens, num_kv_heads, head_dim]
    codes: torch.Tensor  # [T, H, packed_numel(D, bits)] uint8
    scale: torch.Tensor | None  # [T, H, 1] fp16 (per-vector) or None (per-channel, calibrated)
    offset: torch.Tensor | None
    outlier_index: torch.Tensor  # [M] int64, flat index into [T, H, D]
    outlier_value: torch.Tensor  # [M] fp16
    sink: torch.Tensor  # [min(sink_tokens, T), H, D] fp16


class KVQuantCodec(KVCodec):
    """KVQuant encode/decode of one sequence's keys or values with a model's calibration."""

    def __init__(self, name: str, options: KVQuantOptions, calibration: KVQuantCalibration) -> None:
        if calibration.spec != options.spec:
            raise ValueError(f"{name}: calibration is for {calibration.spec}, the method needs {options.spec}")
        self.name = name
        self.options = options
        self.calibration = calibration
        self.bits = options.spec.bits
        # The post-RoPE ablation's rotation, made here so that a RoPE it cannot follow fails at construction.
        self.key_rope = calibration.geometry.rope() if options.spec.key_position == "post-rope" else None

    def codebooks(self, kind: Kind, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(encode codebook, decode codebook) for ``kind`` at ``layer``: [2**bits], or per channel
        [num_kv_heads, head_dim, 2**bits] (keys with ``key_books="channel"``) float32."""
        cal = self.calibration.layers[layer]
        if not self.options.nonuniform:
            book = uniform_codebook(self.bits)
            return book, book
        book = cal.key_codebook if kind == "key" else cal.value_codebook
        if not self.options.qnorm:
            return book, book
        qn = cal.key_qnorm if kind == "key" else cal.value_qnorm
        return book, book * qn[0] + qn[1]

    def _per_channel(self, kind: Kind) -> bool:
        return kind == "key" and self.options.spec.key_granularity == "channel"

    def _vector_outliers(self, kind: Kind, head_dim: int) -> int:
        """Outliers kept per vector of a per-vector normalised ``kind`` (values, or per-token keys)."""
        spec = self.options.spec
        return spec.value_outliers_per_vector(head_dim) if kind == "value" else \
            outliers_per_vector(spec.outlier_fraction, head_dim)

    def _rotated(self, kind: Kind) -> bool:
        return kind == "value" and self.options.spec.value_rotation

    def encode(self, x: torch.Tensor, kind: Kind, layer: int) -> KVQuantPacked:
        """x: [num_tokens, num_kv_heads, head_dim] (keys pre-RoPE, the sequence starting at position 0)."""
        spec = self.options.spec
        x = x.float()
        if kind == "key" and self.key_rope is not None:
            x = self.key_rope.rotate(x, torch.arange(x.shape[0]))
        if self._rotated(kind):
            x = x @ value_rotation(x.shape[-1])
        encode_book, decode_book = self.codebooks(kind, layer)
        if self._per_channel(kind):
            cal = self.calibration.layers[layer]
            xn, mask = normalize_per_channel(x, cal.key_scale, cal.key_offset, spec.outlier_fraction > 0)
            codes = nearest_code(xn.clamp(-1, 1), encode_book)
            scale = offset = None
        else:
            refits = self.options.value_refits if kind == "value" else 0
            codes, mask, scale, offset = code_per_vector(x, self._vector_outliers(kind, x.shape[-1]), encode_book,
                                                         decode_book, refits, self.options.match_moments)
        codes = pack_codes(codes, self.bits)
        mask[: self.options.sink_tokens] = False  # the sink holds those tokens exactly
        flat = mask.reshape(-1).nonzero().squeeze(-1)  # (token, head, channel) order
        if self._per_channel(kind) and self.options.block_size:
            flat = flat[self._fits_page_lists(flat, x.shape[1], x.shape[2])]
        sink = x[: self.options.sink_tokens].half()
        return KVQuantPacked(kind, layer, tuple(x.shape), codes, scale, offset, flat, x.reshape(-1)[flat].half(), sink)

    def _fits_page_lists(self, flat: torch.Tensor, num_kv_heads: int, head_dim: int) -> torch.Tensor:
        """Which key outliers (flat indices [M] into [T, H, D], ascending) a paged cache keeps: bool [M].
        Each kv head of each page has a list of its own (quant.paged)."""
        bs = self.options.block_size
        cap = key_outlier_capacity(self.options.spec.outlier_fraction, bs, head_dim)
        token, head = flat // (num_kv_heads * head_dim), flat // head_dim % num_kv_heads
        lists = (token // bs) * num_kv_heads + head
        order = lists.argsort(stable=True)  # a list's entries stay in (token, channel) order
        keep = torch.empty_like(flat, dtype=torch.bool)
        keep[order] = first_come_ranks(lists[order]) < cap
        return keep

    def decode(self, p: KVQuantPacked) -> torch.Tensor:
        t, h, d = p.shape
        _, decode_book = self.codebooks(p.kind, p.layer)
        xn = lookup(decode_book, unpack_codes(p.codes, self.bits, d).long())
        if p.scale is None:
            cal = self.calibration.layers[p.layer]
            x = xn * cal.key_scale + cal.key_offset
        else:
            x = xn * p.scale.float() + p.offset.float()
        x = x.reshape(-1).index_put((p.outlier_index,), p.outlier_value.float()).reshape(t, h, d)
        x[: p.sink.shape[0]] = p.sink.float()
        if p.kind == "key" and self.key_rope is not None:
            x = self.key_rope.unrotate(x, torch.arange(t))
        if self._rotated(p.kind):
            x = x @ value_rotation(d).T
        return x

    def bits_per_element(self, head_dim: int, seq_len: int) -> float:
        spec = self.options.spec
        def per_vector(kind: Kind) -> float:
            return self.bits + (2 * SIDE_BITS + self._vector_outliers(kind, head_dim) * OUTLIER_BITS) / head_dim

        per_channel = self.bits + spec.outlier_fraction * OUTLIER_BITS  # tables are per layer, not per token
        key_bits = per_channel if spec.key_granularity == "channel" else per_vector("key")
        sink = min(self.options.sink_tokens, seq_len) / seq_len * 16  # stored beside its codes
        return (key_bits + per_vector("value")) / 2 + sink


def kvquant_methods() -> dict[str, KVQuantOptions]:
    """The kvquant methods and the ablations that remove one technique at a time."""
    methods = {
        "kvquant4": KVQuantOptions(CalibrationSpec(4)),
        "kvquant3": KVQuantOptions(CalibrationSpec(3)),
        # No refit at 2 bits: least squares shrinks the decoded values' spread, which Q-Norm is there to keep
        # (quality-kvquant.md).
        "kvquant2": KVQuantOptions(CalibrationSpec(2), qnorm=True, value_refits=0),
    }
    k3, k2 = methods["kvquant3"], methods["kvquant2"]
    methods.update(
        {
            "kvquant3-nooutliers": replace(k3, spec=replace(k3.spec, outlier_fraction=0.0)),
            "kvquant3-valueoutliers": replace(k3, spec=replace(k3.spec, value_outliers=True)),
            "kvquant3-norotation": replace(k3, spec=replace(k3.spec, value_rotation=False, value_outliers=True)),
            "kvquant3-layerbooks": replace(k3, spec=replace(k3.spec, key_books="layer")),
            # The paper's scheme: one key codebook per layer, unrotated values with per-vector outliers, key
            # thresholds at the whole outlier fraction.
            "kvquant3-paper": replace(k3, spec=replace(k3.spec, key_books="layer", value_rotation=False,
                                                       value_outliers=True, key_threshold_share=1.0)),
            "kvquant3-noheadroom": replace(k3, spec=replace(k3.spec, key_threshold_share=1.0)),
            "kvquant3-evenoutliers": replace(k3, spec=replace(k3.spec, outlier_allocation="even")),
            "kvquant3-uniform": replace(k3, nonuniform=False),
            "kvquant3-nofisher": replace(k3, spec=replace(k3.spec, fisher=False)),
            "kvquant3-postrope": replace(k3, spec=replace(k3.spec, key_position="post-rope")),
            "kvquant3-tokenkeys": replace(k3, spec=replace(k3.spec, key_granularity="token", key_books="layer")),
            "kvquant3-nosink": replace(k3, sink_tokens=0),
            "kvquant3-unbounded": replace(k3, block_size=None),
            "kvquant3-qnorm": replace(k3, qnorm=True),
            "kvquant3-norefit": replace(k3, value_refits=0),
            "kvquant3-lsrefit": replace(k3, value_fit="least-squares"),
            "kvquant2-noqnorm": replace(k2, qnorm=False),
        }
    )
    return methods
