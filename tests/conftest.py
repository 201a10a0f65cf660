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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A clone without ../shared/corpus runs every other test and says which it left out."""
    if CORPUS.is_dir():
        return
    if os.environ.get(_CORPUS_REQUIRED):
        raise pytest.UsageError(f"{_CORPUS_REQUIRED} is set but {CORPUS} does not exist")
    corpus = [item for item in items if item.get_closest_marker("corpus")]
    if corpus:
        config.hook.pytest_deselected(items=corpus)
        items[:] = [item for item in items if not item.get_closest_marker("corpus")]


def pytest_report_header(config: pytest.Config) -> str:
    if CORPUS.is_dir():
        return f"corpus of real exports: {CORPUS}"
    return f"corpus of real exports: {CORPUS} not found, corpus tests deselected"
