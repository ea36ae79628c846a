"""The Triton kernels (`ttt_speech.kernels`) pinned to the PyTorch path: outputs, states and every
gradient, on chunkings, offsets, masks and dtypes; run by Triton's interpreter on a CPU.

Tolerances (float32 on both paths; the kernels sum in another order, and run every mini-batch at
the padded width): outputs and states within 2e-5, gradients within 2e-5 of their largest entry.
A perturbed kernel (a wrong ε or RoPE base, one gradient's sign) fails the same checks.
"""
import dataclasses

import pytest
import torch

pytest.importorskip("triton")  # without a GPU, in its interpreter (TRITON_INTERPRET, set by conftest.py)

from conftest import make_layer, max_diff  # noqa: E402
from ttt_speech import TTTConfig  # noqa: E402
from ttt_speech.kernels import custom_ops  # noqa: E402
from ttt_speech.kernels.launches import LaunchCounter  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 2e-5


def with_kernel(layer, kernel):
    layer.config = dataclasses.replace(layer.config, kernel=kernel)
    return layer


def kernel_layer(layer_type="linear", b=4, dim=32, heads=2, **cfg):
    """A float32 layer far from init (conftest.make_layer) on the kernels' device."""
    return make_layer(layer_type, b=b, dim=dim, heads=heads, dtype=torch.float32, **cfg).to(DEVICE)


def moved_state(layer, batch, offsets, seed=0):
    """A state some tokens into a stream, rows at the given offsets, with non-zero pending sums."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        _, state = with_kernel(layer, "torch")(torch.randn(batch, 2 * layer.mini_batch_size + 1, layer.dim,
                                                            generator=g).to(DEVICE))
    grads = tuple(t + 0.05 * torch.randn(t.shape, generator=g).to(DEVICE) for t in state.grads)
    return dataclasses.replace(state, grads=grads, offset=torch.tensor(offsets, device=DEVICE))


def run_both(layer, fn):
    return fn(with_kernel(layer, "torch")), fn(with_kernel(layer, "triton"))


def state_diff(a, b):
    assert torch.equal(a.offset, b.offset)
    return max(max_diff(x, y) for x, y in zip(a.weights + a.grads, b.weights + b.grads))


def stream(layer, x, sizes, state=None, active=None, in_place=False):
    """Feed x [B, T, C] in chunks of `sizes` → (outputs, final state)."""
    if in_place:
        state = (state if state is not None else layer.initial_state(x.shape[0])).clone()
    ys, start = [], 0
    for size in sizes:
        y, state = layer(x[:, start:start + size], state, active=active, in_place=in_place)
        ys.append(y)
        start += size
    return torch.cat(ys, 1), state


CHUNKINGS = {4: [[1] * 5 + [3, 2, 7, 1, 9], [27]], 16: [[1, 15, 17, 5], [38]]}


@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
@pytest.mark.parametrize("b,dim,heads", [(4, 32, 2), (16, 64, 2)])
def test_forward_matches_the_torch_path_on_every_chunking(layer_type, b, dim, heads):
    """From the initial state and from a moved one (rows at different offsets, pending sums), T = 1
    to ~3 mini-batches per call, in place (streaming) or not: the same outputs and states."""
    layer = kernel_layer(layer_type, b=b, dim=dim, heads=heads, mlp_expansion=2)
    x = torch.randn(3, sum(CHUNKINGS[b][0]), dim, device=DEVICE)
    start = moved_state(layer, 3, [1, 0, b - 1])
    with torch.no_grad():
        for sizes in CHUNKINGS[b]:
            for state, in_place in ((None, False), (start, True)) if len(sizes) == 1 else \
                    ((None, False), (start, False), (start, True)):
                (y0, s0), (y1, s1) = run_both(layer, lambda m: stream(m, x, sizes, state, in_place=in_place))
                assert max_diff(y0, y1) <= TOL, (sizes, in_place)
                assert state_diff(s0, s1) <= TOL, (sizes, in_place)
    assert max_diff(s1.weights[0], layer.initial_state(3).weights[0]) > 1e-2  # the fast weights really moved


@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
@pytest.mark.parametrize("in_place", [False, True])
def test_inactive_rows_keep_their_state_exactly(layer_type, in_place):
    """moshi's exec mask: rows that do not execute keep their state bit for bit, on both paths."""
    layer = kernel_layer(layer_type, b=4, mlp_expansion=2)
    x = torch.randn(3, 7, 32, device=DEVICE)
    active = torch.tensor([True, False, True], device=DEVICE)
    start = moved_state(layer, 3, [2, 3, 0])
    with torch.no_grad():
        (y0, s0), (y1, s1) = run_both(layer, lambda m: stream(m, x, [2, 5], start, active, in_place))
    assert max_diff(y0[active], y1[active]) <= TOL
    assert state_diff(s0, s1) <= TOL
    for kept, before in zip(s1.weights + s1.grads, start.weights + start.grads):
        assert torch.equal(kept[1], before[1])
    assert torch.equal(s1.offset, torch.tensor([1, 3, 3], device=DEVICE))


