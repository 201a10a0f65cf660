"""The model each form is probed on: what the KV-shared rule writes for the one-layer export.

The probe certifies the rule's own construction, not a copy of it: the export of
``_one_layer`` (P2 mask over ``attention_mask``, the borrowed BNSH cache made 3-D) is
rewritten with a chooser that returns the form under test, and that rewritten model runs.

Inputs, caches and output are in the probed dtype, as in a real export: a Cast in front of
the caches would hide from the rule that key and value are one source's cache, so the
runner feeds bfloat16 as OrtValues instead (onnxruntime's Python API has no bfloat16 NumPy
type). Only the output gets a Cast to float32, after the layer, for the same reason.
"""

from __future__ import annotations

import onnx_ir as ir

from rewriter.probe._one_layer import OneLayer, kv_shared_layer, rewritten_layer

__all__ = ["DTYPES", "FORMS", "GQA_NODE_NAME", "OUTPUT", "form_model"]

FORMS: tuple[str, ...] = ("past", "past-present", "kv", "split", "split-nopresent")

DTYPES: dict[str, ir.DataType] = {
    "float32": ir.DataType.FLOAT,
    "float16": ir.DataType.FLOAT16,
    "bfloat16": ir.DataType.BFLOAT16,
}

OUTPUT = "output"

# The rewrite numbers node names across the process; one fixed name keeps one error text per
# cause (the table footnotes each once) and finds the node in the profile.
GQA_NODE_NAME = "gqa"


def form_model(
    form: str,
    dtype: str,
    *,
    num_heads: int,
    kv_num_heads: int,
    head_size: int,
    scale: float,
    local_window_size: int | None,
    softcap: float = 0.0,
) -> ir.Model:
    """The rewritten one-layer export for ``form``; its GroupQueryAttention is GQA_NODE_NAME.

    Inputs: ``query`` [B, S, N*D], ``attention_mask`` int64 [B, T], the borrowed cache
    ``past_key_values.0.key|value`` [B, Nkv, T, D], all but the mask in ``dtype``.
    Output: ``output`` [B, S, N*D] float32.
    """
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; expected one of {FORMS}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {tuple(DTYPES)}")
    export = kv_shared_layer(
        OneLayer(
            num_heads=num_heads,
            kv_num_heads=kv_num_heads,
            head_size=head_size,
            window=local_window_size,
            mask_style="p2",
            scale=scale,
            softcap=softcap,
            dtype=dtype,
        )
    )
    _float32_output(export, dtype)
    # No window slice: the window is then GQA's alone to apply, over every key of the
    # borrowed cache; the slice itself is checked against the reference in the tests.
    model, gqa = rewritten_layer(export, form, window_slice=False)
    gqa.name = GQA_NODE_NAME
    return model


def _float32_output(model: ir.Model, dtype: str) -> None:
    """Cast the layer's output to float32 (onnxruntime cannot return bfloat16 to NumPy)."""
    graph = model.graph
    (output,) = graph.outputs
    if output.dtype == ir.DataType.FLOAT:
        return
    cast = ir.node("Cast", [output], {"to": int(ir.DataType.FLOAT)}, name="output_to_float32")
    graph.append(cast)
    output.name = f"{OUTPUT}_{dtype}"
    result = cast.outputs[0]
    result.name = OUTPUT
    result.type = ir.TensorType(ir.DataType.FLOAT)
    result.shape = output.shape
    graph.outputs[0] = result
