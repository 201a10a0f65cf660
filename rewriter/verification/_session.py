"""ONNX Runtime sessions for the two models under comparison.

Sessions are the expensive part of a verification, so each model gets exactly one, reused by
every check. A path is handed to ORT as is (it resolves external data next to the file). An
in-memory model is serialized; a large one, or one whose weights live in external files, is
written to a temporary directory with external data instead, because a protobuf cannot exceed
2 GB. Beside the session we keep the model as onnx_ir, read-only, for the facts the signature
alone does not give (window sizes, vocabulary, rotary cache length).
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
from typing import TYPE_CHECKING

import onnx
import onnx_ir as ir
import onnxruntime as ort

from rewriter._error_text import clipped, collapsed
from rewriter._initializers import has_external_data, initializer_bytes
from rewriter._paths import ExternalDataError, external_tensors, trust_checked_external_data
from rewriter._scratch import Scratch
from rewriter.providers import PROVIDERS
from rewriter.verification._result import VerificationError

if TYPE_CHECKING:
    from rewriter.verification._shared_weights import SharedWeights

__all__ = [
    "LoadedModel",
    "ModelSource",
    "check_readable",
    "execution_providers",
    "open_session",
    "read_model",
    "short_error",
]

ModelSource = ir.Model | onnx.ModelProto | str | os.PathLike

# In-memory models above this many bytes of weights go through a temporary file: serializing
# them would build one protobuf close to (or over) its 2 GB limit, and copy all weights once.
_IN_MEMORY_LIMIT_BYTES = 1 << 30


@dataclasses.dataclass
class LoadedModel:
    """One model, opened once: its ORT session and its graph (never mutated)."""

    role: str
    session: ort.InferenceSession
    model: ir.Model
    tempdir: Scratch | None = None

    def close(self) -> None:
        if self.tempdir is not None:
            self.tempdir.cleanup()
            self.tempdir = None


def execution_providers(provider: str) -> list[str]:
    """ORT provider list for ``"cpu"`` or ``"cuda"``; a clear error when unavailable."""
    if provider not in PROVIDERS:
        raise VerificationError(f"unknown provider {provider!r}: choose 'cpu' or 'cuda'")
    if provider == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise VerificationError(
            "provider 'cuda' is unavailable: this onnxruntime has no CUDAExecutionProvider "
            "(install onnxruntime-gpu instead of onnxruntime, on a machine with a GPU)"
        )
    return list(PROVIDERS[provider])


def open_session(
    source: ModelSource,
    role: str,
    provider: str,
    shared_weights: SharedWeights | None = None,
    *,
    optimized: bool = True,
) -> LoadedModel:
    """One ORT session for ``source``, beside its graph (``read_model``).
    ``optimized=False``: graph optimizations disabled, the graph run as written (the
    original's twin that measures its spread, ``_spread``)."""
    providers = execution_providers(provider)
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimized
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    # Every run failure is caught and reported as a check result carrying ORT's message;
    # ORT's own error log would print the same message again, with a C++ signature.
    options.log_severity_level = 4
    tempdir: Scratch | None = None
    try:
        model = read_model(source, role)
        if isinstance(source, (str, os.PathLike)):
            session_input: str | bytes = os.fspath(source)
        elif has_external_data(model) or initializer_bytes(model) > _IN_MEMORY_LIMIT_BYTES:
            # Locked while this process lives: a kill cannot strand its copy of the
            # weights (the next verification removes it).
            tempdir = Scratch(tempfile.gettempdir(), prefix=f"verify-{role}-")
            session_input = os.path.join(tempdir.name, "model.onnx")
            _save_with_external_data(model, session_input, role)
        elif isinstance(source, onnx.ModelProto):
            session_input = source.SerializeToString()
        else:
            session_input = ir.serde.serialize_model(model).SerializeToString()
        if shared_weights is not None:
            shared_weights.apply(options, model, role)
        session = _create_session(session_input, options, providers, role)
        if provider == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
            raise VerificationError(
                f"provider 'cuda' is unavailable: ORT fell back to {session.get_providers()} "
                f"for the {role} model (CUDA libraries missing?)"
            )
    except BaseException:
        if tempdir is not None:
            tempdir.cleanup()
        raise
    return LoadedModel(role=role, session=session, model=model, tempdir=tempdir)


def short_error(error: BaseException) -> str:
    """ORT's error text reduced to one line: the node and the reason, not the C++ signature."""
    text = collapsed(error)
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = re.sub(r"/onnxruntime_src/\S+:\d+ ", "", text)
    text = re.sub(r"(?:[\w:<>]+ )?(?:onnxruntime|onnx)::[\w:<>~]+\([^()]*\) ", "", text)
    # ORT_ENFORCE messages repeat the failed C++ condition before the human-readable reason.
    head, marker, reason = text.partition("Status Message: ")
    if " was false. " in reason:
        text = f"{head}{marker}{reason.split(' was false. ', 1)[1]}"
    return clipped(text)


def read_model(source: ModelSource, role: str) -> ir.Model:
    """The graph of ``source`` as onnx-ir, weights left where they are (external tensors stay
    lazy: only their metadata is read). VerificationError for a path that cannot be read;
    the command line has already refused unusable files with its own one-line errors
    (``rewriter.model_io.load_model``)."""
    if isinstance(source, ir.Model):
        return source
    if isinstance(source, onnx.ModelProto):
        return ir.serde.deserialize_model(source)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"{role}: expected onnx_ir.Model, onnx.ModelProto or a path, "
            f"got {type(source).__name__}"
        )
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise VerificationError(f"{role} model not found: {path}")
    try:
        model = ir.load(path)
    except Exception as error:
        raise VerificationError(f"cannot read {role} model {path}: {short_error(error)}") from None
    try:
        # The locations the command line accepted (a Hugging Face cache's symbolic links
        # included) are read here the same way.
        trust_checked_external_data(model)
    except ExternalDataError as error:
        raise VerificationError(f"cannot read {role} model {path}: {error}") from None
    return model


def check_readable(model: ir.Model, role: str) -> None:
    """VerificationError, naming the file, unless every external tensor's file can be read.

    An in-memory model's weights may live elsewhere: a proto loaded without them reads them
    relative to the current directory, which need not be the model's.
    """
    for tensor in external_tensors(model):
        path = os.path.abspath(tensor.path)
        try:
            with open(path, "rb"):
                pass
        except OSError as error:
            hint = (
                " (a model without a base directory reads its external data relative to the "
                "current directory: pass the model's path, or load it with its weights)"
                if not tensor.base_dir
                else ""
            )
            raise VerificationError(
                f"cannot read the {role} model's external data for tensor {tensor.name}: "
                f"{path}: {error.strerror}{hint}"
            ) from None


def _save_with_external_data(model: ir.Model, path: str, role: str) -> None:
    try:
        # ir.save leaves the caller's model unchanged and reads external tensors lazily.
        ir.save(model, path, external_data="model.onnx.data")
    except Exception as error:
        raise VerificationError(
            f"cannot write the in-memory {role} model for ONNX Runtime: {short_error(error)}"
        ) from None


def _create_session(
    model: str | bytes, options: ort.SessionOptions, providers: list[str], role: str
) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(model, sess_options=options, providers=providers)
    except Exception as error:
        raise VerificationError(
            f"ONNX Runtime cannot load the {role} model: {short_error(error)}"
        ) from None
