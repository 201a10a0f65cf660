"""Feeds synthesized from a model's own signature.

Dimension letters: B batch, S query length of a call, P past length, T = P + S total length,
Nkv KV heads, D head size.

A decoder export declares ``input_ids`` [B, S] (or, as a speculative-decoding drafter does,
``inputs_embeds`` [B, S, H], fed like any other input below), ``attention_mask`` [B, T],
``position_ids`` [B, S] and ``past_key_values.{i}.key|value`` [B, Nkv, P, D] paired with
``present.{i}.key|value`` outputs [B, Nkv, T, D]. Their symbolic dimension names tell which
symbol means batch, query, total or past length; any other input is fed seeded random data of
its declared type, its symbolic dimensions bound through those same names (an unknown symbol
becomes 1; a drafter's ``shared_kv.*`` cache [B, Nkv, T, D] binds its third axis to T).

All token-indexed data comes from one seeded pool indexed by (row, absolute position), so a
token at position 7 is the same token whether it is fed in a prefill, a decode step, alone or
inside a batch: that is what lets the oracles compare different ways of computing one thing.
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from collections.abc import Mapping, Sequence

import numpy as np
import onnxruntime as ort

from rewriter.verification._result import VerificationError

__all__ = [
    "CacheLayer",
    "DecoderSignature",
    "FeedSynthesizer",
    "Step",
    "TensorSpec",
    "is_present_output",
]

Dim = int | str | None

_NUMPY_DTYPES: dict[str, np.dtype] = {
    f"tensor({name})": np.dtype(dtype)
    for name, dtype in [
        ("float", np.float32),
        ("float16", np.float16),
        ("double", np.float64),
        ("int64", np.int64),
        ("int32", np.int32),
        ("int16", np.int16),
        ("int8", np.int8),
        ("uint64", np.uint64),
        ("uint32", np.uint32),
        ("uint16", np.uint16),
        ("uint8", np.uint8),
        ("bool", np.bool_),
    ]
}

# Cache naming conventions of the common exporters (optimum, onnxruntime-genai, older ones).
_PAST_NAMES = [
    re.compile(r"^past_key_values\.(?P<layer>\d+)\.(?P<kind>key|value)$"),
    # transformers' ONNX exporter (export_for_generation): input.cache.layers.3.keys
    re.compile(r"^input\.cache\.layers\.(?P<layer>\d+)\.(?P<kind>key|value)s$"),
    re.compile(r"^past\.(?P<layer>\d+)\.(?P<kind>key|value)$"),
    re.compile(r"^past_(?P<kind>key|value)_(?P<layer>\d+)$"),
]
_PRESENT_NAMES = [
    re.compile(r"^present\.(?P<layer>\d+)\.(?P<kind>key|value)$"),
    re.compile(r"^(output\.)?cache\.layers\.(?P<layer>\d+)\.(?P<kind>key|value)s$"),
    re.compile(r"^present_key_values\.(?P<layer>\d+)\.(?P<kind>key|value)$"),
    re.compile(r"^present_(?P<kind>key|value)_(?P<layer>\d+)$"),
]

BATCH, QUERY, TOTAL, PAST = "batch", "sequence", "total", "past"
# A drafter's token input: embeddings of the tokens, not their ids.
_EMBEDS = "inputs_embeds"
# A drafter's inputs holding the target's cache (mobius: shared_kv.full_attention.key).
_BORROWED_PREFIX = "shared_kv."


def _cache_slot(name: str, patterns: list[re.Pattern[str]]) -> tuple[int, str] | None:
    for pattern in patterns:
        match = pattern.match(name)
        if match:
            return int(match["layer"]), match["kind"]
    return None


def is_present_output(name: str) -> bool:
    return _cache_slot(name, _PRESENT_NAMES) is not None


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    type: str  # as ORT spells it, e.g. "tensor(float16)"
    shape: tuple[Dim, ...] | None

    @classmethod
    def from_node_arg(cls, arg: ort.NodeArg) -> TensorSpec:
        # torch.onnx writes some static dims as symbols named by their value ("32").
        shape = (
            tuple(int(d) if isinstance(d, str) and d.isdigit() else d for d in arg.shape)
            if arg.shape is not None
            else None
        )
        return cls(name=arg.name, type=arg.type, shape=shape)

    @property
    def dtype(self) -> np.dtype | None:
        return _NUMPY_DTYPES.get(self.type)


@dataclasses.dataclass(frozen=True)
class CacheLayer:
    layer: int
    past_key: str
    past_value: str
    present_key: str | None
    present_value: str | None
    kv_heads: int
    head_size: int
    dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class DecoderSignature:
    role: str
    # The token input; None for a drafter that takes `inputs_embeds` [B, S, H] instead (fed
    # as one of `others`, from the pool indexed by row and position like a token).
    input_ids: TensorSpec | None
    attention_mask: TensorSpec | None
    position_ids: TensorSpec | None
    cache: tuple[CacheLayer, ...]
    others: tuple[TensorSpec, ...]
    # Outputs compared between models: "logits", or every non-cache output when it is absent.
    compared_outputs: tuple[str, ...]
    present_outputs: tuple[str, ...]
    vocab_size: int | None
    dim_roles: Mapping[str, str]

    @property
    def has_full_cache(self) -> bool:
        """Every past input has its present output, so decode steps can chain."""
        return bool(self.cache) and all(
            layer.present_key and layer.present_value for layer in self.cache
        )

    @property
    def token_input(self) -> TensorSpec:
        """input_ids, or a drafter's inputs_embeds (its first two axes are [B, S] alike)."""
        if self.input_ids is not None:
            return self.input_ids
        return next(spec for spec in self.others if spec.name == _EMBEDS)

    @property
    def batch_dim(self) -> Dim:
        shape = self.token_input.shape
        return shape[0] if shape else None

    @property
    def static_query_length(self) -> int | None:
        """S when the graph declares it (transformers' decode graphs take [1, 1]): every call
        of this graph has exactly that many tokens; None when S is dynamic."""
        for spec in (self.token_input, self.position_ids):
            if spec is not None and spec.shape is not None and isinstance(spec.shape[1], int):
                return spec.shape[1]
        return None

    @classmethod
    def from_session(cls, session: ort.InferenceSession, role: str) -> DecoderSignature:
        inputs = {arg.name: TensorSpec.from_node_arg(arg) for arg in session.get_inputs()}
        outputs = {arg.name: TensorSpec.from_node_arg(arg) for arg in session.get_outputs()}
        input_ids = inputs.get("input_ids")
        embeds = inputs.get(_EMBEDS)
        if input_ids is None and embeds is None:
            raise VerificationError(
                f"cannot feed the {role} model: it has neither 'input_ids' nor "
                f"'{_EMBEDS}' input (inputs: {', '.join(inputs)}); the verifier drives "
                "decoder LLM signatures"
            )
        token_input = input_ids if input_ids is not None else embeds
        assert token_input is not None
        if input_ids is not None:
            _require_token_input(input_ids, role, integer=True)
        elif embeds is not None and (
            embeds.dtype is None
            or embeds.dtype.kind != "f"
            or embeds.shape is None
            or len(embeds.shape) != 3
        ):
            raise VerificationError(
                f"cannot feed the {role} model: '{_EMBEDS}' is {embeds.type} of shape "
                f"{embeds.shape}, not a float [batch, sequence, hidden] tensor"
            )
        attention_mask = inputs.get("attention_mask")
        if attention_mask is not None:
            _require_token_input(attention_mask, role, integer=False)
        position_ids = inputs.get("position_ids")
        if position_ids is not None:
            _require_token_input(position_ids, role, integer=True)

        roles: dict[str, str] = {}
        _bind(roles, token_input.shape, {0: BATCH, 1: QUERY})
        if attention_mask is not None:
            _bind(roles, attention_mask.shape, {0: BATCH, 1: TOTAL})
        if position_ids is not None:
            _bind(roles, position_ids.shape, {0: BATCH, 1: QUERY})
        cache = _cache_layers(inputs, outputs, role)
        for layer in cache:
            _bind(roles, inputs[layer.past_key].shape, {0: BATCH, 2: PAST})
            if layer.present_key is not None:
                _bind(roles, outputs[layer.present_key].shape, {0: BATCH, 2: TOTAL})

        for name, spec in inputs.items():
            if name.startswith(_BORROWED_PREFIX) and spec.shape and len(spec.shape) == 4:
                # A drafter's borrowed cache [B, Nkv, T, D] (the target's present after its
                # calls so far): it spans every key position, as attention_mask does.
                _bind(roles, spec.shape, {0: BATCH, 2: TOTAL})
        cache_inputs = {name for layer in cache for name in (layer.past_key, layer.past_value)}
        known = {"input_ids", "attention_mask", "position_ids"} | cache_inputs
        others = tuple(spec for name, spec in inputs.items() if name not in known)
        for spec in others:
            if spec.dtype is None:
                raise VerificationError(
                    f"cannot feed input '{spec.name}' of the {role} model: type {spec.type} "
                    "is not supported (numeric and bool tensors only)"
                )
            if spec.shape is None:
                raise VerificationError(
                    f"cannot feed input '{spec.name}' of the {role} model: its shape is unknown"
                )

        present = tuple(name for name in outputs if is_present_output(name))
        if "logits" in outputs:
            compared: tuple[str, ...] = ("logits",)
        else:
            compared = tuple(name for name in outputs if name not in present)
        logits_shape = outputs[compared[0]].shape if compared else None
        vocab = None
        if "logits" in outputs and logits_shape and isinstance(logits_shape[-1], int):
            vocab = logits_shape[-1]
        return cls(
            role=role,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            others=others,
            compared_outputs=compared,
            present_outputs=present,
            vocab_size=vocab,
            dim_roles=roles,
        )


