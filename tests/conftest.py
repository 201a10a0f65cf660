"""Hypothesis profiles for the property tests (``pytest -m property``), and the corpus gate.

``ci`` (the default): derandomized, 100 examples per property, a generous deadline; the
property suite takes about two minutes on two cores. ``thorough``: 1000 random examples per
property for a local run (about 15 minutes on two cores)::

    HYPOTHESIS_PROFILE=thorough pytest -m property --hypothesis-show-statistics
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, settings

# Examples run ONNX Runtime sessions: their time varies with the machine's load, so the
# deadline only catches a pathological example, and data generation is never the slow part.
_SLOW_EXAMPLES = [HealthCheck.too_slow, HealthCheck.data_too_large]
# No explain phase: it reruns a failing example hundreds of times (minutes per failure here)
# to list covered lines, while the shrunk example and its notes already say what failed.
_PHASES = [Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink]

settings.register_profile(
    "ci",
    max_examples=100,
    derandomize=True,
    deadline=timedelta(seconds=60),
    print_blob=True,
    suppress_health_check=_SLOW_EXAMPLES,
    phases=_PHASES,
)
settings.register_profile(
    "thorough",
    max_examples=1000,
    deadline=None,
    print_blob=True,
    suppress_health_check=_SLOW_EXAMPLES,
    phases=_PHASES,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# -- the corpus of real exports ------------------------------------------------------------------

# Real exports live beside the checkout (never copied into it): ../shared/corpus/.
CORPUS = Path(__file__).resolve().parent.parent.parent / "shared" / "corpus"
# .ci/run sets this: there a missing corpus is an error, not a reason to run less.
_CORPUS_REQUIRED = "KVSHARE_REQUIRE_CORPUS"


# .ci/run sets this too: there the generation tests must run (the genai extra installed).
_GENAI_REQUIRED = "KVSHARE_REQUIRE_GENAI"


def _genai_installed() -> bool:
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return False
    return True


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A clone without ../shared/corpus, or without onnxruntime-genai, runs every other test
    and says which it left out (the header); CI makes either absence an error."""
    _deselect(
        config, items, "corpus", CORPUS.is_dir(), _CORPUS_REQUIRED, f"{CORPUS} does not exist"
    )
    _deselect(
        config,
        items,
        "genai",
        _genai_installed(),
        _GENAI_REQUIRED,
        "onnxruntime-genai is not installed (pip install '.[genai]')",
    )


def _deselect(
    config: pytest.Config,
    items: list[pytest.Item],
    marker: str,
    present: bool,
    required: str,
    absence: str,
) -> None:
    if present:
        return
    if os.environ.get(required):
        raise pytest.UsageError(f"{required} is set but {absence}")
    left_out = [item for item in items if item.get_closest_marker(marker)]
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = [item for item in items if not item.get_closest_marker(marker)]


def pytest_report_header(config: pytest.Config) -> list[str]:
    corpus = (
        f"corpus of real exports: {CORPUS}"
        if CORPUS.is_dir()
        else f"corpus of real exports: {CORPUS} not found, corpus tests deselected"
    )
    genai = (
        "onnxruntime-genai: installed, genai tests run"
        if _genai_installed()
        else "onnxruntime-genai: not installed, genai tests deselected"
    )
    return [corpus, genai]
