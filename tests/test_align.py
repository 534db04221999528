import pytest
import torch

from pkt.core import align
from pkt.core.align import ShapeMismatch, max_sum_window, select_layers


def brute_force_window(sens, rows, cols):
    """The reference implementation's loop: every top-left corner, first maximum wins."""
    best, where = None, None
    R, C = sens.shape
    for r in range(R - rows + 1):
        for c in range(C - cols + 1):
            s = float(sens[r:r + rows, c:c + cols].double().sum())
            if best is None or s > best:
                best, where = s, (r, c)
    return where


@pytest.mark.parametrize("shape,win", [((9, 7), (4, 3)), ((5, 5), (5, 5)), ((6, 4), (1, 1)),
                                       ((8, 8), (8, 1)), ((1, 10), (1, 4)), ((12, 5), (3, 5))])
@pytest.mark.parametrize("seed", range(5))
def test_window_matches_brute_force_on_random(shape, win, seed):
    sens = torch.rand(shape, generator=torch.Generator().manual_seed(seed))
    assert max_sum_window(sens, *win) == brute_force_window(sens, *win)


@pytest.mark.parametrize("seed", range(10))
def test_window_ties_take_first_in_row_major_order(seed):
    g = torch.Generator().manual_seed(seed)
    sens = torch.randint(0, 2, (7, 8), generator=g).float()  # many equal window sums
    assert max_sum_window(sens, 3, 2) == brute_force_window(sens, 3, 2)
    assert max_sum_window(torch.ones(6, 6), 2, 3) == (0, 0)


def test_window_too_big_is_an_error():
    with pytest.raises(ShapeMismatch):
        max_sum_window(torch.rand(4, 4), 5, 2)


def test_select_layers_strategies():
    scores = [3.0, 9.0, 1.0, 9.0, 5.0]
    assert select_layers(scores, 3) == [1, 3, 4]
    assert select_layers(scores, 2) == [1, 3]
    assert select_layers([1.0, 1.0, 1.0], 2) == [0, 1]  # ties: earlier layers
    assert select_layers(scores, 2, "first") == [0, 1]
    assert select_layers(scores, 2, "last") == [3, 4]
    r = select_layers(scores, 3, "random", seed=7)
    assert r == sorted(r) and len(set(r)) == 3 and r == select_layers(scores, 3, "random", seed=7)
    with pytest.raises(ShapeMismatch, match="fewer than the student"):
        select_layers(scores, 6)
    with pytest.raises(ValueError, match="unknown layer selector"):
        select_layers(scores, 2, "best")


def test_rowcol_takes_top_mean_rows_and_cols_in_order():
    sens = torch.zeros(5, 6)
    sens[3] += 10
    sens[1] += 5
    sens[:, 4] += 7
    sens[:, 0] += 6
    rows, cols = align.reduce_indices(sens, 2, 2, "rowcol")
    assert rows.tolist() == [1, 3] and cols.tolist() == [0, 4]


def test_random_reducer_is_seeded():
    sens = torch.rand(10, 10)
    a = align.reduce_indices(sens, 4, 3, "random", seed=1)
    b = align.reduce_indices(sens, 4, 3, "random", seed=1)
    c = align.reduce_indices(sens, 4, 3, "random", seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_repeat_kv_matches_transformers():
    from transformers.models.llama.modeling_llama import repeat_kv as hf_repeat_kv

    kv_heads, heads, head_dim, hidden = 2, 6, 4, 5
    w = torch.randn(kv_heads * head_dim, hidden)
    x = torch.randn(hidden)
    # project, then split into heads the way attention does: [1, kv_heads, 1 token, head_dim]
    states = (w @ x).reshape(1, kv_heads, 1, head_dim)
    expected = hf_repeat_kv(states, heads // kv_heads).reshape(-1)
    assert torch.allclose(align.repeat_kv(w, kv_heads, heads) @ x, expected)
