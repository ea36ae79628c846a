"""`TTTConfig`: what TTT layers to build and where to put them, validated in one place."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Union

LAYER_TYPES = ("linear", "mlp", "e2e_mlp")
MODES = ("replace", "hybrid")
KERNELS = ("auto", "torch", "triton")  # TTTConfig.kernel (ttt_speech/kernels/__init__.py)
# linear / mlp: ttt-lm-jax / ttt-video-dit defaults. e2e_mlp: SGD step on the model's mean next-frame
# cross-entropy (measured on the synthetic corpus, docs/e2e.md).
DEFAULT_BASE_LR = {"linear": 1.0, "mlp": 0.1, "e2e_mlp": 1.0}
DEFAULT_LAYERS = {"linear": "all", "mlp": "all", "e2e_mlp": "last:0.25"}  # TTT-E2E: the last quarter of blocks
# Where a hybrid layer's gated branch goes: after the attention residual (TTT layers, which model the
# sequence like attention does) or beside the feed-forward block (TTT-E2E's extra MLP).
PLACEMENTS = {"linear": "attention", "mlp": "attention", "e2e_mlp": "feed_forward"}
DEFAULT_CHUNK_MINI_BATCHES = 4  # default chunk: 4 mini-batches (64 frames for b = 16)
NO_TTT_CHUNK = 64  # default chunk of a model without TTT layers (the same 64 frames)
MAX_MINI_BATCH = 1024  # 82 s of frames; b = 100000 asked torch for a 40 GB b x b matrix
MAX_GATE_INIT = 10.0  # tanh(10) = 1 - 4e-9: larger initial gates only overflow (1e308 in float32)

LayerSpec = Union[str, list[int]]


@dataclass
class TTTConfig:
    """Configuration of the TTT layers inserted into a host model.

    layer_type: inner model, "linear" (f(x) = x + LN(xW + b)) or "mlp" (two layers, 4x hidden) of a
        TTT layer (self-supervised reconstruction loss, docs/architecture.md §2); or "e2e_mlp"
        (TTT-E2E): an extra MLP beside the static one whose weights take a gradient step on the *model's own* next-frame
        loss after every mini-batch (docs/e2e.md).
    mini_batch_size: tokens per inner gradient step b (1 = online gradient descent); for e2e_mlp the
        frames per update (chunks must be split at multiples of it, docs/e2e.md).
    base_lr: inner learning rate scale; None picks 1.0 for linear, 0.1 for mlp, 1.0 for e2e_mlp.
    num_heads: TTT heads; None uses the host attention's head count. Must divide the width.
    layers: which host layers get TTT: "all", a list of indices (negative counts from the end),
        "every:k" (layers k-1, 2k-1, …: every k-th), or "last:f" (the last ceil(f·depth) layers);
        None picks "all", or "last:0.25" for e2e_mlp.
    mode: "replace" (TTT takes the place of self-attention) or "hybrid" (attention is kept and a
        gated branch x + tanh(α)·TTT(norm(x)) follows it; e2e_mlp: the gated MLP runs beside the
        layer's feed-forward block). e2e_mlp is hybrid only.
    gate_init: initial α of the hybrid gate (0 reproduces the host model exactly).
    output_gate: multiply the TTT output by gelu(x·Wg) before the output projection.
    rope_theta: RoPE base for Q/K (positions are taken modulo mini_batch_size).
    mlp_expansion: hidden width multiple of the TTT-MLP inner model (of the model width for e2e_mlp).
    checkpoint_group_size: mini-batches per activation-checkpoint group in training (0 = off).
    init_from_attention: in "replace" mode, start Q/K/V/O from the replaced attention's weights.
    kernel: which code runs the inner loop: "auto" (the fused Triton kernels on CUDA where they
        cover the case, the PyTorch path elsewhere), "torch" or "triton" (the kernels, or a one-line
        error; on a CPU only under TRITON_INTERPRET=1). Where each runs: `ttt_speech.kernels`.

    e2e_first_codebook_weight: e2e_mlp only: weight of the first (semantic) audio codebook in the
        inner loss's audio mean (the others weigh 1); 100 as in moshi-finetune's training loss.

    e2e_mlp uses layer_type, mini_batch_size, base_lr, layers, gate_init, mlp_expansion and
    e2e_first_codebook_weight; the other fields only concern TTT layers.
    """

    layer_type: str = "linear"
    mini_batch_size: int = 16
    base_lr: float | None = None
    num_heads: int | None = None
    layers: LayerSpec | None = None
    mode: str = "hybrid"
    gate_init: float = 0.1
    output_gate: bool = False
    rope_theta: float = 10000.0
    mlp_expansion: int = 4
    checkpoint_group_size: int = 0
    init_from_attention: bool = False
    e2e_first_codebook_weight: float = 100.0
    kernel: str = "auto"
    ln_eps: float = field(default=1e-6, repr=False)

    def __post_init__(self) -> None:
        _check_choice("layer_type", self.layer_type, LAYER_TYPES)
        _check_choice("mode", self.mode, MODES)
        _check_choice("kernel", self.kernel, KERNELS)
        if self.layer_type == "e2e_mlp" and self.mode != "hybrid":
            raise ValueError("TTTConfig.mode: e2e_mlp adds an MLP beside the layer's own; expected 'hybrid', "
                             f"got {self.mode!r}")
        _check_int("mini_batch_size", self.mini_batch_size, minimum=1)
        if self.mini_batch_size > MAX_MINI_BATCH:
            raise ValueError(f"TTTConfig.mini_batch_size: expected at most {MAX_MINI_BATCH} (the inner loop holds "
                             f"b x b matrices per head), got {self.mini_batch_size}")
        _check_int("mlp_expansion", self.mlp_expansion, minimum=1)
        _check_int("checkpoint_group_size", self.checkpoint_group_size, minimum=0)
        if self.num_heads is not None:
            _check_int("num_heads", self.num_heads, minimum=1)
        if self.base_lr is None:
            self.base_lr = DEFAULT_BASE_LR[self.layer_type]
        _check_number("base_lr", self.base_lr, positive=False, nonnegative=True)
        _check_number("gate_init", self.gate_init)
        if abs(self.gate_init) > MAX_GATE_INIT:
            raise ValueError(f"TTTConfig.gate_init: expected a number in [-{MAX_GATE_INIT:g}, {MAX_GATE_INIT:g}] "
                             f"(the gate is tanh(alpha), flat past ~5), got {self.gate_init!r}")
        _check_number("e2e_first_codebook_weight", self.e2e_first_codebook_weight, positive=True)
        _check_number("rope_theta", self.rope_theta, positive=True)
        _check_number("ln_eps", self.ln_eps, positive=True)
        for name in ("output_gate", "init_from_attention"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TTTConfig.{name}: expected true or false, got {getattr(self, name)!r}")
        if self.layers is None:
            self.layers = DEFAULT_LAYERS[self.layer_type]
        self.layers = _check_layer_spec(self.layers)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TTTConfig":
        """Build from a (YAML-loaded) mapping; unknown keys are an error, not silently dropped."""
        if not isinstance(data, Mapping):
            raise ValueError(f"TTTConfig: expected a mapping of fields, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"TTTConfig: unknown field(s) {unknown}; allowed: {sorted(known)}")
        return cls(**dict(data))

    @classmethod
    def from_yaml(cls, path: str | Path, key: str | None = None) -> "TTTConfig":
        """Load from a YAML file: the whole file, or the mapping under `key` (e.g. "ttt")."""
        from .schema import load_yaml

        path = Path(path)
        data = load_yaml(path)
        if key is not None:
            if not isinstance(data, Mapping) or key not in data:
                raise ValueError(f"{path}: no '{key}' section")
            data = data[key]
        try:
            return cls.from_dict(data or {})
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def is_e2e(self) -> bool:
        """TTT-E2E layers (fast weights updated by the host model's own loss), not TTT layers."""
        return self.layer_type == "e2e_mlp"

    @property
    def placement(self) -> str:
        """Where a hybrid branch goes: "attention" (after the attention residual) or "feed_forward"."""
        return PLACEMENTS[self.layer_type]

    def resolve_layers(self, depth: int) -> list[int]:
        """The sorted host-layer indices selected by `layers` for a host of `depth` layers."""
        spec = self.layers
        if isinstance(spec, list):
            out = []
            for i in spec:
                if not -depth <= i < depth:
                    raise ValueError(
                        f"TTTConfig.layers: index {i} out of range for a model with {depth} layers "
                        f"(allowed: {-depth}..{depth - 1})"
                    )
                out.append(i % depth)
            if len(set(out)) != len(out):
                raise ValueError(f"TTTConfig.layers: duplicate layer indices in {spec}")
            return sorted(out)
        if spec == "all":
            return list(range(depth))
        kind, value = spec.split(":")
        if kind == "every":
            k = int(value)
            if k > depth:
                raise ValueError(f"TTTConfig.layers: 'every:{k}' selects no layer of a {depth}-layer model")
            return list(range(k - 1, depth, k))
        count = math.ceil(float(value) * depth - 1e-9)
        return list(range(depth - max(count, 1), depth))


def resolve_chunk_size(requested: int | None, config: TTTConfig | None, where: str = "chunk_size",
                       frames: int | None = None) -> int:
    """Frames per chunk when a stream is fed chunk by chunk (evaluation, training windows), for a
    model patched with `config` (None: no TTT layers). The one rule (docs/architecture.md §3):

    - default (requested None): 4 mini-batches, 4·b frames (64 without TTT layers);
    - TTT layers take any chunk (the streaming contract); multiples of b waste no padding slots;
    - E2E layers update at mini-batch boundaries, so their chunks must be multiples of b, unless
      one chunk holds the whole stream (`frames`, when the caller knows it).
    `where` names the setting in errors.
    """
    if requested is None:
        return DEFAULT_CHUNK_MINI_BATCHES * config.mini_batch_size if config is not None else NO_TTT_CHUNK
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
        raise ValueError(f"{where}: expected a positive number of frames, got {requested!r}")
    one_chunk = frames is not None and requested >= frames
    if config is not None and config.is_e2e and requested % config.mini_batch_size and not one_chunk:
        raise ValueError(f"{where}: {requested} frames is not a multiple of the E2E mini-batch size "
                         f"({config.mini_batch_size}); E2E layers update at mini-batch boundaries")
    return requested


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"TTTConfig.{name}: expected one of {list(allowed)}, got {value!r}")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"TTTConfig.{name}: expected an integer >= {minimum}, got {value!r}")


