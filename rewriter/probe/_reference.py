"""Float64 NumPy reference for what a KV-shared layer's GroupQueryAttention must compute.

Letters: B batch, S query length of this call, T length of the borrowed cache (buffer length,
may exceed a row's valid length when rows are right-padded), N query heads, Nkv KV heads,
D head size, W sliding window.

The reference is written from the model's point of view, not GQA's: row ``b`` holds
``valid_lengths[b]`` real tokens (a valid prefix, i.e. right padding), the ``S`` queries are its
last ``S`` real tokens, and the borrowed cache already contains their keys (the source layer
wrote them). Query ``i`` of row ``b`` sits at ``pos = valid_lengths[b] - S + i`` and sees key
``j`` iff ``j <= pos`` (causal), ``pos - j < W`` (SPEC section 4: W keys including itself) and
``j < valid_lengths[b]`` (padding).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["attention_reference"]


def attention_reference(
    query_BSND: npt.ArrayLike,
    key_BNSH: npt.ArrayLike,
    value_BNSH: npt.ArrayLike,
    valid_lengths: npt.ArrayLike,
    *,
    num_heads: int,
    kv_num_heads: int,
    scale: float,
    local_window_size: int | None = None,
    softcap: float = 0.0,
) -> npt.NDArray[np.float64]:
    """Return the attention output [B, S, N*D] in float64.

    ``query_BSND`` is [B, S, N*D]; ``key_BNSH``/``value_BNSH`` are [B, Nkv, T, D];
    ``valid_lengths`` is [B]. Query head ``h`` reads KV head ``h // (N // Nkv)`` (GQA grouping).
    ``local_window_size`` None means full attention. ``softcap`` > 0 applies
    ``c * tanh(score / c)`` before masking, as both ONNX Attention and GQA do.
    """
    query = np.asarray(query_BSND, dtype=np.float64)
    key = np.asarray(key_BNSH, dtype=np.float64)
    value = np.asarray(value_BNSH, dtype=np.float64)
    lengths = np.asarray(valid_lengths, dtype=np.int64)
    batch, seq_len, hidden = query.shape
    _, kv_heads, total_len, head_size = key.shape
    if num_heads % kv_num_heads or kv_heads != kv_num_heads or hidden != num_heads * head_size:
        raise ValueError(
            f"inconsistent shapes: query {query.shape}, key {key.shape}, "
            f"num_heads={num_heads}, kv_num_heads={kv_num_heads}"
        )
    if np.any(lengths < seq_len) or np.any(lengths > total_len):
        raise ValueError(
            f"valid_lengths {lengths.tolist()} must lie in [S={seq_len}, T={total_len}]"
        )

    group = num_heads // kv_num_heads
    query_BNSH = query.reshape(batch, seq_len, num_heads, head_size).transpose(0, 2, 1, 3)
    # Expand KV heads to query heads: head h uses KV head h // group.
    key_full = np.repeat(key, group, axis=1)
    value_full = np.repeat(value, group, axis=1)

    scores = scale * np.einsum("bhsd,bhtd->bhst", query_BNSH, key_full)
    if softcap > 0.0:
        scores = softcap * np.tanh(scores / softcap)

    query_pos = lengths[:, None] - seq_len + np.arange(seq_len)[None, :]  # [B, S]
    key_pos = np.arange(total_len)
    distance = query_pos[:, :, None] - key_pos[None, None, :]  # [B, S, T]
    visible = (distance >= 0) & (key_pos[None, None, :] < lengths[:, None, None])
    if local_window_size is not None:
        visible &= distance < local_window_size
    scores = np.where(visible[:, None, :, :], scores, -np.inf)

    # Every query sees at least itself, so no row is fully masked.
    scores -= scores.max(axis=-1, keepdims=True)
    weights = np.exp(scores)
    weights /= weights.sum(axis=-1, keepdims=True)
    output_BNSH = np.einsum("bhst,bhtd->bhsd", weights, value_full)
    return output_BNSH.transpose(0, 2, 1, 3).reshape(batch, seq_len, num_heads * head_size)