def _require_token_input(spec: TensorSpec, role: str, *, integer: bool) -> None:
    dtype = spec.dtype
    if dtype is None or (integer and dtype.kind not in "iu"):
        raise VerificationError(
            f"cannot feed input '{spec.name}' of the {role} model: type {spec.type} is not an "
            "integer tensor"
        )
    if spec.shape is None or len(spec.shape) != 2:
        raise VerificationError(
            f"cannot feed input '{spec.name}' of the {role} model: expected rank 2, declared "
            f"shape {list(spec.shape) if spec.shape is not None else 'unknown'}"
        )


def _bind(roles: dict[str, str], shape: tuple[Dim, ...] | None, axes: dict[int, str]) -> None:
    if shape is None:
        return
    for axis, role in axes.items():
        if axis < len(shape) and isinstance(shape[axis], str):
            # First binding wins: some exports reuse one symbol for S and T, which ORT does
            # not enforce, so a later conflicting use is harmless.
            roles.setdefault(shape[axis], role)  # type: ignore[arg-type]


def _cache_layers(
    inputs: Mapping[str, TensorSpec], outputs: Mapping[str, TensorSpec], role: str
) -> tuple[CacheLayer, ...]:
    past: dict[int, dict[str, TensorSpec]] = {}
    for name, spec in inputs.items():
        slot = _cache_slot(name, _PAST_NAMES)
        if slot is not None:
            past.setdefault(slot[0], {})[slot[1]] = spec
    present: dict[tuple[int, str], TensorSpec] = {}
    for name, spec in outputs.items():
        slot = _cache_slot(name, _PRESENT_NAMES)
        if slot is not None:
            present[slot] = spec
    layers = []
    for index in sorted(past):
        pair = past[index]
        for kind in ("key", "value"):
            if kind not in pair:
                other = next(iter(pair.values())).name
                raise VerificationError(
                    f"cannot feed input '{other}' of the {role} model: no matching past {kind}"
                )
        key, value = pair["key"], pair["value"]
        present_key, present_value = present.get((index, "key")), present.get((index, "value"))
        heads, size = _cache_dims(key, present_key, role)
        dtype = key.dtype
        if dtype is None or dtype.kind != "f":
            raise VerificationError(
                f"cannot feed input '{key.name}' of the {role} model: cache type {key.type} "
                "is not supported (float16, float32, float64)"
            )
        layers.append(
            CacheLayer(
                layer=index,
                past_key=key.name,
                past_value=value.name,
                present_key=present_key.name if present_key else None,
                present_value=present_value.name if present_value else None,
                kv_heads=heads,
                head_size=size,
                dtype=dtype,
            )
        )
    return tuple(layers)