def _check_number(name: str, value: Any, positive: bool = False, nonnegative: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and positive:
        ok = value > 0
    if ok and nonnegative:
        ok = value >= 0
    if not ok:
        what = "a positive" if positive else "a non-negative" if nonnegative else "a finite"
        raise ValueError(f"TTTConfig.{name}: expected {what} number, got {value!r}")


_LAYERS_HELP = "'all', a list of layer indices, 'every:k' (k >= 1) or 'last:f' (0 < f <= 1)"


def _check_layer_spec(spec: Any) -> LayerSpec:
    if isinstance(spec, (list, tuple)):
        if not spec or not all(isinstance(i, int) and not isinstance(i, bool) for i in spec):
            raise ValueError(f"TTTConfig.layers: expected {_LAYERS_HELP}, got {spec!r}")
        return list(spec)
    if spec == "all":
        return spec
    if isinstance(spec, str) and spec.count(":") == 1:
        kind, value = spec.split(":")
        try:
            number = int(value) if kind == "every" else float(value)
        except ValueError:
            number = None
        if kind == "every" and number is not None and number >= 1:
            return spec
        if kind == "last" and number is not None and 0 < number <= 1:
            return spec
        if kind == "last":
            raise ValueError(f"TTTConfig.layers: fraction in 'last:f' must be in (0, 1], got {value!r}")
    raise ValueError(f"TTTConfig.layers: expected {_LAYERS_HELP}, got {spec!r}")
