"""Digests of what the CLI writes for every fixture and corpus model: the check that a
restructuring changed no behaviour (issue 24: byte-identical outputs, same report keys).

    python scripts/output_digests.py --json before.json            # at the base commit
    python scripts/output_digests.py --json after.json --compare before.json

Each model is rewritten with ``--no-verify`` under ``--speed off`` and ``--speed auto`` (and
each genai package folder as a package). Per run it records the exit code, the SHA-256 of
every file written (model, external data, config), and the report's key paths (values
aside). A run whose speed choice timed a layer kind depends on the machine's timing, not on
the code: it is recorded as ``timed`` and its bytes are not compared.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT.parent / "shared" / "corpus"
SPEEDS = ("off", "auto")


def models() -> list[Path]:
    """Every .onnx under fixtures/ and the corpus (prefill/decode pairs included), and every
    genai package folder of the corpus."""
    found = sorted(ROOT.joinpath("fixtures").rglob("*.onnx"))
    if CORPUS.is_dir():
        found += sorted(CORPUS.rglob("*.onnx"))
        found += sorted(p.parent for p in CORPUS.rglob("genai_config.json"))
    return found


def _label(source: Path) -> str:
    """The same name for a model whichever checkout runs the script."""
    if source.is_relative_to(ROOT):
        return str(source.relative_to(ROOT))
    return "corpus/" + str(source.relative_to(CORPUS))


def _key_paths(value: object, prefix: str = "") -> set[str]:
    if isinstance(value, dict):
        paths = {prefix} if prefix else set()
        for key, item in value.items():
            paths |= _key_paths(item, f"{prefix}.{key}" if prefix else str(key))
        return paths
    if isinstance(value, list):
        paths: set[str] = set()
        for item in value:
            paths |= _key_paths(item, prefix + "[]")
        return paths or {prefix + "[]"}
    return {prefix}


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != "report.json"
    }


def run_one(source: Path, speed: str, scratch: Path) -> dict[str, object]:
    out_dir = scratch / "out"
    output = out_dir if source.is_dir() else out_dir / "model.onnx"
    if not source.is_dir():
        out_dir.mkdir(parents=True)
    report_path = scratch / "report.json"
    command = [
        sys.executable,
        "-m",
        "rewriter",
        str(source),
        str(output),
        "--no-verify",
        "--speed",
        speed,
        "--quiet",
        "--report",
        str(report_path),
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    speed_tables = (report.get("speed") or {}).get("layers") or []
    timed = any(table.get("timed") for table in speed_tables)
    return {
        "exit_code": done.returncode,
        "stderr_last_line": (done.stderr.strip().splitlines() or [""])[-1],
        "timed": timed,
        "files": _digests(out_dir) if out_dir.exists() else {},
        "report_keys": sorted(_key_paths(report)),
    }


def compare(before: dict, after: dict) -> list[str]:
    """Differences that count: exit codes, report keys, and bytes of untimed runs."""
    problems = []
    for run, old in before.items():
        new = after.get(run)
        if new is None:
            problems.append(f"{run}: not run")
            continue
        for field in ("exit_code", "report_keys"):
            if old[field] != new[field]:
                problems.append(f"{run}: {field} differs")
        if not (old["timed"] or new["timed"]) and old["files"] != new["files"]:
            problems.append(f"{run}: written bytes differ")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True, help="write the digests here")
    parser.add_argument("--compare", type=Path, help="digests of the base commit")
    args = parser.parse_args(argv)
    results: dict[str, dict] = {}
    for source in models():
        for speed in SPEEDS:
            name = f"{_label(source)} --speed {speed}"
            with tempfile.TemporaryDirectory() as scratch:
                results[name] = run_one(source, speed, Path(scratch))
            print(f"{name}: exit {results[name]['exit_code']}", flush=True)
    args.json.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    if args.compare is None:
        return 0
    problems = compare(json.loads(args.compare.read_text()), results)
    compared = sum(not (r["timed"]) for r in results.values())
    print(f"{len(results)} runs, {compared} compared byte for byte: {len(problems)} differences")
    for problem in problems:
        print("  " + problem)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
