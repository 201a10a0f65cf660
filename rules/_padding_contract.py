"""The padding contracts a rewritten model can declare, in one spelling.

The rules decide some (a layer read without an attention_mask can only promise rows of one
length), the report states the one that holds and the model's metadata records it, and the
verifier holds the rewrite to what the metadata declares. They live with the rules because
the rules import nothing of the rewriter around them, while everything else may read them.
"""

from __future__ import annotations

__all__ = ["PaddingContract"]


class PaddingContract:
    """What padding the rewritten model accepts, compared with the original."""

    UNCHANGED = "unchanged"  # nothing rewritten, or GQA layers already imposed right padding
    RIGHT_PADDING_ONLY = "right-padding-only"  # narrowed: left padding/holes no longer exact
    EXACT = "exact"  # --exact-padding: the mask is passed to GQA as attention_bias
    # The graph has no attention_mask (HF exporter): no padding to honour; lengths come from
    # the cache (rows of one length only; batched multi-token calls after a past run where
    # the graph's shapes allow them, rules._batched_chunks).
    BATCH_1_ONLY = "batch-1-only"
