"""Hypothesis strategies: Gemma-4-like decoder configs, run shapes, single-layer cases.

Every drawn config is valid by construction (``DecoderConfig.validate`` never has to
reject one): layer types are drawn for the layers that own a cache first, and each shared
layer then borrows from one of those of its own type. Draws are ordered so that shrinking
goes towards the simplest model: P2 mask, fp32, GQA non-shared layers, one KV head, small
heads, window 1.
"""

from __future__ import annotations

import dataclasses

from hypothesis import strategies as st

from rewriter.fixtures.gemma4_like import DecoderConfig

__all__ = [
    "RunShapes",
    "SingleLayerCase",
    "decoder_configs",
    "gqa_head_sizes",
    "head_sizes",
    "no_shared_configs",
    "run_shapes",
    "single_layer_cases",
    "windows",
]

LAYER_TYPES = ("sliding", "full")

# ORT's CPU GroupQueryAttention kernel needs D % 8 == 0; a non-shared GQA layer of another
# size cannot run at all, so the generator refuses it (an all-Attention model may have it).
_GQA_HEAD_SIZES = (8, 16, 32, 64, 128, 256, 512)


def gqa_head_sizes(max_size: int = 512) -> st.SearchStrategy[int]:
    """Multiples of 8 up to ``max_size``; the usual powers of two (512 included) often."""
    usual = [d for d in _GQA_HEAD_SIZES if d <= max_size]
    return st.one_of(st.sampled_from(usual), st.integers(1, max_size // 8).map(lambda k: 8 * k))


def head_sizes(max_size: int = 512) -> st.SearchStrategy[int]:
    """Any even head size (rotary needs even), mostly GQA-runnable ones."""
    return st.one_of(gqa_head_sizes(max_size), st.integers(1, max_size // 2).map(lambda k: 2 * k))


def windows(max_window: int = 48) -> st.SearchStrategy[int]:
    return st.one_of(st.integers(1, 8), st.integers(1, max_window))


@st.composite
def decoder_configs(
    draw: st.DrawFn,
    *,
    max_head_size: int = 512,
    max_window: int = 48,
    min_shared: int = 1,
    max_shared: int = 3,
    max_own: int = 4,
    gqa_sizes_only: bool = False,
) -> DecoderConfig:
    """A tiny decoder: small hidden/vocab, but heads up to ``max_head_size`` wide."""
    mask_style = draw(st.sampled_from(["p2", "p1"]))
    nonshared_attention = draw(st.sampled_from(["gqa", "attention"]))
    num_own = draw(st.integers(1, max_own))
    own_types = draw(st.lists(st.sampled_from(LAYER_TYPES), min_size=num_own, max_size=num_own))
    num_shared = draw(st.integers(min_shared, max_shared))
    present = sorted(set(own_types), key=LAYER_TYPES.index)
    shared_types = draw(
        st.lists(st.sampled_from(present), min_size=num_shared, max_size=num_shared)
    )
    sources = tuple(
        draw(st.sampled_from([j for j, t in enumerate(own_types) if t == layer_type]))
        for layer_type in shared_types
    )
    num_kv_heads = draw(st.integers(1, 4))
    group = draw(st.integers(1, 3))
    sizes = (
        gqa_head_sizes(max_head_size)
        if gqa_sizes_only or nonshared_attention == "gqa"
        else head_sizes(max_head_size)
    )
    config = DecoderConfig(
        num_layers=num_own + num_shared,
        layer_types=(*own_types, *shared_types),
        num_kv_shared_layers=num_shared,
        kv_sources=sources,
        hidden_size=draw(st.sampled_from([8, 16])),
        num_heads=num_kv_heads * group,
        num_kv_heads=num_kv_heads,
        head_dim_sliding=draw(sizes),
        head_dim_full=draw(sizes),
        sliding_window=draw(windows(max_window)),
        vocab_size=draw(st.integers(2, 13)),
        intermediate_size=draw(st.sampled_from([0, 8])),
        dtype=draw(st.sampled_from(["float32", "float16"])),
        mask_style=mask_style,
        p2_is_causal=draw(st.sampled_from([0, 1])) if mask_style == "p2" else 0,
        reshape_style=draw(st.sampled_from(["minus1", "explicit"])),
        nonshared_attention=nonshared_attention,
        attention_opset=draw(st.sampled_from([23, 24])),
        rotary=draw(st.sampled_from(["onnx", "microsoft"])),
        scale=draw(st.one_of(st.just(1.0), st.floats(0.05, 2.0).map(lambda x: round(x, 3)))),
        softcap=draw(st.one_of(st.just(0.0), st.floats(1.0, 50.0).map(lambda x: round(x, 2)))),
        seed=draw(st.integers(0, 1000)),
    )
    config.validate()  # by construction; a failure here is a bug of this strategy
    return config


def no_shared_configs() -> st.SearchStrategy[DecoderConfig]:
    """Decoders without KV-shared layers: nothing for the KV-shared rule to do."""
    return decoder_configs(min_shared=0, max_shared=0, max_head_size=64)


@dataclasses.dataclass(frozen=True)
class RunShapes:
    """Shapes of direct ONNX Runtime calls: a right-padded prefill, then a decode step.

    ``row_lengths[b]`` valid tokens of a prefill padded to ``max(row_lengths)``; ``past``
    tokens prefilled (unpadded), then one call of ``step`` tokens.
    """

    batch: int
    row_lengths: tuple[int, ...]
    past: int
    step: int


def _length(window: int, limit: int) -> st.SearchStrategy[int]:
    """A sequence length around the window: 1, W - 1, W, W + 1 or anything up to 2W + 4."""
    near = sorted({1, max(1, window - 1), window, window + 1})
    return st.one_of(st.sampled_from(near), st.integers(1, 2 * window + 4)).map(
        lambda n: min(n, limit)
    )


@st.composite
def run_shapes(draw: st.DrawFn, window: int, max_total: int = 128) -> RunShapes:
    batch = draw(st.integers(1, 3))
    rows = tuple(draw(_length(window, max_total)) for _ in range(batch))
    past = draw(_length(window, max_total - 1))
    step = draw(_length(window, max_total - past))
    return RunShapes(batch, rows, past, step)


@dataclasses.dataclass(frozen=True)
class SingleLayerCase:
    """One KV-shared layer on its own: query [B, S, N*D] over a borrowed [B, Nkv, T, D].

    ``valid_lengths[b]`` keys of row b are real (right padding); the queries are the last
    S real tokens of each row. When S == T (prefill) a row may be shorter than S: its
    padded query positions are not compared.
    """

    batch: int
    query_length: int
    total_length: int
    valid_lengths: tuple[int, ...]
    num_heads: int
    kv_num_heads: int
    head_size: int
    window: int | None
    mask_style: str  # "p1" (is_causal=1) or "p2" (causal bias, is_causal 0)
    scale: float | None  # None: no scale attribute (op default 1/sqrt(D))
    softcap: float
    dtype: str
    seed: int

    @property
    def is_prefill(self) -> bool:
        return self.query_length == self.total_length


@st.composite
def single_layer_cases(draw: st.DrawFn) -> SingleLayerCase:
    batch = draw(st.integers(1, 3))
    total = draw(st.integers(1, 80))
    query_length = draw(st.one_of(st.just(1), st.just(total), st.integers(1, total)))
    low = 1 if query_length == total else query_length
    valid = tuple(draw(st.integers(low, total)) for _ in range(batch))
    kv_num_heads = draw(st.integers(1, 4))
    window = draw(
        st.one_of(
            st.none(),
            st.sampled_from(sorted({1, total, total + 1, max(1, total - 1)})),
            st.integers(1, 96),
        )
    )
    return SingleLayerCase(
        batch=batch,
        query_length=query_length,
        total_length=total,
        valid_lengths=valid,
        num_heads=kv_num_heads * draw(st.integers(1, 4)),
        kv_num_heads=kv_num_heads,
        head_size=draw(head_sizes(512)),
        window=window,
        mask_style=draw(st.sampled_from(["p2", "p1"])),
        scale=draw(st.one_of(st.just(1.0), st.none(), st.floats(0.01, 1.0))),
        softcap=draw(st.one_of(st.just(0.0), st.floats(1.0, 50.0))),
        dtype=draw(st.sampled_from(["float32", "float16"])),
        seed=draw(st.integers(0, 2**16)),
    )
