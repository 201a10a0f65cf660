"""What a hard kill leaves, and two writers at once (issue 23, items 2 and 7).

SIGKILL runs no ``finally``: the staging directory beside OUT stays. It is locked while its
writer lives (``rewriter._scratch``), so the next run writing the same OUT can tell it is
abandoned and removes it; a live writer's is left alone. Probe and verifier temporaries
are made the same way. Two writers publish one at a time and re-check before they do.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import onnx_ir as ir
import pytest
from big_models import decoder_with_big_weight

import rewriter.model_io as model_io
from rewriter import cli
from rewriter._scratch import Scratch, remove_abandoned
from rewriter.model_io import TOOL_METADATA_KEY, load_model

# A few hundred MB, written sparse: the write takes long enough to be killed in.
_BIG_WEIGHT_BYTES = 300 * 1024 * 1024


def _hidden(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def _command(source: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "rewriter",
        str(source),
        str(out),
        "--no-verify",
        "--quiet",
        "--speed=off",
    ]


@pytest.fixture(scope="module")
def big_input(tmp_path_factory) -> Iterator[Path]:
    directory = tmp_path_factory.mktemp("kill_input")
    yield decoder_with_big_weight(directory, "in.onnx", _BIG_WEIGHT_BYTES)
    for path in directory.iterdir():
        path.unlink()


def _kill_mid_write(source: Path, out: Path) -> bool:
    """Start a run, SIGKILL it once its staging directory exists; whether it died writing."""
    process = subprocess.Popen(_command(source, out), stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(out.parent.glob(f".{out.name}.*.tmp")):
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, "the CLI never started writing"
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    return process.returncode == -signal.SIGKILL and not out.exists()


def test_sigkill_leftovers_are_removed_by_the_next_run(tmp_path, big_input):
    out = tmp_path / "out.onnx"
    assert any(_kill_mid_write(big_input, out) for _ in range(3)), "never killed mid-write"
    stranded = _hidden(tmp_path)
    assert stranded and all(name.endswith(".tmp") for name in stranded), stranded

    # Another output's abandoned staging directory goes too (its lock file is not held);
    # a hidden directory without our lock file is not ours and stays.
    other = tmp_path / ".other.onnx.k1ll3d.tmp"
    other.mkdir()
    (other / ".owner.lock").touch()
    not_ours = tmp_path / ".cache.tmp"
    not_ours.mkdir()
    # A live writer's staging directory must survive the sweep (its own sweep, made with
    # another prefix, leaves the ones the run under test must remove).
    with Scratch(tmp_path, prefix=".alive.onnx.", suffix=".tmp") as alive:
        result = subprocess.run(_command(big_input, out), capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert _hidden(tmp_path) == sorted([alive.path.name, not_ours.name])
    assert _hidden(tmp_path) == [not_ours.name]
    model = load_model(out)
    assert TOOL_METADATA_KEY in model.metadata_props
    assert model.graph.initializers["unused.big_weight"].const_value.nbytes == _BIG_WEIGHT_BYTES
    out.unlink()
    out.with_name("out.onnx.data").unlink()


def test_abandoned_probe_and_verifier_temporaries_are_removed(tmp_path, monkeypatch):
    """A probe's or verifier's directory whose owner is gone (its lock file not held) goes
    when the next one is made; one held by a live process, and anything not ours, stays."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = []
    for prefix in ("gqa-probe-", "verify-candidate-"):
        directory = tmp_path / f"{prefix}dead1234"
        directory.mkdir()
        (directory / ".owner.lock").touch()  # what a SIGKILLed owner leaves: unlocked
        (directory / "profile.json").write_text("{}")
        dead.append(directory)
    foreign = tmp_path / "gqa-probe-not-ours"
    foreign.mkdir()  # no lock file: not made here
    with Scratch(tmp_path, prefix="gqa-probe-") as alive:
        assert all(not directory.exists() for directory in dead[:1])
        assert alive.path.exists() and foreign.exists()
        assert remove_abandoned(tmp_path, "verify-candidate-") == ["verify-candidate-dead1234"]
        assert remove_abandoned(tmp_path, "gqa-probe-") == []
    assert not alive.path.exists()
    assert foreign.exists()


