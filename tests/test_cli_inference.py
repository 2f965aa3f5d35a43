"""``cnndiff compare``, ``cnndiff similarity`` and ``cnndiff differentiation --bootstrap`` on a real store (the tiny
CNN's, written on a real 2-process cluster), run in this process against that cluster: the numbers written are the
library's, and ``cnndiff plot`` draws each result."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

import cnndiff_xr as cx
from cnndiff_xr.cli import main


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_compare_writes_the_library_numbers_and_plots_them(tiny_store, local_client, tmp_path, capsys):
    out = str(tmp_path / "cmp.nc")
    code, stdout, err = cli(capsys, "compare", tiny_store, "--sets", "photos,white_noise", "--n-units", "20",
                            "--resamples", "2", "--permutations", "40", "--bootstrap", "25", "--out", out,
                            "--scheduler", local_client.scheduler.address)
    assert code == 0, err
    assert "differentiation of photos and white_noise, 20 units" in stdout and "p (Holm)" in stdout, stdout
    got = xr.open_dataset(out)
    tree = cx.open_activations(tiny_store)
    want = cx.compare_sets(tree, "photos", "white_noise", n_units=[20], resamples=2, n_permutations=40).compute()
    for name in ("difference", "p_value", "p_holm", "null"):
        np.testing.assert_array_equal(got[name].values, want[name].values, err_msg=name)
    boot = cx.bootstrap_differentiation(tree, n_units=[20], resamples=2, n_boot=25, sets=["photos", "white_noise"])
    np.testing.assert_array_equal(got["bootstrap"].values, boot.values)
    assert (tmp_path / "cmp.csv").exists()
    code, stdout, err = cli(capsys, "plot", out, "--out", str(tmp_path / "figs"))
    assert code == 0, err
    assert (tmp_path / "figs" / "comparison.png").stat().st_size > 10_000


def test_compare_needs_two_sets(tiny_store, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compare", tiny_store])  # --sets is required
    assert exc.value.code == 2
    code, _, err = cli(capsys, "compare", tiny_store, "--sets", "photos")
    assert code == 2 and "give exactly two sets" in err, err
    code, _, err = cli(capsys, "compare", tiny_store, "--sets", "photos,cats")
    assert code == 2 and "cats" in err, err  # a set the store lacks, named before any work


def test_similarity_writes_the_library_numbers_and_plots_them(tiny_store, local_client, tmp_path, capsys):
    address = local_client.scheduler.address
    tree = cx.open_activations(tiny_store)
    for method, extra in (("cka", []), ("rsa_spearman", ["--n-units", "30"])):
        out = str(tmp_path / f"{method}.nc")
        code, stdout, err = cli(capsys, "similarity", tiny_store, "--method", method, *extra, "--out", out,
                                "--scheduler", address)
        assert code == 0, err
        assert f"layer similarity ({method})" in stdout, stdout
        want = cx.layer_similarity(tree, method=method, n_units=30 if extra else None).compute()
        np.testing.assert_array_equal(xr.open_dataset(out)["similarity"].values, want.values)
        code, _, err = cli(capsys, "plot", out, "--out", str(tmp_path / f"figs_{method}"))
        assert code == 0, err
        assert (tmp_path / f"figs_{method}" / "similarity.png").stat().st_size > 10_000


def test_differentiation_with_bootstrap_intervals(tiny_store, local_client, tmp_path, capsys):
    out = str(tmp_path / "d.nc")
    code, _, err = cli(capsys, "differentiation", tiny_store, "--n-units", "20", "--resamples", "2", "--bootstrap",
                       "15", "--out", out, "--scheduler", local_client.scheduler.address)
    assert code == 0, err
    got = xr.open_dataset(out)
    tree = cx.open_activations(tiny_store)
    want = cx.bootstrap_differentiation(tree, n_units=[20], resamples=2, n_boot=15)
    np.testing.assert_array_equal(got["bootstrap"].values, want.values)
    assert "bootstrap" not in open(tmp_path / "d.csv").readline()  # the CSV keeps the per-draw numbers
    code, _, err = cli(capsys, "plot", out, "--out", str(tmp_path / "figs"))
    assert code == 0, err
    assert (tmp_path / "figs" / "differentiation.png").exists()
