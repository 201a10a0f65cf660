"""The report a rewrite produces: what changed, what did not and why (JSON-stable keys)."""

from __future__ import annotations

import dataclasses
from typing import Any

# PaddingContract is the rules' (they may import nothing of this package); re-exported here
# beside the report that states it.
from rewriter.rules import LayerKind, LayerRewrite, LayerSkip, PaddingContract

__all__ = ["PaddingContract", "RewriteReport"]


@dataclasses.dataclass
class RewriteReport:
    tool_version: str
    rewrites: list[LayerRewrite] = dataclasses.field(default_factory=list)
    skipped: list[LayerSkip] = dataclasses.field(default_factory=list)
    padding_contract: str = PaddingContract.UNCHANGED
    warnings: list[str] = dataclasses.field(default_factory=list)
    nodes_removed: int = 0
    form_request: str = "auto"
    layers: str = "all"
    forced: bool = False
    probe: dict[str, Any] | None = None
    speed: dict[str, Any] | None = None  # --speed auto: the timings each choice rests on
    verification: dict[str, Any] | None = None  # filled by the verifier, or {"skipped": ...}
    # A genai package (rewriter.package): config changes and the generation proof.
    package: dict[str, Any] | None = None

    @property
    def rewritten(self) -> int:
        return len(self.rewrites)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tool_version": self.tool_version,
            "rewritten": self.rewritten,
            "rewrites": [dataclasses.asdict(r) for r in self.rewrites],
            "skipped": [dataclasses.asdict(s) for s in self.skipped],
            "padding_contract": self.padding_contract,
            "warnings": list(self.warnings),
            "nodes_removed": self.nodes_removed,
            "form_request": self.form_request,
            "layers": self.layers,
            "forced": self.forced,
            "probe": self.probe,
            "speed": self.speed,
            "verification": self.verification,
            "package": self.package,
        }

    def summary(self, per_rewrite: bool = True) -> str:
        """A few human-readable lines for the command line; ``per_rewrite=False`` leaves out
        the line per rewritten layer and per speed choice (the verification's layer table
        names each layer's form; the report keeps every reason)."""
        candidates = self.rewritten + len(self.skipped)
        lines = [
            f"Attention layers: {candidates}, rewritten: {self.rewritten}, "
            f"skipped: {len(self.skipped)}"
        ]
        for r in self.rewrites if per_rewrite else ():
            window = f", local_window_size={r.local_window_size}" if r.local_window_size else ""
            window += ", window slice" if r.window_slice else ""
            if r.speed_form == "gqa":
                lines.append(
                    f"  rewrote {r.node} -> GroupQueryAttention ({r.form}{window}, {r.mask_style})"
                )
            elif r.mask_style in ("none", "export"):
                # A drafter's fold is chosen for exactness, not timed: its reason says why.
                lines.append(f"  rewrote {r.node} -> {r.speed_form}: {r.speed_reason}")
            else:
                lines.append(f"  rewrote {r.node} -> {r.speed_form} (measured fastest)")
        for s in self.skipped:
            lines.append(f"  skipped {s.node}: {s.reason}")
        for table in (self.speed or {}).get("layers", []) if per_rewrite else ():
            lines.append(f"  speed: {LayerKind(**table['layer']).describe()}: {table['reason']}")
        lines.extend(f"warning: {w}" for w in self.warnings)
        return "\n".join(lines)