def gradients(layer, x, state, sizes, weights, active=None, state_in_loss=True):
    """Every gradient of a loss on the outputs (and on the final state, so that ∂/∂ the state after
    the chunk reaches the kernels too), through a stream of chunks starting from `state`."""
    layer.zero_grad()
    x = x.clone().requires_grad_(True)
    if state is not None:
        state = state.map(lambda t: t.clone().requires_grad_(t.is_floating_point()))
    y, final = stream(layer, x, sizes, state, active)
    loss = (y * weights).sum()
    if state_in_loss:
        loss = loss + sum((t * t).sum() for t in final.weights + final.grads) * 0.1
    loss.backward()
    grads = {name: p.grad for name, p in layer.named_parameters()}
    grads["x"] = x.grad
    if state is not None:
        grads.update({f"state.{i}": t.grad for i, t in enumerate(state.weights + state.grads)})
    return grads


def gradient_error(layer, sizes, group, from_state, active=None, state_in_loss=True):
    """The largest difference of any gradient between the paths, relative to its largest entry."""
    layer.config = dataclasses.replace(layer.config, checkpoint_group_size=group)
    x = torch.randn(2, sum(sizes), layer.dim, device=DEVICE)
    weights = torch.randn(2, sum(sizes), layer.dim, device=DEVICE)
    state = moved_state(layer, 2, [3, 1]) if from_state else None
    g0, g1 = run_both(layer, lambda m: gradients(m, x, state, sizes, weights, active, state_in_loss))
    used = [n for n, g in g0.items() if g is not None]  # W1, b1 are not, from a given state
    assert [n for n, g in g1.items() if g is not None] == used
    assert all(g0[n].abs().max() > 0 for n in used)  # every input moves the loss
    return max(max_diff(g0[n], g1[n]) / g0[n].abs().max().item() for n in used)


@pytest.mark.parametrize("sizes,group,from_state", [([11], 0, False), ([3, 14], 0, True), ([1, 30], 3, True)])
def test_linear_gradients_match_the_torch_path(sizes, group, from_state):
    """Gradients of every parameter, of the input and of the incoming state (its weights and its
    pending sums), with checkpoint groups of 1 and 3 mini-batches, rows at different offsets."""
    assert gradient_error(kernel_layer(b=4), sizes, group, from_state) <= TOL


def test_linear_gradients_with_an_exec_mask_and_without_the_state_in_the_loss():
    """moshi's exec mask in training (a row that does not execute, over several mini-batches, from a
    moved state), and a loss on the outputs only (no ∂/∂ the final state: the kernel runs without it)."""
    active = torch.tensor([True, False], device=DEVICE)
    assert gradient_error(kernel_layer(b=4), [2, 13], 2, True, active) <= TOL
    assert gradient_error(kernel_layer(b=4), [2, 13], 0, True, active, state_in_loss=False) <= TOL


