"""Scenarios of a layer proof and the float64 NumPy reference of what a layer means.

Dimension letters: B batch, S query length, T total length, P = T - S past length, N query
heads, Nkv KV heads, D head size, W sliding window.

What an attention layer of these decoders means (SPEC.md section 4), for query i of row b at
position ``q[b, i]`` and key j at position j (caches are right-padded, so a key's position is
its index): key j is visible iff ``attention_mask[b, j] != 0`` and ``0 <= q[b, i] - j`` and,
with a window, ``q[b, i] - j < W``. A layer without mask and with ``is_causal=0`` (a
drafter's full layer, ``LayerConfig.every_key_visible``) sees every key of the cache,
whatever attention_mask and the query's position say. Scores are ``scale * q.k``, soft-capped as
``c * tanh(s / c)`` before masking, softmax over the visible keys, query head h reads KV head
``h // (N / Nkv)``. Query rows at padding positions (``q = -1``) are not compared.

Inputs are drawn so that the scores have a standard deviation of about 3 whatever D and
the scale (as RMS-normed q/k give a trained model), values are standard normal; the
reference is computed from the values as fed, after rounding to the model's dtype.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from rewriter.verification._layer_extract import (
    ATTENTION_MASK,
    INPUT_IDS,
    KEY_CACHE,
    KEY_NEW,
    KEY_TOTAL,
    OUTPUT,
    OWN_CACHE,
    PAST_KEY,
    PAST_VALUE,
    POSITION_IDS,
    PRESENT_KEY,
    PRESENT_VALUE,
    QUERY,
    QUERY_SHAPE,
    VALUE_CACHE,
    VALUE_NEW,
    VALUE_TOTAL,
    LayerConfig,
)

__all__ = [
    "LINEAR_LIMIT",
    "QUADRATIC_LIMIT",
    "Scenario",
    "ScenarioData",
    "make_data",
    "reference",
    "scenarios",
    "window_note",
]

_SCORE_STD = 3.0
_CHUNK = 3


@dataclasses.dataclass(frozen=True)
class Scenario:
    """One call of the layer: ``check`` groups scenarios into one reported check."""

    check: str  # prefill | decode | chunk | batch_prefill | batch_decode
    label: str
    batch: int
    query_length: int  # S
    total_length: int  # T
    valid_lengths: tuple[int, ...]  # keys per row that attention_mask marks valid
    # Position of each query row (B x S); -1 for a query at a padding position.
    query_positions: tuple[tuple[int, ...], ...]
    # The new key of a padded row sits at slot T - 1, after the row's padding (the export's
    # Attention with past appends there); else valid keys are each row's first slots.
    appended: bool = False

    @property
    def past_length(self) -> int:
        return self.total_length - self.query_length


# Runs whose cost grows with S x T (prefill S = T, the padded batch prefill) stop at this
# length; runs of a few queries (decode, a chunk) at LINEAR_LIMIT. Crossing the window's edge
# takes one query with keys at distance W-1, W and W+1, i.e. T = W + 2: windows up to 1024
# (Gemma's 512 among them) are crossed in every scenario, longer ones up to LINEAR_LIMIT - 3
# by decode and chunk runs only, at a cost linear in W; a window longer still is stated as
# not reached (window_note). Prefills at 4098 cost 25-45 s per scenario on 2 cores.
QUADRATIC_LIMIT = 1026
LINEAR_LIMIT = 1 << 16
# Reference rows per block: bounds the float64 score arrays whatever T.
_REFERENCE_ELEMENTS = 1 << 22


def scenarios(config: LayerConfig, window: int) -> list[Scenario]:
    """Prefill S = T, decode S = 1, a chunk after a past, right-padded batch 2, at lengths
    around ``window`` (the layer's W, or the model's largest W for full layers): one query
    sees keys at distance W-1, W and W+1 in each kind of run that reaches T = W + 2."""
    w = max(window, 2)
    out: list[Scenario] = []
    for t in sorted({1, min(w + 1, QUADRATIC_LIMIT), min(w + 2, QUADRATIC_LIMIT)}):
        out.append(_single("prefill", f"prefill S=T={t}", t, t))
    for t in sorted({min(length, LINEAR_LIMIT) for length in (w - 1, w, w + 1, w + 2)}):
        out.append(_single("decode", f"decode T={t}", 1, t))
    for t in sorted({min(w + 1, LINEAR_LIMIT), min(w + _CHUNK, LINEAR_LIMIT)}):
        out.append(_single("chunk", f"chunk of {_CHUNK} at T={t}", _CHUNK, t))
    padded = min(w + 1, QUADRATIC_LIMIT)
    rows = (padded, max(1, padded // 2))
    out.append(
        Scenario(
            "batch_prefill",
            f"right-padded batch 2 prefill T={padded}, rows of {rows[0]} and {rows[1]}",
            2,
            padded,
            padded,
            rows,
            tuple(tuple(i if i < n else -1 for i in range(padded)) for n in rows),
        )
    )
    total = min(w + 2, LINEAR_LIMIT)
    if config.appends_after_padding:
        # Both layers take the new key after the padding: row 1 holds its prompt's keys,
        # padding, and its new key at slot T - 1 (valid lengths count its real keys).
        rows = (total, max(1, min(w, total - 1)))
        out.append(
            Scenario(
                "batch_decode",
                f"right-padded batch 2 decode T={total}, rows of {rows[0]} and {rows[1]} keys, "
                "the new key appended after the padding",
                2,
                1,
                total,
                rows,
                tuple((n - 1,) for n in rows),
                appended=True,
            )
        )
    if config.kind != OWN_CACHE:
        # A layer that writes its cache appends after the padding (Attention) or at
        # seqlens_k (GQA): the two conventions differ by design, so padded decode of a layer
        # rewritten to GQA over its own cache is left to the whole-model check.
        rows = (total, max(1, min(w, total - 1)))
        out.append(
            Scenario(
                "batch_decode",
                f"right-padded batch 2 decode T={total}, rows of {rows[0]} and {rows[1]} keys",
                2,
                1,
                total,
                rows,
                tuple((n - 1,) for n in rows),
            )
        )
    return out


def window_note(config: LayerConfig) -> str:
    """What the scenarios leave out of a long window, in words ("" when nothing)."""
    if config.window is None:
        return ""
    edge = config.window + 2
    if edge > LINEAR_LIMIT:
        return (
            f"window {config.window} is longer than any context the proof runs "
            f"(T <= {LINEAR_LIMIT}): its edge is not exercised, the layer is proven as "
            "attention over every earlier key up to that length"
        )
    if edge > QUADRATIC_LIMIT:
        return (
            f"window {config.window}: prefill runs stop at T={QUADRATIC_LIMIT}, before its "
            "edge; decode and chunk runs cross it"
        )
    return ""


def _single(check: str, label: str, s: int, t: int) -> Scenario:
    return Scenario(check, label, 1, s, t, (t,), (tuple(range(t - s, t)),))


@dataclasses.dataclass
class ScenarioData:
    feeds: dict[str, np.ndarray]  # by role
    expected: dict[str, np.ndarray]  # float64 reference by output role
    valid_queries: np.ndarray  # bool [B, S]
    valid_keys: np.ndarray  # bool [B, T]


def make_data(
    config: LayerConfig, scenario: Scenario, seed: int, input_dtypes: dict[str, np.dtype]
) -> ScenarioData:
    rng = np.random.default_rng(seed)
    b, s, t = scenario.batch, scenario.query_length, scenario.total_length
    n, nkv, d = config.num_heads, config.kv_num_heads, config.head_size
    sigma = math.sqrt(_SCORE_STD / (abs(config.scale) * math.sqrt(d)))
    dtype = config.dtype
    # Round to the model's dtype first: the reference sees exactly what the layers see.
    query = (rng.standard_normal((b, n, s, d)) * sigma).astype(dtype).astype(np.float64)
    key = (rng.standard_normal((b, nkv, t, d)) * sigma).astype(dtype).astype(np.float64)
    value = rng.standard_normal((b, nkv, t, d)).astype(dtype).astype(np.float64)
    slots = np.arange(t)[None, :]
    lengths = np.array(scenario.valid_lengths)[:, None]
    key_positions = None  # a key's position is its slot
    if scenario.appended:
        # A row's first n - 1 keys, then padding, then its new key at slot T - 1, whose
        # position is n - 1: how many valid keys precede it (the exports' CumSum of the mask).
        valid_keys = (slots < lengths - 1) | (slots == t - 1)
        key_positions = np.cumsum(valid_keys, axis=1) - 1
    else:
        valid_keys = slots < lengths
    positions = np.array(scenario.query_positions, dtype=np.int64)
    mask_dtype = input_dtypes.get(ATTENTION_MASK, np.dtype(np.int64))
    p = scenario.past_length
    merged = (b, -1, nkv * d)
    query_BSD = query.transpose(0, 2, 1, 3).reshape(b, s, n * d).astype(dtype)
    feeds = {
        QUERY: query_BSD,
        QUERY_SHAPE: query_BSD,
        KEY_CACHE: key.astype(dtype),
        VALUE_CACHE: value.astype(dtype),
        KEY_TOTAL: key.transpose(0, 2, 1, 3).reshape(merged).astype(dtype),
        VALUE_TOTAL: value.transpose(0, 2, 1, 3).reshape(merged).astype(dtype),
        KEY_NEW: key[:, :, p:].transpose(0, 2, 1, 3).reshape(merged).astype(dtype),
        VALUE_NEW: value[:, :, p:].transpose(0, 2, 1, 3).reshape(merged).astype(dtype),
        PAST_KEY: key[:, :, :p].astype(dtype),
        PAST_VALUE: value[:, :, :p].astype(dtype),
        ATTENTION_MASK: valid_keys.astype(mask_dtype),
        INPUT_IDS: np.zeros((b, s), dtype=input_dtypes.get(INPUT_IDS, np.dtype(np.int64))),
        POSITION_IDS: np.maximum(positions, 0).astype(
            input_dtypes.get(POSITION_IDS, np.dtype(np.int64))
        ),
    }
    expected = {
        OUTPUT: reference(query, key, value, valid_keys, positions, config, key_positions),
        PRESENT_KEY: key,
        PRESENT_VALUE: value,
    }
    return ScenarioData(feeds, expected, positions >= 0, valid_keys)


def reference(
    query_BNSD: np.ndarray,
    key_BNTD: np.ndarray,
    value_BNTD: np.ndarray,
    valid_keys: np.ndarray,
    query_positions: np.ndarray,
    config: LayerConfig,
    key_positions: np.ndarray | None = None,
) -> np.ndarray:
    """Attention output [B, S, N*D] in float64 (rows at padded queries are zero), computed
    in blocks of query rows so that memory stays linear in T. `key_positions` [B, T]: each
    key slot's position (default: its slot)."""
    b, n, s, d = query_BNSD.shape
    t = key_BNTD.shape[2]
    group = n // key_BNTD.shape[1]
    key = np.repeat(key_BNTD, group, axis=1)
    value = np.repeat(value_BNTD, group, axis=1)
    if key_positions is None:
        key_positions = np.broadcast_to(np.arange(t)[None, :], (b, t))
    rows = max(1, _REFERENCE_ELEMENTS // max(1, b * n * t))
    out = np.empty((b, n, s, d), dtype=np.float64)
    for start in range(0, s, rows):
        block = slice(start, min(s, start + rows))
        out[:, :, block] = _attend(
            query_BNSD[:, :, block],
            key,
            value,
            valid_keys,
            query_positions[:, block],
            key_positions,
            config,
        )
    return out.transpose(0, 2, 1, 3).reshape(b, s, n * d)


def _attend(
    query: np.ndarray,
    key: np.ndarray,
    value: np.ndarray,
    valid_keys: np.ndarray,
    query_positions: np.ndarray,
    key_positions: np.ndarray,
    config: LayerConfig,
) -> np.ndarray:
    scores = config.scale * np.matmul(query, key.transpose(0, 1, 3, 2))
    if config.softcap:
        scores = config.softcap * np.tanh(scores / config.softcap)
    distance = query_positions[:, None, :, None] - key_positions[:, None, None, :]
    if config.every_key_visible:
        # The original reads neither attention_mask nor positions: nothing hides a key.
        visible = np.ones_like(distance, dtype=bool)
    else:
        visible = valid_keys[:, None, None, :] & (distance >= 0)
    if config.window is not None:
        visible &= distance < config.window
    visible &= query_positions[:, None, :, None] >= 0
    scores = np.where(visible, scores, -np.inf)
    top = np.max(scores, axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    weights = np.where(visible, np.exp(scores - top), 0.0)
    total = weights.sum(axis=-1, keepdims=True)
    weights = weights / np.where(total > 0, total, 1.0)
    return np.matmul(weights, value)  # [B, N, rows, D]
