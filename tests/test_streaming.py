"""The streaming-state contract (docs/architecture.md §3): any chunking gives the one-pass outputs."""
import random

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_layer, max_diff
from ttt_speech.ops.scan import slot_index

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def run_chunks(layer, x, sizes, state=None):
    ys, start = [], 0
    for size in sizes:
        y, state = layer(x[:, start:start + size], state)
        ys.append(y)
        start += size
    assert start == x.shape[1]
    return torch.cat(ys, dim=1), state


def chunkings(T, b, seed):
    rng = random.Random(seed)
    fixed = [[1] * T, [b - 1] * (T // (b - 1)) + [T % (b - 1)], [b + 1] * (T // (b + 1)) + [T % (b + 1)],
             [2, 3, 5, 7, 11, 13, 17, T - 58], [T], [3 * b + 5, T - 3 * b - 5]]
    randoms = []
    for _ in range(4):
        sizes, left = [], T
        while left:
            sizes.append(min(left, rng.randint(1, 2 * b + 3)))
            left -= sizes[-1]
        randoms.append(sizes)
    return [[s for s in c if s > 0] for c in fixed + randoms]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
def test_any_chunking_equals_one_pass(dtype, layer_type):
    b, T = 4, 70
    layer = make_layer(layer_type, b=b, dtype=dtype, mlp_expansion=2)
    x = torch.randn(3, T, 16, dtype=dtype)
    with torch.no_grad():
        full, full_state = layer(x)
        for sizes in chunkings(T, b, seed=1):
            y, state = run_chunks(layer, x, sizes)
            assert max_diff(y, full) <= TOL[dtype], sizes
            for a, c in zip(state.weights + state.grads, full_state.weights + full_state.grads):
                assert max_diff(a, c) <= TOL[dtype], sizes
            assert torch.equal(state.offset, full_state.offset)


@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
def test_in_place_updates_equal_the_general_path_on_every_chunking(layer_type):
    """`in_place=True` (streaming inference) steps the state's own buffers: the same numbers as
    the out-of-place path, on every chunking, and the state object it was given is the one updated."""
    b, T = 4, 70
    layer = make_layer(layer_type, b=b, dtype=torch.float64, mlp_expansion=2)
    x = torch.randn(3, T, 16, dtype=torch.float64)
    with torch.no_grad():
        for sizes in chunkings(T, b, seed=2):
            y_ref, ref = run_chunks(layer, x, sizes)
            state, ys, start = layer.initial_state(3).clone(), [], 0
            for size in sizes:
                y, out = layer(x[:, start:start + size], state, in_place=True)
                assert out is state
                ys.append(y)
                start += size
            assert torch.equal(torch.cat(ys, 1), y_ref), sizes
            assert all(torch.equal(a, c) for a, c in zip(state.tensors(), ref.tensors())), sizes
        initial = layer.initial_state(3)
        assert max_diff(state.weights[0], initial.weights[0]) > 1e-3  # the buffers really moved
        with pytest.raises(ValueError, match="contiguous"):
            layer(x[:, :5], initial, in_place=True)  # a broadcast view cannot be stepped in place


@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
def test_trimmed_layout_equals_the_padded_one_on_every_chunking(layer_type):
    """A chunk inside one mini-batch (all rows at one offset) is computed on its own slots only:
    the same outputs and states as padding it to the whole mini-batch, on every chunking."""
    b, T = 4, 70
    layer = make_layer(layer_type, b=b, dtype=torch.float64, mlp_expansion=2)
    x = torch.randn(2, T, 16, dtype=torch.float64)
    assert slot_index(torch.tensor([3, 3]), 1, b).width == 1  # T = 1 mid mini-batch: trimmed
    assert slot_index(torch.tensor([1, 3]), 1, b).width == b  # rows at different offsets: padded
    with torch.no_grad():
        for sizes in chunkings(T, b, seed=3):
            state_t = state_p = None
            start = 0
            for size in sizes:
                y_t, state_t = layer(x[:, start:start + size], state_t)
                y_p, state_p = layer(x[:, start:start + size], state_p, trim=False)
                assert max_diff(y_t, y_p) <= 1e-12, sizes
                start += size
            assert all(max_diff(a, c) <= 1e-12 for a, c in zip(state_t.tensors(), state_p.tensors())), sizes


@pytest.mark.parametrize("in_place", [False, True])
def test_inactive_rows_keep_their_state_exactly(in_place):
    """active [B]: rows not taking a chunk keep weights, sums and offset; the others are as if alone."""
    b = 4
    layer = make_layer("mlp", b=b, dtype=torch.float64, mlp_expansion=2)
    x = torch.randn(3, 11, 16, dtype=torch.float64)
    active = torch.tensor([True, False, True])
    with torch.no_grad():
        _, start = layer(x[:, :6])  # mid mini-batch: pending sums, offset 2
        before = start.clone()
        y, state = layer(x[:, 6:], start.clone(), active=active, in_place=in_place)
        _, alone = layer(x[:, 6:], before)
    for a, kept, moved in zip(state.tensors(), before.tensors(), alone.tensors()):
        assert torch.equal(a[1], kept[1])
        assert torch.equal(a[[0, 2]], moved[[0, 2]])
    assert not torch.equal(state.weights[0][0], before.weights[0][0])  # an active row moved


def test_chunking_equivalence_with_b16_and_token_by_token():
    layer = make_layer("linear", b=16, dtype=torch.float32, dim=32, heads=4)
    x = torch.randn(2, 53, 32)
    with torch.no_grad():
        full, _ = layer(x)
        y, _ = run_chunks(layer, x, [1] * 53)
    assert max_diff(y, full) <= 1e-5


def test_batch_rows_are_independent():
    layer = make_layer("mlp", b=4, mlp_expansion=2)
    x = torch.randn(3, 11, 16, dtype=torch.float64)
    with torch.no_grad():
        together, _ = layer(x)
        for r in range(3):
            alone, _ = layer(x[r:r + 1])
            assert max_diff(together[r:r + 1], alone) <= 1e-12


def test_rows_at_different_offsets_in_one_call():
    """A row that skipped a chunk (exec mask false) continues correctly next to the others."""
    layer = make_layer("linear", b=4)
    x = torch.randn(2, 20, 16, dtype=torch.float64)
    with torch.no_grad():
        _, s1 = layer(x[:, :3])
        _, s2 = layer(x[:, 3:8], s1)
        s2 = s2.where(torch.tensor([True, False]), s1)  # row 1 did not execute x[:, 3:8]
        assert s2.offset.tolist() == [0, 3]
        tail = x[:, 8:]
        y, _ = layer(tail, s2)
        row0, _ = layer(x[:1])
        row1, _ = layer(torch.cat([x[1:, :3], tail[1:]], dim=1))
    assert max_diff(y[0], row0[0, 8:]) <= 1e-10
    assert max_diff(y[1], row1[0, 3:]) <= 1e-10


def test_reset_mask_only_touches_masked_rows():
    layer = make_layer("linear", b=4)
    x = torch.randn(3, 10, 16, dtype=torch.float64)
    with torch.no_grad():
        _, state = layer(x)
        reset = layer.reset_state(state, torch.tensor([False, True, False]))
        init = layer.initial_state(3)
        for a, kept, fresh in zip(reset.weights + reset.grads, state.weights + state.grads, init.weights + init.grads):
            assert torch.equal(a[0], kept[0]) and torch.equal(a[2], kept[2])
            assert torch.equal(a[1], fresh[1])
        assert reset.offset.tolist() == [2, 0, 2]
        # After a reset, a row behaves exactly like a new stream.
        nxt = torch.randn(3, 6, 16, dtype=torch.float64)
        y, _ = layer(nxt, reset)
        fresh_y, _ = layer(nxt[1:2])
    assert max_diff(y[1], fresh_y[0]) <= 1e-12


def test_save_load_continue_gives_identical_outputs(tmp_path):
    layer = make_layer("mlp", b=4, dtype=torch.float32, mlp_expansion=2)
    x = torch.randn(2, 23, 16)
    with torch.no_grad():
        full, _ = layer(x)
        _, state = layer(x[:, :9])
        save_file(state.to_tensors(), tmp_path / "state.safetensors")
        restored = layer.initial_state(2).load_tensors(load_file(tmp_path / "state.safetensors"))
        y_restored, _ = layer(x[:, 9:], restored)
        y_live, _ = layer(x[:, 9:], state)
    assert torch.equal(y_restored, y_live)
    assert max_diff(y_restored, full[:, 9:]) <= 1e-5


def test_load_rejects_wrong_tensors():
    layer = make_layer("linear", b=4)
    tensors = layer.initial_state(2).to_tensors()
    tensors["W1"] = tensors["W1"][:1]
    with pytest.raises(ValueError, match="W1 has shape"):
        layer.initial_state(2).load_tensors(tensors)
    with pytest.raises(ValueError, match="expected tensors"):
        layer.initial_state(2).load_tensors({"offset": tensors["offset"]})


def test_detach_keeps_values_and_cuts_the_graph():
    layer = make_layer("linear", b=4)
    x = torch.randn(1, 6, 16, dtype=torch.float64)
    _, state = layer(x)
    assert state.weights[0].requires_grad
    detached = state.detach()
    assert not any(t.requires_grad for t in detached.weights + detached.grads)
    assert len(detached.weights) == 1 and detached.packed  # [W1; b1]
    assert all(torch.equal(a, c) for a, c in zip(detached.tensors(), state.tensors()))
    y, _ = layer(x, detached)
    y.sum().backward()  # the graph of the first window is not needed any more
    assert layer.W1.grad is None or layer.W1.grad.abs().sum() == 0  # W1 reached only via the cut state


def test_empty_chunk_is_a_no_op():
    layer = make_layer("linear", b=4)
    with torch.no_grad():
        _, state = layer(torch.randn(1, 5, 16, dtype=torch.float64))
        y, same = layer(torch.zeros(1, 0, 16, dtype=torch.float64), state)
    assert y.shape == (1, 0, 16) and same is state