def _cache_dims(past: TensorSpec, present: TensorSpec | None, role: str) -> tuple[int, int]:
    """Nkv and D of a BNSH cache: static in the past input, else in the present output."""
    for spec in (past, present):
        if spec is not None and spec.shape is not None and len(spec.shape) == 4:
            heads, size = spec.shape[1], spec.shape[3]
            if isinstance(heads, int) and isinstance(size, int):
                return heads, size
    raise VerificationError(
        f"cannot feed input '{past.name}' of the {role} model: KV heads and head size must be "
        f"static [B, Nkv, P, D] dims, declared {list(past.shape or [])}"
    )


@dataclasses.dataclass(frozen=True)
class Step:
    """One call of a decoder: which pool rows form the batch, the attention mask [B, T]
    (ones for valid keys), and the query length S (the last S columns of the mask)."""

    rows: tuple[int, ...]
    attention_mask: np.ndarray
    query_length: int

    @property
    def batch(self) -> int:
        return len(self.rows)

    @property
    def total_length(self) -> int:
        return int(self.attention_mask.shape[1])

    @property
    def past_length(self) -> int:
        return self.total_length - self.query_length

    @property
    def position_ids(self) -> np.ndarray:
        # Position of a token = number of valid tokens before it; right-padding positions
        # repeat the last valid position, harmless since no valid query attends to them.
        positions = np.maximum(np.cumsum(self.attention_mask, axis=1) - 1, 0)
        return positions[:, self.past_length :]

    @classmethod
    def prefill(cls, rows: Sequence[int], lengths: Sequence[int], padded_to: int) -> Step:
        """Right-padded prefill: row b holds ``lengths[b]`` valid tokens."""
        mask = np.zeros((len(rows), padded_to), dtype=np.int64)
        for b, length in enumerate(lengths):
            mask[b, :length] = 1
        return cls(tuple(rows), mask, padded_to)


