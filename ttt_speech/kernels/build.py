"""Ahead-of-time builds of every kernel for the GPUs users run, without a GPU.

`triton.compile` lowers a kernel to PTX and runs ptxas for a target compute capability on any
machine; the build's metadata gives the shared memory one block needs, which must fit the target
(the opt-in maximum per block: A100, sm_80, 163 KB; H100, sm_90, 227 KB). tests/test_kernel_builds.py builds each kernel
at the block sizes `custom_ops` picks for the shapes users run; `python -m ttt_speech.kernels.build`
prints the table.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import custom_ops, interpreting

SHARED_MEMORY_PER_BLOCK = {80: 166_912, 90: 232_448}  # bytes: the opt-in maximum per block (163 KB, 227 KB)
GPUS = {80: "A100 (sm_80)", 90: "H100 (sm_90)"}
_FLOATS = ("log2_theta", "eps")
_POINTER_TYPES = {"offset_ptr": "*i64", "active_ptr": "*i1"}


@dataclass(frozen=True)
class KernelBuild:
    """One kernel at one set of block sizes."""

    name: str
    kernel: Any  # a triton.JITFunction
    constexprs: dict[str, Any]
    num_warps: int

    def signature(self) -> dict[str, str]:
        """Argument types by the kernels' naming: `*_ptr` fp32 pointers (offsets int64, masks bool),
        `log2_theta` / `eps` fp32, every other runtime argument an int32 (sizes, strides)."""
        sig = {}
        for name in self.kernel.arg_names:  # triton 3.9.0: a JITFunction's parameter names
            if name in self.constexprs:
                sig[name] = "constexpr"
            elif name.endswith("_ptr"):
                sig[name] = _POINTER_TYPES.get(name, "*fp32")
            else:
                sig[name] = "fp32" if name in _FLOATS else "i32"
        return sig


def builds(head_dim: int = 128, mini_batch_size: int = 16, mlp_expansion: int = 4) -> list[KernelBuild]:
    """Every kernel the layer can launch for heads of `head_dim` and mini-batches of b, with the
    block sizes `custom_ops` picks (Moshi-7B with configs/moshi_7b_ttt.yaml: 128, 16, 4)."""
    from . import linear, mlp

    D, BB, M = head_dim, custom_ops.block_slots(mini_batch_size), mlp_expansion * head_dim
    warps, KT = custom_ops.num_warps(D), custom_ops.row_tile(D)
    out = []
    for save in (False, True):
        for has_active in (False, True):
            out.append(KernelBuild(f"linear_forward(save={save}, active={has_active})", linear.linear_forward_kernel,
                                   dict(D=D, BB=BB, KT=KT, HAS_ACTIVE=has_active, SAVE=save), warps))
    for has_dstate in (False, True):
        for has_active in (False, True):
            out.append(KernelBuild(f"linear_backward(dstate={has_dstate}, active={has_active})",
                                   linear.linear_backward_kernel,
                                   dict(D=D, BB=BB, KT=KT, HAS_ACTIVE=has_active, HAS_DSTATE=has_dstate), warps))
    for has_active in (False, True):
        out.append(KernelBuild(f"mlp_forward(active={has_active})", mlp.mlp_forward_kernel,
                               dict(D=D, M=M, MT=custom_ops.hidden_columns(D, M), BB=BB, HAS_ACTIVE=has_active), warps))
    return out


@dataclass(frozen=True)
class BuildResult:
    name: str
    capability: int
    shared_bytes: int  # per block (Triton's metadata)
    registers: int  # per thread (the cubin's resource usage)
    stack_bytes: int  # per thread: register spills and local arrays, slow local memory
    seconds: float

    @property
    def fits(self) -> bool:
        return self.shared_bytes <= SHARED_MEMORY_PER_BLOCK[self.capability]


def compile_for(build: KernelBuild, capability: int) -> BuildResult:
    """Build `build` for CUDA compute capability `capability` (80, 90) → its cubin's figures."""
    import triton
    from triton.backends.compiler import GPUTarget  # triton 3.9.0: the ahead-of-time API (3.3 and later)
    from triton.compiler import ASTSource

    start = time.perf_counter()
    source = ASTSource(fn=build.kernel, signature=build.signature(), constexprs=build.constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                              options={"num_warps": build.num_warps, "num_stages": custom_ops.NUM_STAGES,
                                       "enable_fp_fusion": custom_ops.FP_FUSION})
    registers, stack = resource_usage(compiled.asm["cubin"])
    # triton 3.9.0: a CompiledKernel's asm by stage ("ptx", "cubin", …) and its metadata's shared bytes
    return BuildResult(build.name, capability, compiled.metadata.shared, registers, stack,
                       time.perf_counter() - start)


def resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes) per thread of a cubin, by the cuobjdump Triton ships with."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"  # triton 3.9.0's wheel layout
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        out = subprocess.run([str(tool), "-res-usage", str(path)], capture_output=True, text=True, check=True).stdout
    usage = dict(re.findall(r"(REG|STACK):(\d+)", out))
    return int(usage["REG"]), int(usage["STACK"])


def _compile_one(job: tuple[int, int, int, int, int]) -> BuildResult:
    """A worker's build: (index into `builds(...)`, capability, head dim, mini-batch, expansion)."""
    index, capability, *shape = job
    return compile_for(builds(*shape)[index], capability)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--mini-batch-size", type=int, default=16)
    parser.add_argument("--mlp-expansion", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=1, help="builds in parallel (processes)")
    args = parser.parse_args(argv)
    if interpreting():
        print("error: TRITON_INTERPRET is set: the kernels are defined for the interpreter, unset it to build them",
              file=sys.stderr)
        return 2
    shape = (args.head_dim, args.mini_batch_size, args.mlp_expansion)
    jobs = [(i, capability, *shape) for i in range(len(builds(*shape))) for capability in GPUS]
    print(f"head dim {args.head_dim}, mini-batch {args.mini_batch_size}, TTT-MLP hidden "
          f"{args.mlp_expansion * args.head_dim}; per block: shared memory; per thread: registers, stack (spills)")
    print(f"{'kernel':44s} {'target':14s} {'shared KB':>9s} {'limit KB':>8s} {'regs':>4s} {'stack B':>7s} {'build s':>7s}")
    failed = 0
    with ProcessPoolExecutor(args.jobs) if args.jobs > 1 else nullcontext() as pool:
        results = pool.map(_compile_one, jobs) if pool is not None else map(_compile_one, jobs)
        for r in results:
            failed += not r.fits
            print(f"{r.name:44s} {GPUS[r.capability]:14s} {r.shared_bytes / 1024:9.1f} "
                  f"{SHARED_MEMORY_PER_BLOCK[r.capability] / 1024:8.0f} {r.registers:4d} {r.stack_bytes:7d} "
                  f"{r.seconds:7.1f}" + ("" if r.fits else "  DOES NOT FIT"), flush=True)
    print(f"{len(jobs) - failed} of {len(jobs)} builds fit their target")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
