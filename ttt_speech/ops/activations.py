"""tanh-approximated GELU and its exact derivative (the inner MLP's nonlinearity)."""
import math

import torch
from torch import Tensor
from torch.nn import functional as F

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_CUBIC = 0.044715


def gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


def gelu_tanh_grad(x: Tensor) -> Tensor:
    """d gelu_tanh(x) / dx, exact (the reference truncates the constants; we do not)."""
    t = torch.tanh(_SQRT_2_OVER_PI * (x + _CUBIC * x**3))
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _SQRT_2_OVER_PI * (1 + 3 * _CUBIC * x * x)