def test_probe_leaves_no_temporary_directory(tmp_path, monkeypatch):
    from rewriter.probe import probe

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    result = probe("cpu", dtypes=["float32"], head_sizes=[64])
    assert result.to_dict()
    assert list(tmp_path.iterdir()) == []


# --- item 7: two writers of one OUT -------------------------------------------------------


def test_foreign_data_appearing_during_the_rewrite_is_not_overwritten(
    tmp_path, capsys, monkeypatch
):
    """What was checked before the rewrite is checked again when publishing."""
    source = decoder_with_big_weight(tmp_path, "in.onnx", 1024 * 1024)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    foreign = out_dir / "out.onnx.data"
    real_save = model_io._save

    def save_then_someone_writes(model, staged, data_name, output):
        real_save(model, staged, data_name, output)
        foreign.write_bytes(b"somebody else's weights")

    monkeypatch.setattr(model_io, "_save", save_then_someone_writes)
    code = cli.main([str(source), str(out_dir / "out.onnx"), "--no-verify", "--speed=off"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "refusing to overwrite" in err, err
    assert sorted(p.name for p in out_dir.iterdir()) == ["out.onnx.data"]
    assert foreign.read_bytes() == b"somebody else's weights"


def test_a_writer_that_published_meanwhile_is_replaced_as_a_pair(tmp_path, capsys, monkeypatch):
    """B publishes while A is between its save and its publish: A, re-checking, finds B's
    files (this tool's) and replaces both; the model and data left are A's pair."""
    first = decoder_with_big_weight(tmp_path, "a.onnx", 1024 * 1024)
    second = decoder_with_big_weight(tmp_path, "b.onnx", 3 * 1024 * 1024)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "out.onnx"
    real_save = model_io._save
    calls = []

    def save_while_another_publishes(model, staged, data_name, output):
        real_save(model, staged, data_name, output)
        calls.append(staged)
        if len(calls) == 1:  # A's save; B runs start to end here
            result = subprocess.run(_command(second, out), capture_output=True, text=True)
            assert result.returncode == 0, result.stderr
            assert load_model(out).graph.initializers["unused.big_weight"].const_value.nbytes == (
                3 * 1024 * 1024
            )

    monkeypatch.setattr(model_io, "_save", save_while_another_publishes)
    code = cli.main([str(first), str(out), "--no-verify", "--quiet", "--speed=off"])
    assert code == 0, capsys.readouterr().err
    model = load_model(out)  # every tensor within its data file
    big = model.graph.initializers["unused.big_weight"].const_value
    assert isinstance(big, ir.ExternalTensor) and big.nbytes == 1024 * 1024
    data = out_dir / "out.onnx.data"
    ends = [
        (value.const_value.offset or 0) + value.const_value.nbytes
        for value in model.graph.initializers.values()
        if isinstance(value.const_value, ir.ExternalTensor)
    ]
    assert data.stat().st_size == max(ends)  # A's data, not B's longer file
    assert sorted(p.name for p in out_dir.iterdir()) == ["out.onnx", "out.onnx.data"]


def test_publishing_waits_for_the_directory_lock(tmp_path):
    """While another writer holds the output directory's lock, nothing is renamed into it."""
    source = decoder_with_big_weight(tmp_path, "in.onnx", 1024 * 1024)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "out.onnx"
    descriptor = os.open(out_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        process = subprocess.Popen(_command(source, out), stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        # Staged completely: the model file sits beside its data in the staging directory.
        while not list(out_dir.glob(".out.onnx.*.tmp/out.onnx")):
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(1.0)
        assert process.poll() is None, "the writer finished while the lock was held"
        assert not out.exists() and not out.with_name("out.onnx.data").exists()
    finally:
        os.close(descriptor)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    load_model(out)
    assert _hidden(out_dir) == []