def test_operators_pass_torch_library_checks():
    """Schemas, fake tensors (torch.compile) and the autograd registration (`torch.library.opcheck`)."""
    B, T, H, D, b = 2, 6, 2, 16, 4
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE)

    state = (0.1 * rand(B, H, D + 1, D)).requires_grad_(True), (0.01 * rand(B, H, D + 1, D)).requires_grad_(True)
    args = (rand(B, T, 3 * H * D).requires_grad_(True), (0.1 * rand(B, H, T).sigmoid()).requires_grad_(True),
            (0.1 * rand(b)).requires_grad_(True), (1 + 0.1 * rand(H, D)).requires_grad_(True),
            (0.1 * rand(H, D)).requires_grad_(True), *state, torch.tensor([0, 3], device=DEVICE), None, H, b,
            10000.0, 1e-6, 1)
    torch.library.opcheck(custom_ops.linear_scan, args, test_utils=("test_schema", "test_autograd_registration",
                                                                    "test_faketensor"))
    inference = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args[:-1])
    inference = (*inference[:5], inference[5].clone(), inference[6].clone(), *inference[7:])
    torch.library.opcheck(custom_ops.linear_scan_, inference, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_in_place_under_autograd_is_refused_on_both_paths(kernel):
    layer = with_kernel(kernel_layer(b=4), kernel)
    with pytest.raises(ValueError, match="in_place needs autograd off"):
        layer(torch.randn(1, 3, 32, device=DEVICE), layer.initial_state(1).clone(), in_place=True)


def test_moshi_7b_head_dim_and_block_sizes():
    """Heads of 128 with b = 16 and a TTT-MLP hidden width of 512, as configs/moshi_7b_ttt.yaml runs
    them: the tiles the kernels use there (32 rows of [W; b], 16 hidden columns) and checkpoint groups."""
    x = torch.randn(1, 40, 128, device=DEVICE)
    for layer_type in ("linear", "mlp"):
        layer = kernel_layer(layer_type, b=16, dim=128, heads=1, mlp_expansion=4)
        start = moved_state(layer, 1, [5])
        with torch.no_grad():
            (y0, s0), (y1, s1) = run_both(layer, lambda m: stream(m, x, [7, 33], start))
        assert max_diff(y0, y1) <= TOL and state_diff(s0, s1) <= TOL, layer_type
    assert gradient_error(kernel_layer(b=16, dim=128, heads=1), [5, 30], 2, True) <= TOL


def test_bf16_inputs_keep_a_float32_state():
    """A bf16 model: the projections in bf16, the inner loop in float32 on both paths."""
    layer = kernel_layer(b=4).to(torch.bfloat16)
    x = torch.randn(2, 13, 32, device=DEVICE, dtype=torch.bfloat16)
    with torch.no_grad():
        (y0, s0), (y1, s1) = run_both(layer, lambda m: stream(m, x, [5, 8]))
    assert y1.dtype == torch.bfloat16 and all(t.dtype == torch.float32 for t in s1.weights + s1.grads)
    assert max_diff(y0.float(), y1.float()) <= 2e-2  # one bf16 rounding of outputs of size ~1
    assert state_diff(s0, s1) <= TOL


def perturbed(monkeypatch, name, **changes):
    """Make the launch of kernel `name` (in custom_ops' module) use other values for some arguments."""
    module = custom_ops.linear if name.startswith("linear") else custom_ops.mlp
    kernel = getattr(module, name)

    class Launch:
        def __getitem__(self, grid):
            return lambda *args, **kw: kernel[grid](*args, **{**kw, **changes})

    monkeypatch.setattr(module, name, Launch())


@pytest.mark.parametrize("name,changes", [("linear_forward_kernel", {"eps": 1e-2}),
                                          ("mlp_forward_kernel", {"log2_theta": 12.0})])
def test_a_perturbed_forward_kernel_fails_the_check(monkeypatch, name, changes):
    layer_type = name.split("_")[0]
    layer = kernel_layer(layer_type, b=4, mlp_expansion=2)
    x = torch.randn(2, 11, 32, device=DEVICE)
    perturbed(monkeypatch, name, **changes)
    with torch.no_grad():
        (y0, _), (y1, _) = run_both(layer, lambda m: stream(m, x, [11]))
    assert max_diff(y0, y1) > 100 * TOL


def test_a_perturbed_backward_kernel_fails_the_check(monkeypatch):
    perturbed(monkeypatch, "linear_backward_kernel", log2_theta=12.0)  # a wrong RoPE in the gradients only
    assert gradient_error(kernel_layer(b=4), [3, 14], 0, True) > 100 * TOL


@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
def test_launches_per_layer_meet_the_targets(layer_type):
    """The kernel path launches a fixed number of ops per call, whatever the chunk (the targets of
    a 1500-frame window: <= 60 forward, <= 150 forward + backward, <= 30 per T = 1 step;
    scripts/bench_launches.py counts the window itself and the PyTorch path beside)."""
    layer = with_kernel(kernel_layer(layer_type, b=16, checkpoint_group_size=4), "triton")
    x = torch.randn(1, 80, 32, device=DEVICE, requires_grad=True)
    counts = {}
    with torch.no_grad(), LaunchCounter() as counter:
        layer(x)
    counts["forward"] = counter.launches
    if layer_type == "linear":
        y = layer(x)[0]
        seed = torch.randn_like(y)
        with LaunchCounter() as counter:
            layer(x)[0].backward(seed)
        counts["forward + backward"] = counter.launches
    state = layer.initial_state(1).clone()
    with torch.inference_mode(), LaunchCounter() as counter:
        layer(x[:, :1].detach(), state, in_place=True)
    counts["step"] = counter.launches
    assert counts["forward"] <= 60 and counts.get("forward + backward", 0) <= 150 and counts["step"] <= 30, counts
    with_kernel(layer, "torch")
    with torch.no_grad(), LaunchCounter() as counter:
        layer(x)
    assert counter.launches > 5 * counts["forward"]  # the counter sees the PyTorch path's ops


def test_kernel_choice_is_validated_and_explained(monkeypatch):
    with pytest.raises(ValueError, match="TTTConfig.kernel: expected one of"):
        TTTConfig(kernel="cuda")
    x = torch.randn(1, 5, 32)
    layer = make_layer("linear", b=4, dim=32, heads=2, dtype=torch.float64, kernel="triton")
    with pytest.raises(ValueError, match="TTTConfig.kernel: 'triton' cannot run this layer: .*float32"):
        layer(x.double())
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="run on CUDA devices .*TRITON_INTERPRET=1"):
            make_layer("linear", b=4, dim=32, heads=2, dtype=torch.float32, kernel="triton")(x)
        auto = make_layer("linear", b=4, dim=32, heads=2, dtype=torch.float32, kernel="auto")
        with LaunchCounter() as counter:
            auto(x)
        assert "ttt_speech::linear_scan" not in counter.by_op  # auto: the PyTorch path off CUDA
    mlp = make_layer("mlp", b=4, dim=32, heads=2, dtype=torch.float32, kernel="triton", mlp_expansion=2)
    with pytest.raises(ValueError, match="TTT-MLP has a forward kernel only"):
        mlp(torch.randn(1, 5, 32, device=DEVICE, requires_grad=True))
