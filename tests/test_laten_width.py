"""LaTen at the width it runs at: the translator's init and lr carried from the authors' width, and the size
of an update against the weights it lands on."""
import math

import torch

from pkt.core import laten


def test_at_width_keeps_the_authors_initial_output_and_step():
    p = laten.LatenParams(reference_width=(5120, 4096))
    assert p.at_width(5120, 4096) == (p.init_std, p.lr)
    assert laten.LatenParams().at_width(64, 32) == (1e-5, 3e-4)  # no reference: as given
    assert laten.LatenParams.from_dict(p.as_dict()) == p and "reference_width" not in laten.LatenParams().as_dict()

    def output(d_t, d_s, std):  # mean size of a real translator's first output on unit-norm vectors
        t = laten.Translator(("up",), d_t, d_s, seed=0, init_std=std)
        u = torch.randn(256, d_t, generator=torch.Generator().manual_seed(1))
        return float(t.net["up"](u / u.norm(dim=1, keepdim=True)).norm(dim=1).mean())

    # carried from (512, 384) (a stand-in for the authors' widths, kept small) to (64, 32): the same output size
    p = laten.LatenParams(reference_width=(512, 384))
    reference = output(512, 384, p.init_std)
    assert abs(output(64, 32, p.at_width(64, 32)[0]) / reference - 1) < 0.2
    assert output(64, 32, p.init_std) < reference / 4  # the constants as written: far smaller at the small width
    assert p.at_width(64, 32)[1] == p.lr * 8  # lr x fan-in ratio


def test_update_size_is_the_norm_ratio_per_module_type():
    g = torch.Generator().manual_seed(0)
    weights = {f"model.layers.{i}.mlp.{m}_proj.weight": torch.randn(8, 6, generator=g) for i in (0, 1)
               for m in ("up", "down")}
    delta = {}
    for i in (0, 1):
        for m, axis in (("up", 0), ("down", 1)):
            name = f"model.layers.{i}.mlp.{m}_proj.weight"
            delta[f"{name}.idx"] = torch.tensor([1, 4])
            delta[f"{name}.rows"] = torch.randn(2, 6 if axis == 0 else 8, generator=g)
            delta[f"{name}.axis"] = torch.tensor([axis])
    size = laten.update_size(delta, weights)
    for m in ("up", "down"):  # against a dense update on a copy of the weights
        names = [f"model.layers.{i}.mlp.{m}_proj.weight" for i in (0, 1)]
        dense = {n: torch.zeros_like(weights[n]) for n in names}
        for n in names:
            axis = int(delta[f"{n}.axis"][0])
            rows = delta[f"{n}.rows"]
            dense[n].index_add_(axis, delta[f"{n}.idx"], rows.T if axis else rows)
        expected = math.sqrt(sum(float(dense[n].pow(2).sum()) for n in names)
                             / sum(float(weights[n].pow(2).sum()) for n in names))
        assert math.isclose(size[m], expected, rel_tol=1e-6)  # float32 sums against float64 ones
