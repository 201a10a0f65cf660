"""Property: the verdict never claims more than it proved (issue 21). A passed verdict has
every rewritten layer proven on its own, or says it rests on the whole-model check for the
others (and that check held at its fixed tolerance); a layer nobody proved fails it."""

from __future__ import annotations

import dataclasses
from unittest import mock

import pytest
from hypothesis import event, given, note, settings
from hypothesis import strategies as st
from strategies import decoder_configs

import rewriter
from rewriter.fixtures.gemma4_like import DecoderConfig, build_decoder
from rewriter.verification import _modes, verify

pytestmark = pytest.mark.property


def _without_proofs(unproven: frozenset[int]):
    """prove_layers, with the layers at these indices left without a proof (as a layer that
    cannot be cut out is)."""
    real = _modes.prove_layers

    def prove_layers(*args, **kwargs):
        proofs = real(*args, **kwargs)
        for index, layer in enumerate(proofs.layers):
            if index in unproven:
                proofs.layers[index] = dataclasses.replace(
                    layer, passed=False, checks=[], reason="cannot be cut out (property)"
                )
        return proofs

    return prove_layers


@settings(max_examples=25)
@given(
    config=decoder_configs(max_head_size=32, max_window=12),
    mode=st.sampled_from(["auto", "layers", "model", "all"]),
    unproven=st.frozensets(st.integers(0, 3), max_size=2),
)
def test_a_passed_verdict_names_what_it_rests_on(
    config: DecoderConfig, mode: str, unproven: frozenset[int]
) -> None:
    original = build_decoder(config)
    candidate, report = rewriter.rewrite(original)
    note(report.summary())
    if not report.rewrites:
        return
    with mock.patch.object(_modes, "prove_layers", _without_proofs(unproven)):
        result = verify(original, candidate, mode=mode)
    note(result.summary())
    event(f"passed={result.passed} mode={mode} unproven={bool(unproven)}")
    assert result.verdict_line().startswith(
        "verdict: PASSED" if result.passed else "verdict: FAILED"
    )
    if not result.passed:
        return
    assert result.rests_on and result.rests_on in result.verdict_line()
    if mode == "model":
        assert result.layers == [] and "no layer proofs" in result.rests_on
        return
    proven = [layer for layer in result.layers if layer.passed and not layer.reason]
    if len(proven) == len(result.layers):
        assert result.rests_on.startswith(f"{len(proven)} of {len(proven)} layers proven")
    else:
        # Only a whole-model check that ran and held at its fixed tolerance covers them.
        assert mode != "layers"
        assert result.model is not None and result.model["passed"] is True
        assert not result.within_spread
        missing = len(result.layers) - len(proven)
        assert result.rests_on.startswith(f"on the whole model only for {missing} layer(s)")
