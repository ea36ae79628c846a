"""Rotary position embedding with interleaved pairs, as in the TTT reference."""
import torch
from torch import Tensor


def rope_interleaved(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """Rotate adjacent channel pairs (2i, 2i+1) of x by angle pos · theta^(−2i/d).

    x [..., T, d] with d even; positions [T] (integers). Angles are computed in at least float32
    whatever x's dtype (the reference does the same), so bf16 models get accurate rotations.
    """
    d = x.shape[-1]
    angle_dtype = torch.promote_types(x.dtype, torch.float32)
    inv_freq = theta ** (-torch.arange(0, d, 2, device=x.device, dtype=angle_dtype) / d)
    angles = positions.to(angle_dtype)[:, None] * inv_freq  # [T, d/2]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    if _pairs_as_complex(x):
        # (x_2i + i·x_2i+1)·(cos + i·sin): the same products and sums as below, in one
        # vectorised kernel instead of strided slices and a stack (about 5x faster on CPU).
        pairs = torch.view_as_complex(x.unflatten(-1, (-1, 2)))
        return torch.view_as_real(pairs * torch.complex(cos, sin)).flatten(-2)
    x_even, x_odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), dim=-1).flatten(-2)


def _pairs_as_complex(x: Tensor) -> bool:
    """Whether x [..., d] can be viewed as complex pairs (float32/64, pairs adjacent in memory)."""
    return (x.dtype in (torch.float32, torch.float64) and x.stride(-1) == 1 and x.storage_offset() % 2 == 0
            and all(s % 2 == 0 for s in x.stride()[:-1]))
