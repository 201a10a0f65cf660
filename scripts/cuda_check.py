"""GPU-machine check: which GroupQueryAttention forms the CUDA provider computes correctly.

Run on a machine with an NVIDIA GPU and onnxruntime-gpu installed (not a test: CI has no GPU):

    python scripts/cuda_check.py                      # fp16, bf16 and fp32 (expected rejected)
    python scripts/cuda_check.py --json cuda.json --head-sizes 256 512

Prints the probe table, its wall time and the form `select_form` picks per case.
Exit status: 0 when the probe ran, 2 when the CUDA provider is not available.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

try:
    import rewriter  # noqa: F401 - installed (pip install -e .[gpu])
except ImportError:  # run from a plain checkout: the package directory sits one level up
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import onnxruntime as ort

from rewriter.probe import ProbeError, ProbeResult, probe, select_form

__all__ = ["check_forms", "main"]


def check_forms(dtypes: Sequence[str], head_sizes: Sequence[int]) -> ProbeResult:
    """Probe on CUDA and print the table, the wall time and the chosen form per case."""
    start = time.perf_counter()
    result = probe("cuda", dtypes=dtypes, head_sizes=head_sizes)
    elapsed = time.perf_counter() - start
    print(result.table())
    print(f"probe wall time: {elapsed:.1f} s")
    print()
    print("form choice (select_form, auto):")
    for dtype in dtypes:
        for head_size in head_sizes:
            for windowed in (False, True):
                choice = select_form(result, dtype, head_size, windowed)
                window = "windowed" if windowed else "full"
                print(f"  {dtype:9} D={head_size:<4} {window:8} -> {choice.form}: {choice.reason}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # fp32 is listed to confirm the CUDA GQA kernel still rejects it (SPEC section 3, *read*).
    parser.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16", "float32"])
    parser.add_argument("--head-sizes", nargs="+", type=int, default=[64, 256, 512])
    parser.add_argument("--json", type=Path, help="also write the probe table as JSON here")
    args = parser.parse_args(argv)

    print(f"onnxruntime {ort.__version__}, providers {ort.get_available_providers()}")
    try:
        result = check_forms(args.dtypes, args.head_sizes)
    except ProbeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json is not None:
        args.json.write_text(json.dumps(result.to_dict(), indent=2), encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
