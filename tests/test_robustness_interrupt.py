"""Nothing is lost when a run is cut short (issue 7): SIGTERM/SIGINT mid-write, a full disk.

The CLI stages the model and its external data in a temporary directory beside OUT and
renames them into place; these tests interrupt it at several points and check that OUT is
either absent or complete, IN is byte-identical, and no temporary directory is left.

The disk-full test mounts a 1 MiB tmpfs when the tests may (root with CAP_SYS_ADMIN) and
otherwise makes ``onnx_ir.save`` fail with ENOSPC half-way through its write; a second test
always runs the simulated variant.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import onnx_ir as ir
import pytest
from big_models import decoder_with_big_weight

from rewriter import cli
from rewriter.model_io import TOOL_METADATA_KEY, load_model

# Big enough that writing OUT takes a visible fraction of a second, small enough for CI.
_BIG_WEIGHT_BYTES = 160 * 1024 * 1024


def _fingerprint(path: Path) -> tuple[int, int, int]:
    status = path.stat()
    return status.st_ino, status.st_size, status.st_mtime_ns


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _assert_complete(out: Path, big_weight_bytes: int) -> None:
    model = load_model(out)  # every external tensor present and long enough
    assert TOOL_METADATA_KEY in model.metadata_props
    assert model.metadata_props["kvshare_gqa_rewriter.rewrites"] == "3"
    big = model.graph.initializers["unused.big_weight"].const_value
    assert isinstance(big, ir.ExternalTensor)
    assert big.nbytes == big_weight_bytes
    assert not [n for n in model.graph if n.op_type == "Attention"]


def _no_temporaries(directory: Path) -> None:
    hidden = [p.name for p in directory.iterdir() if p.name.startswith(".")]
    assert not hidden, f"left behind: {hidden}"


@pytest.fixture(scope="module")
def big_input(tmp_path_factory) -> Iterator[Path]:
    directory = tmp_path_factory.mktemp("interrupt_input")
    path = decoder_with_big_weight(directory, "in.onnx", _BIG_WEIGHT_BYTES)
    yield path
    shutil.rmtree(directory, ignore_errors=True)


def _start(source: Path, out: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rewriter",
            str(source),
            str(out),
            "--no-verify",
            "--quiet",
            "--speed=off",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_staging(process: subprocess.Popen[str], directory: Path, out: Path) -> bool:
    """Poll until the staging directory appears; False if the process ended first."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if any(directory.glob(f".{out.name}.*.tmp")):
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.002)
    raise AssertionError("the CLI never started writing")


# (signal, when): "startup" = 0.3 s after launch (imports; handlers maybe not installed yet),
# a number = that many seconds after the staging directory appeared (mid-write).
_FRESH_CASES = [(signal.SIGTERM, "startup"), (signal.SIGTERM, 0.0), (signal.SIGINT, 0.1)]
_RERUN_CASES = [(signal.SIGTERM, 0.05)]


@pytest.mark.parametrize("existing_out", [False, True], ids=["fresh-out", "existing-out"])
def test_signals_leave_no_half_model(tmp_path, big_input, existing_out):
    source_digest = _sha256(big_input)
    source_data = big_input.with_name("in.onnx.data")
    source_data_print = _fingerprint(source_data)
    out = tmp_path / "out.onnx"
    if existing_out:  # a complete previous result that an interrupted rerun must not damage
        subprocess.run(
            [
                sys.executable,
                "-m",
                "rewriter",
                big_input,
                out,
                "--no-verify",
                "--quiet",
                "--speed=off",
            ],
            check=True,
        )
    outcomes = []
    for signum, when in _RERUN_CASES if existing_out else _FRESH_CASES:
        process = _start(big_input, out)
        if when == "startup":
            time.sleep(0.3)
        else:
            assert _wait_for_staging(process, tmp_path, out)
            time.sleep(when)
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=120)
        outcome = (signum.name, when, process.returncode, stderr.strip())
        outcomes.append(outcome)

        # Either OUT is complete, or (first run into an empty directory) there is none; a
        # signal after the output was published may also end the process normally.
        if out.exists():
            _assert_complete(out, _BIG_WEIGHT_BYTES)
        if "nothing was written" in stderr and not existing_out:
            assert not out.exists(), outcome
        if "was written completely" in stderr:
            assert out.exists(), outcome
        if when != "startup":  # our handlers are installed by then: a clean one-line message
            assert "Traceback" not in stderr, outcome
            assert process.returncode in (0, 128 + signum, -signum), outcome
        _no_temporaries(tmp_path)
        assert _fingerprint(source_data) == source_data_print
        if not existing_out and out.exists():
            out.unlink()
            out.with_name("out.onnx.data").unlink()
    assert _sha256(big_input) == source_digest
    mid_write = [o for o in outcomes if o[2] == 128 + signal.Signals[o[0]] and "nothing" in o[3]]
    assert mid_write, outcomes  # at least one signal did land during the write
    print("\n".join(map(str, outcomes)))
    for written in tmp_path.glob("out.onnx*"):  # pytest keeps recent tmp dirs: free the disk
        written.unlink()


# --- full disk ----------------------------------------------------------------------------


