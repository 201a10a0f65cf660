"""Loading models with clear errors, and writing them atomically.

Loading is lazy (onnx-ir leaves external weights on disk until they are read), so the
rewrite's memory does not grow with the weights. Writing goes to a temporary directory
beside the destination and is renamed into place, external data first and the model file
last: an interrupted run leaves either the previous state or a complete model, never a
half-written one, and the input is never opened for writing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx_ir as ir

__all__ = [
    "InputError",
    "OutputError",
    "external_data_name",
    "has_external_data",
    "load_model",
    "staged_output",
]

# Inline protobufs cannot exceed 2 GB; stay clear of that limit when saving inline.
_INLINE_LIMIT_BYTES = 1_800_000_000


class InputError(Exception):
    """The input cannot be used; the message is one line naming the problem."""


class OutputError(Exception):
    """The output cannot be written where asked; the message is one line."""


def load_model(path: str | os.PathLike[str]) -> ir.Model:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected an .onnx file")
    if not os.access(path, os.R_OK):
        raise InputError(f"{path}: not readable")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty file")
    try:
        model = ir.load(path)
    except Exception as error:  # protobuf raises several unrelated types on bad bytes
        raise InputError(f"{path}: not an ONNX model ({_one_line(error)})") from None
    if not model.graph.outputs or model.ir_version < 3:
        raise InputError(f"{path}: parses as protobuf but is not an ONNX model (no graph outputs)")
    _check_external_data(model, path)
    return model


def _check_external_data(model: ir.Model, path: Path) -> None:
    for tensor in _external_tensors(model):
        data_path = Path(tensor.base_dir) / tensor.location
        if not data_path.is_file():
            raise InputError(f"{path}: external data file {tensor.location} is missing")
        needed = tensor.offset + tensor.length if tensor.length else tensor.offset
        if data_path.stat().st_size < needed:
            raise InputError(
                f"{path}: external data file {tensor.location} is shorter than tensor "
                f"{tensor.name} needs ({data_path.stat().st_size} < {needed} bytes)"
            )


def _external_tensors(model: ir.Model) -> Iterator[ir.ExternalTensor]:
    for graph in (model.graph, *model.graph.subgraphs()):
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                yield value.const_value


def has_external_data(model: ir.Model) -> bool:
    return next(_external_tensors(model), None) is not None


def _initializer_bytes(model: ir.Model) -> int:
    total = 0
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is not None:
            total += tensor.nbytes
    return total


def external_data_name(output: Path) -> str:
    return output.name + ".data"


@contextlib.contextmanager
def staged_output(model: ir.Model, output: str | os.PathLike[str]) -> Iterator[Path]:
    """Save `model` to a temporary path beside `output`; yield it; publish on normal exit.

    The caller may inspect or verify the staged file inside the `with` block; raising
    there discards it. Weights go to external data named ``<output>.data`` when the input
    had external data or would exceed the inline protobuf limit.
    """
    output = Path(output)
    directory = output.parent if str(output.parent) else Path(".")
    if not directory.is_dir():
        raise OutputError(f"{output}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK):
        raise OutputError(f"{output}: directory {directory} is not writable")
    if output.is_dir():
        raise OutputError(f"{output}: is a directory")
    external = has_external_data(model) or _initializer_bytes(model) > _INLINE_LIMIT_BYTES
    data_name = external_data_name(output) if external else None
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=directory))
    try:
        staged = staging / output.name
        try:
            ir.save(model, staged, external_data=data_name)
        except OSError as error:
            raise OutputError(f"{output}: cannot write ({_one_line(error)})") from None
        yield staged
        # Data before model: a model file that exists always has its weights beside it.
        if data_name is not None:
            os.replace(staging / data_name, directory / data_name)
        os.replace(staged, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:200]