class FeedSynthesizer:
    """Builds feeds for any of the given signatures from one seeded pool of data."""

    def __init__(self, *, vocab_size: int, capacity: int, seed: int, batch: int = 2) -> None:
        self._seed = seed
        self._capacity = capacity
        self._batch = batch
        rng = np.random.default_rng(seed)
        self._tokens = rng.integers(0, vocab_size, size=(batch, capacity), dtype=np.int64)
        self._pools: dict[str, np.ndarray] = {}

    def feeds(
        self,
        signature: DecoderSignature,
        step: Step,
        past: Mapping[str, np.ndarray] | None = None,
    ) -> dict[str, np.ndarray]:
        if step.total_length > self._capacity:
            raise ValueError(f"step of length {step.total_length} exceeds {self._capacity}")
        positions = step.position_ids
        tokens = self._tokens[np.asarray(step.rows)[:, None], positions]
        feeds: dict[str, np.ndarray] = {}
        if signature.input_ids is not None:
            feeds["input_ids"] = tokens.astype(signature.input_ids.dtype)
        if signature.attention_mask is not None:
            feeds["attention_mask"] = step.attention_mask.astype(signature.attention_mask.dtype)
        if signature.position_ids is not None:
            feeds["position_ids"] = positions.astype(signature.position_ids.dtype)
        for layer in signature.cache:
            for name in (layer.past_key, layer.past_value):
                if past is not None:
                    feeds[name] = past[name]
                else:
                    if step.past_length != 0:
                        raise ValueError("a step with past tokens needs the past cache")
                    empty = (step.batch, layer.kv_heads, 0, layer.head_size)
                    feeds[name] = np.zeros(empty, dtype=layer.dtype)
        for spec in signature.others:
            feeds[spec.name] = self._other_input(signature, spec, step)
        return feeds

    @staticmethod
    def next_past(
        signature: DecoderSignature, outputs: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """The next call's past inputs: this call's present outputs."""
        past: dict[str, np.ndarray] = {}
        for layer in signature.cache:
            past[layer.past_key] = outputs[layer.present_key]  # type: ignore[index]
            past[layer.past_value] = outputs[layer.present_value]  # type: ignore[index]
        return past

    def _other_input(self, signature: DecoderSignature, spec: TensorSpec, step: Step) -> np.ndarray:
        roles = [_role(signature, dim) for dim in spec.shape or ()]
        pool = self._pool(spec, roles)
        index: list[slice | np.ndarray] = []
        for role in roles:
            if role == BATCH:
                index.append(np.asarray(step.rows))
            elif role == QUERY:
                index.append(slice(step.past_length, step.total_length))
            elif role == TOTAL:
                index.append(slice(0, step.total_length))
            elif role == PAST:
                index.append(slice(0, step.past_length))
            else:
                index.append(slice(None))
        # Indexing a 0-D input (the HF exporter's `_sliding_window_tensor`) gives a NumPy
        # scalar, which ONNX Runtime does not take as a tensor.
        return np.asarray(pool[tuple(index)])

    def _pool(self, spec: TensorSpec, roles: list[str | int]) -> np.ndarray:
        if spec.name not in self._pools:
            capacity = {BATCH: self._batch, QUERY: self._capacity, TOTAL: self._capacity}
            capacity[PAST] = self._capacity
            shape = [capacity.get(role, role) if isinstance(role, str) else role for role in roles]
            # Seeded by name, not by order, so both models see the same data for one input.
            rng = np.random.default_rng([self._seed, zlib.crc32(spec.name.encode())])
            dtype = spec.dtype
            assert dtype is not None
            if dtype.kind == "f":
                data = rng.standard_normal(shape).astype(dtype)
            elif dtype.kind == "b":
                data = rng.integers(0, 2, size=shape).astype(dtype)
            else:
                # Small non-negative integers are valid as indices, lengths and flags alike.
                data = rng.integers(0, 2, size=shape).astype(dtype)
            self._pools[spec.name] = data
        return self._pools[spec.name]


def _role(signature: DecoderSignature, dim: Dim) -> str | int:
    if isinstance(dim, int):
        return dim
    if isinstance(dim, str) and dim in signature.dim_roles:
        return signature.dim_roles[dim]
    return 1  # unknown symbol or unnamed dim: the smallest valid extent