@pytest.fixture
def small_filesystem(tmp_path, monkeypatch) -> Iterator[tuple[Path, str]]:
    """A 1 MiB file system: a real tmpfs when mountable, else a writer that hits ENOSPC."""
    mount_point = tmp_path / "small_fs"
    mount_point.mkdir()
    mounted = (
        os.geteuid() == 0
        and shutil.which("mount") is not None
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
            capture_output=True,
        ).returncode
        == 0
    )
    if not mounted:
        _simulate_enospc(monkeypatch, limit_bytes=1024 * 1024)
    try:
        yield mount_point, "tmpfs" if mounted else "simulated"
    finally:
        if mounted:
            subprocess.run(["umount", str(mount_point)], check=True)


def _simulate_enospc(monkeypatch, limit_bytes: int) -> None:
    """onnx_ir.save writes for real, then fails like a full disk once `limit_bytes` are out."""
    real_save = ir.save

    def save_until_full(model, path, *args, **kwargs):
        real_save(model, path, *args, **kwargs)
        written = sum(p.stat().st_size for p in Path(path).parent.iterdir() if p.is_file())
        if written > limit_bytes:
            with open(path, "r+b") as half:  # leave a torn file behind, as a real ENOSPC would
                half.truncate(limit_bytes // 2)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(ir, "save", save_until_full)


def _rewrite_in_process(capsys, *argv: object) -> tuple[int, str]:
    code = cli.main([*map(str, argv), "--no-verify", "--quiet", "--speed=off"])
    return code, capsys.readouterr().err


def test_full_disk_leaves_nothing(tmp_path, capsys, small_filesystem):
    directory, kind = small_filesystem
    source = decoder_with_big_weight(tmp_path, "in.onnx", 2 * 1024 * 1024)
    source_bytes = source.read_bytes()
    # A previous, complete OUT (small, inline) must survive the failed rewrite untouched.
    previous = directory / "out.onnx"
    shutil.copy(Path(__file__).resolve().parent.parent / "fixtures" / "p2_tiny.onnx", previous)
    previous_bytes = previous.read_bytes()

    code, err = _rewrite_in_process(capsys, source, previous)

    print(f"file system: {kind}; stderr: {err.strip()}")
    assert code == 2, err
    assert err.strip().splitlines() == [err.strip()]
    assert "No space left on device" in err and "nothing was written" in err, err
    assert previous.read_bytes() == previous_bytes
    assert sorted(p.name for p in directory.iterdir()) == ["out.onnx"]
    assert source.read_bytes() == source_bytes


def test_full_disk_simulated(tmp_path, capsys, monkeypatch):
    """Always the simulated variant, whatever the machine allows."""
    _simulate_enospc(monkeypatch, limit_bytes=64 * 1024)
    source = tmp_path / "in.onnx"
    shutil.copy(Path(__file__).resolve().parent.parent / "fixtures" / "p2_tiny.onnx", source)
    source_bytes = source.read_bytes()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, err = _rewrite_in_process(capsys, source, out_dir / "out.onnx")
    assert code == 2, err
    assert "No space left on device" in err, err
    assert list(out_dir.iterdir()) == []
    assert source.read_bytes() == source_bytes


# --- where exactly a signal lands (in-process, deterministic) -----------------------------


def _self_signal(signum: int):
    def send(*_args, **_kwargs) -> None:
        os.kill(os.getpid(), signum)

    return send


def test_signal_during_save_removes_the_staging_directory(tmp_path, capsys, monkeypatch):
    real_save = ir.save

    def save_then_signal(model, path, *args, **kwargs):
        real_save(model, path, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)

    source = decoder_with_big_weight(tmp_path, "in.onnx", 1024 * 1024)
    monkeypatch.setattr(ir, "save", save_then_signal)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, err = _rewrite_in_process(capsys, source, out_dir / "out.onnx")
    assert code == 128 + signal.SIGTERM
    assert err.strip() == "error: interrupted by SIGTERM; nothing was written"
    assert list(out_dir.iterdir()) == []


def test_signal_between_the_two_renames_is_held_back(tmp_path, capsys, monkeypatch):
    """A signal after the data rename waits until the model rename: never a torn pair."""
    import rewriter.model_io as model_io

    real_replace = os.replace
    renamed: list[str] = []
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    def replace_and_signal(source, destination):
        real_replace(source, destination)
        if Path(destination).parent == out_dir:  # a publishing rename, not onnx-ir's own
            renamed.append(Path(destination).name)
            if len(renamed) == 1:
                os.kill(os.getpid(), signal.SIGINT)

    source = decoder_with_big_weight(tmp_path, "in.onnx", 1024 * 1024)
    monkeypatch.setattr(model_io.os, "replace", replace_and_signal)
    out = out_dir / "out.onnx"
    code, err = _rewrite_in_process(capsys, source, out)
    assert renamed == ["out.onnx.data", "out.onnx"]
    assert code == 128 + signal.SIGINT
    assert err.strip() == f"error: interrupted by SIGINT; {out} was written completely"
    _assert_complete(out, 1024 * 1024)
    assert sorted(p.name for p in out_dir.iterdir()) == ["out.onnx", "out.onnx.data"]
