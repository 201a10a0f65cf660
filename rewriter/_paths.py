"""Path questions the command line, the model writer and the verifier all ask.

External data: a model says where its weights are (``location``, relative to its own file).
That statement is checked here, lexically: not empty, not absolute, not leading out of the
model's folder through ``..``; the file it names must exist and be a regular file. What the
folder itself holds is the user's: a symbolic link in it to a regular file elsewhere is how
the Hugging Face hub cache lays models out (``snapshots/<rev>/model.onnx_data`` ->
``../../blobs/<sha>``), and ONNX Runtime loads it. onnx-ir refuses such links (and files
with several hard links) when it reads a tensor, so a tensor that passed these checks but
that onnx-ir would refuse is pointed at its file by absolute path, outside onnx-ir's
containment check.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import onnx_ir as ir

__all__ = [
    "ExternalDataError",
    "check_external_data",
    "external_tensors",
    "same_file",
    "trust_checked_external_data",
]


class ExternalDataError(ValueError):
    """An external tensor's location is refused; one line naming the tensor and location."""


def same_file(a: Path, b: Path) -> bool:
    """Whether `a` and `b` are one existing file (links and other spellings included)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # either is missing or unreadable: not the same existing file
        return False


def check_external_data(model: ir.Model) -> None:
    """ExternalDataError unless every external initializer's location is one we accept."""
    for tensor in external_tensors(model):
        _check_location(tensor)


def trust_checked_external_data(model: ir.Model) -> None:
    """Check every external initializer's location (ExternalDataError) and let onnx-ir read
    the files that passed, symbolic links and hard links included."""
    for value in _external_initializers(model):
        tensor = value.const_value
        assert isinstance(tensor, ir.ExternalTensor)
        _check_location(tensor)
        # onnx-ir's own refusal, applied at every read (absent from older onnx-ir).
        onnx_ir_refusal = getattr(tensor, "_check_path_containment", None)
        if onnx_ir_refusal is None:
            continue
        try:
            onnx_ir_refusal()
        except ValueError:
            value.const_value = _by_absolute_path(tensor)


def _external_initializers(model: ir.Model) -> Iterator[ir.Value]:
    for graph in model.graphs():
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                yield value


def external_tensors(model: ir.Model) -> Iterator[ir.ExternalTensor]:
    """The initializers whose bytes are in external data files."""
    for value in _external_initializers(model):
        assert isinstance(value.const_value, ir.ExternalTensor)
        yield value.const_value


def _check_location(tensor: ir.ExternalTensor) -> None:
    location = tensor.location
    where = f"external data {location!r} of tensor {tensor.name}"
    if not location.strip():
        raise ExternalDataError(f"tensor {tensor.name}: its external data location is empty")
    if os.path.isabs(location) or os.path.splitdrive(location)[0]:
        raise ExternalDataError(
            f"{where}: an absolute path; a model's external data must lie in its own folder"
        )
    normalized = os.path.normpath(location)
    if normalized == os.pardir or normalized.startswith(os.pardir + os.sep):
        raise ExternalDataError(f"{where}: leads out of the model's folder (..); refused")
    if normalized == os.curdir:
        raise ExternalDataError(f"{where}: names the model's folder, not a file")
    path = tensor.path
    try:
        status = os.stat(path)  # through symbolic links: what will be read
    except FileNotFoundError:
        dangling = os.path.islink(path)
        raise ExternalDataError(
            f"{where}: file is missing" + (" (a symbolic link to nothing)" if dangling else "")
        ) from None
    except OSError as error:
        raise ExternalDataError(f"{where}: cannot be accessed ({error.strerror})") from None
    if stat.S_ISDIR(status.st_mode):
        raise ExternalDataError(f"{where}: is a directory, not a file")
    if not stat.S_ISREG(status.st_mode):
        raise ExternalDataError(f"{where}: not a regular file (a device, FIFO or socket); refused")


def _by_absolute_path(tensor: ir.ExternalTensor) -> ir.ExternalTensor:
    """The same bytes, located by absolute path with no base directory (onnx-ir checks
    containment only against a base directory; ours was checked above)."""
    return ir.ExternalTensor(
        os.path.abspath(tensor.path),
        tensor.offset,
        tensor.length,
        tensor.dtype,
        shape=tensor.shape,
        name=tensor.name,
        doc_string=tensor.doc_string,
        metadata_props=tensor.metadata_props,
        base_dir="",
    )
