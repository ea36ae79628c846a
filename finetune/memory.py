"""Memory per rank: what a training rank holds (measured in a run), and what Moshi-7B needs
(computed from its real architecture built on the meta device) — docs/training.md, "Memory per rank".
"""
from __future__ import annotations

import resource
from dataclasses import asdict, dataclass
from typing import Iterable

import torch
from torch import nn

from ttt_speech.sharding import bytes_per_rank

GIB = 2 ** 30
# moshi-finetune's README (LoRA rank 128 on Moshi-7B, 100 s windows): peak memory per GPU
MOSHI_FINETUNE_PUBLISHED_GB = {1: 39.6, 8: 23.7}


@dataclass
class RankMemory:
    """Bytes one rank holds: parameters (all, and the trainable ones), gradients, optimizer state
    (its shards under FSDP), and the process's peak (CUDA allocator peak, or CPU resident peak)."""

    rank: int
    params: int
    trainable: int
    grads: int
    optimizer: int
    peak: int
    peak_kind: str

    def to_dict(self) -> dict:
        return asdict(self)


def rank_memory(rank: int, lm: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> RankMemory:
    """What this rank holds now (call it after an optimizer step, before gradients are cleared)."""
    params = list(lm.parameters())
    trainable = [p for p in params if p.requires_grad]
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device), "cuda allocated"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu resident"  # KiB on Linux
    return RankMemory(rank, bytes_per_rank(params), bytes_per_rank(trainable), bytes_per_rank(p.grad for p in trainable),
                      bytes_per_rank(state), peak, kind)


# ---------------------------------------------------------------- the computed table


@dataclass(frozen=True)
class ModelCounts:
    """Parameter counts and bytes of a patched model for one `trainable` setting (no allocation)."""

    trainable_setting: str
    total_params: int
    trainable_params: int
    param_bytes: int  # every parameter, in its dtype
    trainable_bytes: int  # the trainable ones (= their gradients' bytes)
    optimizer_bytes: int  # AdamW: two moments per trainable parameter, in its dtype

    def per_gpu(self, gpus: int, strategy: str) -> float:
        """GiB per GPU of weights + gradients + optimizer state (no activations, no buffers)."""
        total = self.param_bytes + self.trainable_bytes + self.optimizer_bytes
        return total / (gpus if strategy == "fsdp" else 1) / GIB


def count(lm: nn.Module, trainable_setting: str) -> ModelCounts:
    """Counts of `lm` (built on any device, meta included) with its `requires_grad` flags as set."""
    params = list(lm.parameters())
    trainable = [p for p in params if p.requires_grad]
    nbytes = lambda ps: sum(p.numel() * p.element_size() for p in ps)  # noqa: E731
    return ModelCounts(trainable_setting, sum(p.numel() for p in params), sum(p.numel() for p in trainable),
                       nbytes(params), nbytes(trainable), 2 * nbytes(trainable))


def memory_table(counts: Iterable[ModelCounts], gpus: tuple[int, ...] = (1, 8, 16)) -> str:
    """Markdown: GiB per GPU of weights + gradients + AdamW state for each trainable setting, under
    DDP (the same at any number of GPUs) and FSDP at each number of GPUs."""
    rows = ["| trainable | parameters (trainable) | DDP, any GPUs | "
            + " | ".join(f"FSDP, {n} GPU{'s' if n > 1 else ''}" for n in gpus) + " |",
            "|" + "---|" * (3 + len(gpus))]
    for c in counts:
        rows.append(f"| `{c.trainable_setting}` | {c.total_params / 1e9:.2f} B ({c.trainable_params / 1e9:.3f} B) | "
                    f"{c.per_gpu(1, 'ddp'):.1f} | " + " | ".join(f"{c.per_gpu(n, 'fsdp'):.1f}" for n in gpus) + " |")
    return "\n".join(rows)


def moshi_7b_counts(config, settings: tuple[str, ...] = ("ttt", "ttt+lora", "full")) -> list[ModelCounts]:
    """`count` of Moshi-7B's real architecture (meta device, nothing allocated) patched and made
    trainable as `config` (a `TrainConfig`) says, for each trainable setting; plus moshi-finetune's
    own setup (no TTT, LoRA rank 128) for comparison with its published figures."""
    from dataclasses import replace

    from ttt_speech.moshi import moshi_7b_lm

    from .config import LoraConfig
    from .model import prepare_model

    variants = [(s, replace(config, trainable=s)) for s in settings]
    variants.append(("lora r128 (moshi-finetune)", replace(config, ttt=None, trainable="lora", lora=LoraConfig(rank=128))))
    out = []
    for name, variant in variants:
        with torch.device("meta"):
            lm = prepare_model(moshi_7b_lm(), variant)
        out.append(count(lm, name))
    return out


def llama_counts(config, settings: tuple[str, ...] = ("ttt", "ttt+lora", "full")) -> list[ModelCounts]:
    """`count` of Qwen2.5-7B-Instruct (LLaMA-Omni2-7B's LLM; meta device) patched and made trainable as
    `config` (a host-llama `TrainConfig`, e.g. configs/qwen2_5_7b_ttt.yaml) says, per trainable setting."""
    from dataclasses import replace

    from ttt_speech.llama.models import qwen2_5_7b

    from .model import prepare_model

    out = []
    for setting in settings:
        with torch.device("meta"):
            lm = prepare_model(qwen2_5_7b(config.model.torch_dtype()), replace(config, trainable=setting))
        out.append(count(lm, setting))
    return out
