"""Loading models with clear errors, and writing them atomically.

Loading is lazy (onnx-ir leaves external weights on disk until they are read), so the
rewrite's memory does not grow with the weights; saving copies external tensors file to
file (onnx-ir's ``ExternalTensor.tofile``: ``copy_file_range`` or 1 MiB chunks), so it does
not either.

Writing goes to a temporary directory beside the destination, is flushed to disk, and is
renamed into place, external data first and the model file last, with SIGINT/SIGTERM held
back during the renames: an interrupted run (signal, full disk) leaves either the previous
state or a complete model, never a half-written one, and the input is never opened for
writing. The one window left is a hard kill (SIGKILL, power loss) between the two renames
while *replacing* an existing model that has external data: the old model file then sits
beside the new weights.

A hard kill leaves the staging directory behind; it is locked while its writer lives
(``rewriter._scratch``), and the next write to the same output removes it. Two runs writing
the same output at once publish one after the other (a ``flock`` on the directory around
the renames), each re-checking first what it checked before its rewrite, so the model and
data files that end up there are always one writer's pair.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import signal
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import onnx_ir as ir
from google.protobuf.message import DecodeError

from rewriter._error_text import first_line
from rewriter._initializers import has_external_data, initializer_bytes
from rewriter._paths import (
    ExternalDataError,
    external_tensors,
    same_file,
    trust_checked_external_data,
)
from rewriter._scratch import Scratch
from rewriter.metadata import VERSION_KEY

__all__ = [
    "TOOL_METADATA_KEY",
    "InputError",
    "Interrupted",
    "OutputError",
    "check_destination",
    "check_new_folder",
    "external_data_name",
    "has_external_data",
    "load_model",
    "signals_as_exceptions",
    "staged_folder",
    "staged_output",
]

# Inline protobufs cannot exceed 2 GB; stay clear of that limit when saving inline.
_INLINE_LIMIT_BYTES = 1_800_000_000
_PROTOBUF_LIMIT_BYTES = 2**31

# Written into every rewritten model; it is how an existing <OUT>.data is recognised as this
# tool's own and may be replaced.
TOOL_METADATA_KEY = VERSION_KEY

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class InputError(Exception):
    """The input cannot be used; the message is one line naming the problem."""


class OutputError(Exception):
    """The output cannot be written where asked; the message is one line."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised as an exception so every ``finally`` removes what it staged.

    ``written`` is the output path when the signal arrived after the output was published.
    """

    def __init__(self, signum: int, written: Path | None = None) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.written = written

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


# --- loading -----------------------------------------------------------------------------


def load_model(path: str | os.PathLike[str]) -> ir.Model:
    """Load `path` lazily; InputError (one line) for anything that is not a usable model."""
    path = Path(path)
    try:
        status = path.stat()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as error:
        raise InputError(f"{path}: cannot be accessed ({_reason(error)})") from None
    if stat.S_ISDIR(status.st_mode):
        raise InputError(f"{path}: is a directory, expected an .onnx file")
    if not stat.S_ISREG(status.st_mode):
        raise InputError(f"{path}: is not a regular file, expected an .onnx file")
    if status.st_size == 0:
        raise InputError(f"{path}: empty file")
    _check_readable(path, "")
    if status.st_size >= _PROTOBUF_LIMIT_BYTES:
        raise InputError(
            f"{path}: {status.st_size} bytes; an ONNX protobuf cannot exceed 2 GB "
            "(models this large keep their weights in external data)"
        )
    try:
        model = ir.load(path)
    except DecodeError:
        raise InputError(
            f"{path}: not an ONNX model (cannot be parsed as protobuf: corrupt, truncated "
            "or another format)"
        ) from None
    except Exception as error:  # protobuf/onnx-ir raise several unrelated types on bad bytes
        raise InputError(f"{path}: not a valid ONNX model ({first_line(error)[:200]})") from None
    missing = [
        what
        for what, absent in (
            ("ir_version", model.ir_version < 1),
            ("opset_import", not model.opset_imports),
            ("graph outputs", not model.graph.outputs),
        )
        if absent
    ]
    if missing:
        raise InputError(
            f"{path}: a protobuf message but not an ONNX model (no {', no '.join(missing)})"
        )
    _check_external_data(model, path)
    return model


def _check_readable(path: Path, what: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as error:
        raise InputError(f"{path}: {what}not readable ({_reason(error)})") from None


def _check_external_data(model: ir.Model, path: Path) -> None:
    """Every external tensor's file is where the model says (in its folder, a regular file),
    readable and long enough; onnx-ir is then let read those behind symbolic links."""
    attribute = next(_external_attribute_tensors(model), None)
    if attribute is not None:
        owner, tensor = attribute
        # ir.save relocates initializers only; an attribute would keep a stale location.
        raise InputError(
            f"{path}: node {owner} keeps a tensor attribute in external data "
            f"({tensor.location}); only initializers may use external data here"
        )
    try:
        trust_checked_external_data(model)
    except ExternalDataError as error:
        raise InputError(f"{path}: {error}") from None
    for tensor in external_tensors(model):
        where = f"{path}: external data {tensor.location} of tensor {tensor.name}"
        data_path = Path(tensor.path)
        _check_readable(data_path, f"external data of {path} ")
        offset = tensor.offset or 0
        length = tensor.length if tensor.length is not None else tensor.nbytes
        if tensor.length is not None and tensor.length != tensor.nbytes:
            raise InputError(
                f"{where}: length {tensor.length} bytes, but shape {tensor.shape} of "
                f"{tensor.dtype.name} needs {tensor.nbytes}"
            )
        size = data_path.stat().st_size
        if size < offset + length:
            raise InputError(
                f"{where}: file is shorter than the tensor needs "
                f"({size} < {offset + length} bytes at offset {offset})"
            )


def _external_attribute_tensors(model: ir.Model) -> Iterator[tuple[str, ir.ExternalTensor]]:
    """(node, tensor) for every tensor attribute kept in external data."""
    graphs_and_functions = (model.graph, *model.functions.values())
    for graph_like in graphs_and_functions:
        for node in ir.traversal.RecursiveGraphIterator(graph_like):
            for attribute in node.attributes.values():
                if attribute.type == ir.AttributeType.TENSOR and isinstance(
                    attribute.value, ir.ExternalTensor
                ):
                    yield node.name or node.op_type, attribute.value


# --- writing -----------------------------------------------------------------------------


def external_data_name(output: Path) -> str:
    return output.name + ".data"


@contextlib.contextmanager
def staged_output(
    model: ir.Model,
    output: str | os.PathLike[str],
    *,
    source: str | os.PathLike[str] | None = None,
) -> Iterator[Path]:
    """Save `model` to a temporary path beside `output`; yield it; publish on normal exit.

    The caller may inspect or verify the staged file inside the `with` block; raising
    there discards it. Weights go to external data named ``<output>.data`` when the input
    had external data or would exceed the inline protobuf limit (in place: to the input's
    own data file, when it has exactly one beside it). `source` is the file the
    model was loaded from: nothing of it is overwritten unless `output` is `source` itself
    (the caller decides whether that is allowed, e.g. ``--in-place``).
    """
    output = Path(output)
    directory = output.parent
    check_destination(output)
    source_path = Path(source) if source is not None else None
    data_name = None
    if has_external_data(model) or initializer_bytes(model) > _INLINE_LIMIT_BYTES:
        in_place = source_path is not None and same_file(source_path, output)
        own_name = _own_data_name(model, output) if in_place else None
        data_name = own_name or external_data_name(output)
    _check_no_clobbering(model, output, data_name, source_path)

    with _staging_beside(output) as stage:
        staged = stage.path / output.name
        _save(model, staged, data_name, output)
        yield staged
        # One writer at a time publishes into this directory, so a model and its data are
        # always one writer's pair; the waiting is done before signals are held.
        with _publishing_in(directory), _signals_held():
            # What was checked before the (long) rewrite may have changed meanwhile: an
            # <OUT>.data that is not this tool's may have appeared.
            _check_no_clobbering(model, output, data_name, source_path)
            # Data before model: a model file that exists always has its weights beside it.
            if data_name is not None and (stage.path / data_name).exists():
                os.replace(stage.path / data_name, directory / data_name)
            os.replace(staged, output)
            stage.published = True
            _fsync_directory(directory)


@contextlib.contextmanager
def staged_folder(output: str | os.PathLike[str]) -> Iterator[Path]:
    """An empty folder staged beside `output` (a folder that must not exist yet); renamed to
    `output` on normal exit, removed on any other. What the caller writes into it (models
    through :func:`staged_output`, copies) is published in one rename, so `output` is
    either absent or complete."""
    output = Path(output)
    check_new_folder(output)
    with _staging_beside(output) as stage:
        staged = stage.path / output.name
        staged.mkdir()
        yield staged
        for path in staged.rglob("*"):
            if path.is_file() and not path.is_symlink():
                _fsync_file(path)
        with _publishing_in(output.parent), _signals_held():
            check_new_folder(output)  # it may have appeared during the rewrite
            os.rename(staged, output)
            stage.published = True
            _fsync_directory(output.parent)


@dataclasses.dataclass
class _Stage:
    """A staging directory beside an output, and whether its content has reached it."""

    path: Path
    published: bool = False


@contextlib.contextmanager
def _staging_beside(output: Path) -> Iterator[_Stage]:
    """A locked staging directory beside `output`, removed on any exit. The caller publishes
    from it and sets ``published``: an interruption after that names `output` as written."""
    staging: Scratch | None = None
    stage: _Stage | None = None
    try:
        try:
            with _signals_held():  # a signal here must not leave an untracked directory
                staging = _make_staging_directory(output, output.parent)
            stage = _Stage(staging.path)
            yield stage
        finally:
            if staging is not None:
                with _signals_held():
                    staging.cleanup()
    except Interrupted as interruption:
        if stage is not None and stage.published:
            interruption.written = output
        raise


def check_new_folder(output: Path) -> None:
    """OutputError (one line) unless `output` is absent and its parent a writable folder."""
    if os.path.lexists(output):
        raise OutputError(f"{output}: exists; the output folder must be new")
    directory = output.parent
    if not directory.is_dir():
        raise OutputError(f"{output}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise OutputError(f"{output}: directory {directory} is not writable")


@contextlib.contextmanager
def _publishing_in(directory: Path) -> Iterator[None]:
    """An exclusive flock on `directory` itself, between this tool's writers only (advisory;
    released by the kernel if the holder dies). Where the directory cannot be opened for
    reading, writers are not serialized: the renames happen as before."""
    try:
        descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        yield
        return
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def check_destination(output: str | os.PathLike[str]) -> None:
    """OutputError (one line) unless a file can be written at `output`."""
    output = Path(output)
    directory = output.parent
    if not directory.exists():
        raise OutputError(f"{output}: directory {directory} does not exist")
    if not directory.is_dir():
        raise OutputError(f"{output}: {directory} is not a directory")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise OutputError(f"{output}: directory {directory} is not writable")
    if output.is_dir():
        raise OutputError(f"{output}: is a directory")
    if output.exists() and not output.is_file():
        # Renaming over a device node or a FIFO would replace it, not write into it.
        raise OutputError(f"{output}: exists and is not a regular file")


def _own_data_name(model: ir.Model, output: Path) -> str | None:
    """In place, the weights keep their file name when they all live in one file beside it."""
    locations = {os.path.normpath(tensor.location) for tensor in external_tensors(model)}
    if len(locations) != 1:
        return None
    location = locations.pop()
    if os.path.dirname(location) or not (output.parent / location).is_file():
        return None
    return location


def _check_no_clobbering(
    model: ir.Model, output: Path, data_name: str | None, source: Path | None
) -> None:
    """Refuse to replace the input's files, or an <OUT>.data that is not this tool's."""
    replacing_source = source is not None and same_file(source, output)
    input_data = {Path(t.path) for t in external_tensors(model)}
    if any(same_file(output, data) for data in input_data):
        raise OutputError(f"{output}: is the input's external data file")
    if data_name is None:
        return
    data_path = output.parent / data_name
    if not os.path.lexists(data_path):
        return
    if source is not None and same_file(source, data_path):
        raise OutputError(f"{output}: its external data {data_path} would overwrite the input")
    if not data_path.is_file():
        raise OutputError(f"{output}: external data {data_path} exists and is not a regular file")
    if any(same_file(data_path, data) for data in input_data):
        if replacing_source:
            return  # --in-place: the input's own weights are replaced with the model
        raise OutputError(
            f"{output}: external data {data_path} is the input's external data; "
            "choose another OUTPUT"
        )
    if _written_by_this_tool(output, data_name):
        return
    raise OutputError(
        f"{output}: refusing to overwrite {data_path}: it is not the external data of a model "
        f"written by this tool (no {output.name} with metadata {TOOL_METADATA_KEY} that "
        "references it); remove it or choose another OUTPUT"
    )


def _written_by_this_tool(output: Path, data_name: str) -> bool:
    """`output` exists, carries our metadata key and keeps its weights in `data_name`."""
    if not output.is_file():
        return False
    try:
        previous = ir.load(output)
    except Exception:  # anything unreadable is not ours
        return False
    if TOOL_METADATA_KEY not in previous.metadata_props:
        return False
    return any(
        os.path.normpath(tensor.location) == data_name for tensor in external_tensors(previous)
    )


def _make_staging_directory(output: Path, directory: Path) -> Scratch:
    """A locked staging directory beside `output`; abandoned ones (a killed writer's, of any
    output in this directory) are removed first (rewriter._scratch)."""
    try:
        return Scratch(directory, prefix=f".{output.name}.", suffix=".tmp", sweep_prefix=".")
    except OSError as error:
        raise OutputError(f"{output}: cannot write in {directory} ({_reason(error)})") from None


def _save(model: ir.Model, staged: Path, data_name: str | None, output: Path) -> None:
    try:
        ir.save(model, staged, external_data=data_name)
        # On disk before the rename publishes them, so a crash cannot leave a renamed
        # but empty file.
        for path in staged.parent.iterdir():
            if path.is_file():
                _fsync_file(path)
    except OSError as error:
        raise OutputError(
            f"{output}: cannot write ({_reason(error)}); nothing was written"
        ) from None


def _fsync_file(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_directory(directory: Path) -> None:
    """Persist the renames; some file systems cannot fsync a directory, which is fine."""
    with contextlib.suppress(OSError):
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


# --- signals -----------------------------------------------------------------------------

# Signal handlers run in the main thread; while _held_depth > 0 they only take note.
_held_depth = 0
_pending_signals: list[int] = []


def _raise_interrupted(signum: int, frame: object) -> None:
    if _held_depth:
        _pending_signals.append(signum)
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def signals_as_exceptions() -> Iterator[None]:
    """While active, SIGINT and SIGTERM raise :class:`Interrupted` (main thread only).

    SIGTERM would otherwise end the process without running ``finally`` blocks, leaving the
    staging directory behind.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _raise_interrupted) for signum in _SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _pending_signals.clear()


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Under signals_as_exceptions, SIGINT/SIGTERM wait until the block is done."""
    global _held_depth
    _held_depth += 1
    try:
        yield
    finally:
        _held_depth -= 1
        if not _held_depth and _pending_signals:
            signum = _pending_signals[0]
            _pending_signals.clear()
            raise Interrupted(signum)


# --- helpers -----------------------------------------------------------------------------


def _reason(error: OSError) -> str:
    return error.strerror or first_line(error)[:200]
