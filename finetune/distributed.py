"""torchrun plumbing: process group from the environment, backend from the device, wrapping."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ttt_speech.models import resolve_device

logger = logging.getLogger("finetune")


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(tensor)
        return tensor

    def any(self, flag: bool) -> bool:
        """Whether `flag` is true on any rank (collective: every rank calls it)."""
        return bool(self.all_reduce(torch.tensor(float(flag), device=self.device)).item())

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order (on every rank)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj`, on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def init_distributed(device_name: str) -> Dist:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK; gloo on CPU, nccl on CUDA (not hard-coded)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)  # a device this machine lacks: one line, before any process group
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local, device)


def close_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, env: Dist, strategy: str, layers: list[nn.Module],
         full_state: dict[str, Tensor] | None = None) -> nn.Module:
    """`model` (the host's window model) made data-parallel as `strategy` says (unchanged when single-process).

    "ddp": DistributedDataParallel (every rank holds everything). "fsdp": sharded in place
    (`ttt_speech.sharding.shard`: one unit per transformer layer of `layers`, TTT branches nested); ranks
    other than 0 built `model` on the meta device, and `full_state` (rank 0's state dict, taken
    before sharding) fills every rank's shards from rank 0.
    """
    if not env.enabled:
        if strategy == "fsdp":
            logger.info("distributed: fsdp with one process: nothing to shard, the model runs as it is")
        return model
    if strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        from torch.distributed.device_mesh import init_device_mesh

        from ttt_speech.sharding import shard

        shard(model, layers, init_device_mesh(env.device.type, (env.world,)))
        if not env.is_main:
            model.to_empty(device=env.device)  # storage for this rank's shards, filled from rank 0
        set_model_state_dict(model, full_state if env.is_main else {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        for buffer in model.buffers():  # also those outside the state dict (transformers' rotary `inv_freq`),
            dist.broadcast(buffer.data, src=0)  # which `to_empty` left uninitialised on the other ranks
        return model
    from torch.nn.parallel import DistributedDataParallel

    # With persistent state, the TTT initial fast weights (W1, b1) only take part in a step when
    # some row starts a new recording (their state is reset from them); DDP must allow that.
    return DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                                   find_unused_parameters=True)


def consolidated(model: nn.Module, lm: nn.Module, rebuild: Callable[[torch.device], nn.Module],
                 env: Dist, device: torch.device) -> nn.Module | None:
    """`lm` whole, on rank 0: `lm` itself unless sharded; under FSDP a plain copy built by
    `rebuild(device)` on the meta device and given the gathered weights, on `device` (collective:
    every rank calls it; None on ranks > 0). FSDP's `state_dict` only ever returns shards, so
    exports, which read modules, are written from the copy."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from ttt_speech.sharding import is_sharded

    if not is_sharded(model):
        return lm if env.is_main else None
    whole = get_model_state_dict(lm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not env.is_main:
        return None
    copy = rebuild(torch.device("meta"))
    copy.load_state_dict(whole, assign=True)
    # buffers outside the state dict (transformers' rotary `inv_freq`) are still meta: FSDP leaves buffers
    # whole on every rank, so they are this rank's
    own = dict(lm.named_buffers())
    for name, buffer in list(copy.named_buffers()):
        if buffer.is_meta:
            owner, _, leaf = name.rpartition(".")
            copy.get_submodule(owner).register_buffer(leaf, own[name].detach().clone(), persistent=False)
    return copy.to(device).train(lm.training)


def chunk_model(model: nn.Module) -> nn.Module:
    """The window model (`ChunkModel`, `TokenWindowModel`) inside what `wrap` returned."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def build_device(env: Dist, strategy: str) -> torch.device:
    """Where this rank builds the model: the meta device on ranks > 0 under FSDP (no rank but 0
    materialises the whole model: they receive their shards), its device otherwise."""
    return torch.device("meta") if strategy == "fsdp" and env.enabled and not env.is_main else env.device
