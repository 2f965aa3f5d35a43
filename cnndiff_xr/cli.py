"""The ``cnndiff`` command: one entry point, one subcommand per job.

Exit codes: 0 success, 1 the job failed (bad image, store refused, weights unavailable, ...), 2 bad arguments
(also options the store cannot serve: a layer or set it lacks, a draw a reduced store does not hold), 130
interrupted (Ctrl-C). Errors go to stderr as one ``cnndiff <subcommand>: error: ...`` message, an interruption as one
``cnndiff <subcommand>: interrupted ...`` line saying what was saved, never a traceback, unless ``--debug``.
TensorFlow's and Dask's log lines are hidden unless ``--verbose``. ``differentiation``, ``summarize`` and ``plot``
draw a progress bar on stderr while they compute, only when stderr is a terminal and not with ``--quiet``
(:mod:`cnndiff_xr.progress`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from . import options
from .extraction.backends import UnknownLayerError, set_verbose
from .plot import MAX_IMAGES_PER_SET
from .progress import compute, wanted
from .sampling import REGISTRABLE_UNIT_TYPES, UnitDraws
from .validation import ParameterError

if TYPE_CHECKING:
    import xarray as xr

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a command ended by Ctrl-C


class UsageError(ValueError):
    """A command-line argument that cannot be used; the message names it."""


def _parse_sets(pairs: Sequence[str], frame_step: int) -> dict[str, Any]:
    """``NAME=SPEC`` pairs: SPEC is a glob, folder, image file, ``.npy`` movie (every ``frame_step``-th frame) or
    ``noise:N[:SEED]`` (N white-noise images)."""
    from .extraction import images

    sets: dict[str, Any] = {}
    for pair in pairs:
        name, sep, spec = pair.partition("=")
        if not sep or not name or not spec:
            raise UsageError(f"--set {pair!r}: expected NAME=GLOB_OR_DIR_OR_NPY (e.g. cats='photos/cats/*.jpg')")
        if name in sets:
            raise UsageError(f"--set {name!r} is given twice")
        if spec.startswith("noise:"):
            parts = spec.split(":")
            try:
                count, seed = int(parts[1]), int(parts[2]) if len(parts) > 2 else 0
            except (IndexError, ValueError):
                raise UsageError(f"--set {pair!r}: white noise is noise:N or noise:N:SEED") from None
            sets[name] = images.white_noise(count, seed=seed)
        elif spec.lower().endswith(".npy"):
            sets[name] = images.movie_frames(spec, step=frame_step)
        else:
            sets[name] = spec
    if not sets:
        raise UsageError("--set: give at least one image set as NAME=GLOB_OR_DIR_OR_NPY")
    return sets


def _parse_layers(value: str | None) -> str | list[str] | None:
    if value is None or value == "default":
        return None
    if value == "seed":
        return "seed"
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise UsageError(f"--layers {value!r}: give 'default', 'seed' or a comma-separated list of layer names")
    return names


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} must be at least {minimum}")
        return value
    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _cmd_extract(args: argparse.Namespace) -> int:
    from .extraction.cluster import check_address
    from .extraction.run import extract
    from .extraction.store import COMPRESSION_LEVELS

    lo, hi = COMPRESSION_LEVELS[args.compression]
    if not lo <= args.level <= hi:
        raise UsageError(f"--level {args.level}: with --compression {args.compression} use {lo}..{hi}")
    if args.scheduler is not None:
        try:
            check_address(args.scheduler, "--scheduler")
        except ValueError as err:
            raise UsageError(str(err)) from None
    from .extraction.backends import model_names

    if args.model.lower() not in model_names():
        raise UsageError(f"--model {args.model!r}: choose one of {model_names()}")
    weights = {"imagenet": "imagenet", "random": None}.get(args.weights, args.weights)
    if weights not in ("imagenet", None) and not os.path.isfile(weights):
        raise UsageError(f"--weights {args.weights!r}: use 'imagenet', 'random' or the path of a weights file")
    units = _unit_draws(args)
    sets = _parse_sets(args.set, args.frame_step)
    try:
        _, report = extract(
            sets, store=args.store, model=args.model, weights=weights, layers=_parse_layers(args.layers),
            dtype=args.dtype, client=args.scheduler, batch_size=args.batch_size, resize=args.resize, seed=args.seed,
            on_error=args.on_error, compression=args.compression, compression_level=args.level,
            n_workers=args.workers, progress=not args.quiet, return_report=True, break_lock=args.break_lock,
            units=units, filter_means=args.filter_means, force=args.force, repair=args.repair,
        )
    except UnknownLayerError as err:  # known only once the model is built, but a bad argument all the same
        raise UsageError(_unknown_layers_message(err, args.model)) from None
    print(f"{report.images_computed} images extracted in {report.seconds:.1f} s "
          f"({report.images_per_second:.2f} images/s); store complete: {args.store}")
    if report.skipped:
        print(f"{len(report.skipped)} unreadable image(s) skipped (listed in the store's skipped_images attribute)")
    return 0


#: ``cnndiff extract --units``: every unit (the full store), or the units of the draws registered by --n-units,
#: --resamples, --unit-type and --draw-seed (a reduced store)
UNITS_CHOICES = ("all", "draws")
_DRAW_OPTIONS = {"n_units": "--n-units", "resamples": "--resamples", "unit_type": "--unit-type",
                 "draw_seed": "--draw-seed"}


def _unit_draws(args: argparse.Namespace) -> UnitDraws | Literal["all"]:
    """``units=`` of :func:`cnndiff_xr.extract` from ``--units`` and the draw options (the draws' seed is --draw-seed,
    else --seed); the draw options without ``--units draws`` are refused rather than ignored."""
    given = [flag for name, flag in _DRAW_OPTIONS.items() if getattr(args, name) is not None]
    if args.units == "all":
        if given:
            raise UsageError(f"{', '.join(given)} register unit draws for a reduced store: add --units draws (without "
                             "it, every unit of every layer is kept)")
        return "all"
    defaults = UnitDraws()
    try:
        return UnitDraws(
            n_units=tuple(_int_list(args.n_units, "--n-units")) if args.n_units is not None else defaults.n_units,
            resamples=args.resamples if args.resamples is not None else defaults.resamples,
            seed=args.draw_seed if args.draw_seed is not None else args.seed,
            unit_type=args.unit_type if args.unit_type is not None else defaults.unit_type,
        )
    except ParameterError as err:
        raise UsageError(f"--units draws: {err}") from None


def _unknown_layers_message(err: UnknownLayerError, model: str) -> str:
    """``--layers`` names that ``--model`` lacks, with the closest names it has."""
    parts = []
    for name in err.unknown:
        close = err.closest.get(name) or []
        parts.append(f"{name!r}" + (f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""))
    names = err.available
    listing = ", ".join(names if len(names) <= 40 else [*names[:30], "...", *names[-5:]])
    return (f"--layers: {', '.join(parts)} {'is not a layer' if len(parts) == 1 else 'are not layers'} of --model "
            f"{model}; its {len(names)} layers: {listing}")


def _interruption_note(args: argparse.Namespace) -> str:
    """What an interrupted command leaves behind, for its one-line message."""
    if args.command != "extract":
        return "nothing more was written; rerun the same command to run it again"
    from .extraction import store

    try:
        done = store.completed(args.store)
    except Exception:  # no store yet (interrupted while images were checked or the model built), or unreadable
        return "nothing was written to the store; rerun the same command to start again"
    return (f"{int(done.sum())} of {done.size} images are saved in {args.store}; rerun the same command to extract "
            "the rest (it resumes)")


def _cmd_info(args: argparse.Namespace) -> int:
    from .extraction import store

    if args.verify:  # first: a damaged completion record would stop the summary below
        from .extraction.checksums import format_damage, verify_store

        damaged = verify_store(args.store, client=args.scheduler)
        print(format_damage(args.store, damaged))
        if damaged:
            return EXIT_FAILED
    summary = store.info(args.store)
    if args.json:
        print(json.dumps(summary, default=str, indent=2))
    else:
        print(store.format_info(summary))
    return 0


def _int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{option} {text!r}: expected comma-separated integers, e.g. 200,10000") from None
    if not values or any(v < 1 for v in values):
        raise UsageError(f"{option} {text!r}: expected positive integers, e.g. 200,10000")
    return values


def _names(text: str | None) -> list[str] | None:
    return None if text is None else [v.strip() for v in text.split(",") if v.strip()]


def _check_out(path: str, overwrite: bool) -> None:
    """Refuse to replace a cnndiff store, and anything else unless --overwrite: nothing computed may be lost."""
    from .extraction.store import is_store

    if is_store(path):
        raise UsageError(f"--out {path!r} is a cnndiff activation store; refusing to overwrite it")
    if os.path.exists(path) and not overwrite:
        raise UsageError(f"--out {path!r} exists; pass --overwrite to replace it")


def _write_dataset(ds: xr.Dataset, path: str) -> None:
    if path.endswith(".zarr"):
        ds.to_zarr(path, mode="w")
    elif path.endswith((".nc", ".nc4", ".netcdf")):
        ds.to_netcdf(path)
    else:
        raise UsageError(f"--out {path!r}: give a .nc (NetCDF) or .zarr path")


def _cmd_differentiation(args: argparse.Namespace) -> int:
    import xarray as xr

    from .analysis.differentiation import differentiation
    from .analysis.inference import bootstrap_differentiation
    from .analysis.results import normalise_by_reference, resample_summary
    from .extraction.cluster import get_client
    from .extraction.store import open_activations

    if args.n_units is not None:
        _int_list(args.n_units, "--n-units")  # a typo is reported before the store is opened
    _check_result_out(args)
    tree = open_activations(args.store)
    draws = _analysis_draws(args, tree.attrs)
    settings = {"norm": args.norm, "metric": args.metric, "reduction": args.reduction, "layers": _names(args.layers),
                "sets": _names(args.sets)}
    with _bad_input():
        d = differentiation(tree, **draws, **settings)
        if args.reference is not None:
            normalise_by_reference(d, reference=args.reference)  # validates the name before any work
        boot = bootstrap_differentiation(tree, **draws, **settings, n_boot=args.bootstrap) if args.bootstrap else None
    with get_client(args.scheduler, n_workers=args.workers) as client:
        d, *rest = compute(d, *([boot] if boot is not None else []), client=client,
                           progress=wanted(quiet=args.quiet))
    result = xr.Dataset({"differentiation": d})
    if args.reference is not None:
        result["normalised"] = normalise_by_reference(d, reference=args.reference)
    if rest:
        result["bootstrap"] = rest[0]
    result.attrs.update({**_provenance(tree.attrs, args.store), "reference": args.reference or ""})
    tables = {"differentiation": d}
    if args.reference is not None:
        tables[f"differentiation / {args.reference} (per draw)"] = result["normalised"]
    for title, values in tables.items():
        mean = (resample_summary(values)["mean"] if values.sizes.get("resample", 1) > 1
                else values.isel(resample=0, drop=True))
        for n in mean["n_units"].values:
            print(f"{title}, {n} units (mean over {d.sizes['resample']} resamples); rows: layers")
            print(mean.sel(n_units=n).to_pandas().T.to_string(float_format=lambda v: f"{v:.4f}"))
            print()
    # the CSV holds the per-draw numbers; the bootstrap (a value per resample of the images) only the result file
    _write_result(result, args, table=result.drop_vars("bootstrap", errors="ignore"))
    return 0


def _check_result_out(args: argparse.Namespace) -> None:
    """--out of an analysis command: a .nc or .zarr path, never a store, an existing one only with --overwrite
    (checked before any computing)."""
    if args.out and not args.out.endswith((".nc", ".nc4", ".netcdf", ".zarr")):
        raise UsageError(f"--out {args.out!r}: give a .nc (NetCDF) or .zarr path")
    if args.out:
        _check_out(args.out, args.overwrite)


def _write_result(result: xr.Dataset, args: argparse.Namespace, *, table: xr.Dataset | None = None) -> None:
    """Write an analysis result to --out, and ``table`` (default the result) as CSV beside it (or at --csv)."""
    if not args.out:
        return
    if args.out.endswith((".nc", ".nc4", ".netcdf")):
        result.attrs = _netcdf_attrs(result.attrs)
        for var in result.variables.values():
            var.attrs = _netcdf_attrs(var.attrs)
    _write_dataset(result, args.out)
    csv = args.csv or args.out.rsplit(".", 1)[0] + ".csv"
    (result if table is None else table).to_dataframe().to_csv(csv)
    print(f"wrote {args.out} and {csv}")


def _cmd_compare(args: argparse.Namespace) -> int:
    import xarray as xr

    from .analysis.inference import bootstrap_differentiation, compare_sets
    from .extraction.cluster import get_client
    from .extraction.store import open_activations

    sets = _names(args.sets) or []
    if len(sets) != 2:
        raise UsageError(f"--sets {args.sets!r}: give exactly two sets, e.g. --sets cats,random_photos")
    if args.n_units is not None:
        _int_list(args.n_units, "--n-units")
    _check_result_out(args)
    tree = open_activations(args.store)
    draws = _analysis_draws(args, tree.attrs)
    settings = {"norm": args.norm, "metric": args.metric, "reduction": args.reduction, "layers": _names(args.layers)}
    with _bad_input():
        c = compare_sets(tree, sets[0], sets[1], **draws, **settings, n_permutations=args.permutations)
        boot = (bootstrap_differentiation(tree, **draws, **settings, sets=sets, n_boot=args.bootstrap)
                if args.bootstrap else None)
    with get_client(args.scheduler, n_workers=args.workers) as client:
        c, *rest = compute(c, *([boot] if boot is not None else []), client=client, progress=wanted(quiet=args.quiet))
    result: xr.Dataset = c
    if rest:
        result["bootstrap"] = rest[0]
    result.attrs.update(_provenance(tree.attrs, args.store))
    a, b = sets
    for n in result["n_units"].values:
        row = result.sel(n_units=n)
        mean = row["differentiation"].mean("resample")
        table = xr.Dataset({a: mean.sel(set=a, drop=True), b: mean.sel(set=b, drop=True),
                            f"{a} - {b}": row["difference"], "p": row["p_value"], "p (Holm)": row["p_holm"]})
        print(f"differentiation of {a} and {b}, {n} units (means over {result.sizes['resample']} resamples), "
              f"{args.permutations} permutations; rows: layers")
        print(table.to_pandas().to_string(float_format=lambda v: f"{v:.4f}"))
        print()
    _write_result(result, args, table=result[["difference", "p_value", "p_holm"]])
    return 0


def _cmd_similarity(args: argparse.Namespace) -> int:
    import xarray as xr

    from .analysis.similarity import layer_similarity
    from .extraction.cluster import get_client
    from .extraction.store import open_activations

    _check_result_out(args)
    tree = open_activations(args.store)
    other = None if args.other is None else open_activations(args.other)
    n_units = args.n_units
    if n_units is None and args.method.startswith("rsa"):
        n_units = 10000
    with _bad_input():
        s = layer_similarity(tree, other, method=args.method, layers=_names(args.layers),
                             layers_other=_names(args.layers_other), sets=_names(args.sets), n_units=n_units,
                             unit_type=args.unit_type, seed=args.seed, resample=args.resample, norm=args.norm,
                             metric=args.metric)
    with get_client(args.scheduler, n_workers=args.workers) as client:
        (s,) = compute(s, client=client, progress=wanted(quiet=args.quiet))
    print(f"layer similarity ({args.method}); rows: layers of {args.store}, columns: layers of "
          f"{args.other or args.store}")
    print(s.to_pandas().to_string(float_format=lambda v: f"{v:.3f}"))
    result = xr.Dataset({"similarity": s})
    result.attrs.update({**_provenance(tree.attrs, args.store), "other": args.other or ""})
    _write_result(result, args)
    return 0


#: ``cnndiff differentiation``'s draws on a full store (on a reduced one: the store's registered draws)
DEFAULT_DRAWS = UnitDraws(n_units=(200, 10000), resamples=10, seed=0, unit_type="random")


def _analysis_draws(args: argparse.Namespace, store_attrs: Mapping[Any, Any]) -> dict[str, Any]:
    """``n_units``, ``resamples``, ``seed`` and ``unit_type`` of the analysis from --n-units, --resamples, --seed and
    --unit-type, each defaulting to the store's registered draws on a reduced store (printing one line saying so) and
    to :data:`DEFAULT_DRAWS` on a full one. (Not a :class:`UnitDraws`: a full store also takes "top" and "all".)"""
    from .schema import UNIT_DRAWS_ATTR

    registered = UnitDraws.from_attrs(store_attrs.get(UNIT_DRAWS_ATTR))
    defaults = (registered or DEFAULT_DRAWS).to_attrs()
    given = {"n_units": None if args.n_units is None else _int_list(args.n_units, "--n-units"),
             "resamples": args.resamples, "seed": args.seed, "unit_type": args.unit_type}
    chosen = {name: defaults[name] if value is None else value for name, value in given.items()}
    taken = [f"--{name.replace('_', '-')}" for name, value in given.items() if value is None]
    if registered is not None and taken:  # a note, on stderr: stdout holds the tables
        using = (f"n_units {chosen['n_units']}, resamples 0..{chosen['resamples'] - 1}, seed {chosen['seed']}, "
                 f"unit_type {chosen['unit_type']!r}")
        print(f"reduced store: using its registered draws, {using} (--n-units, --resamples, --seed and --unit-type "
              "may choose some of them)" if len(taken) == len(given) else
              f"reduced store: {', '.join(taken)} from its registered draws; using {using}", file=sys.stderr)
    return chosen


@contextlib.contextmanager
def _bad_input() -> Iterator[None]:
    """A :class:`~cnndiff_xr.validation.ParameterError` raised while an analysis checks its options (before any
    computing) is a bad argument: a layer or set the store lacks, a draw a reduced store does not hold, filter means
    of a reduced store extracted without them. It exits 2 with the analysis' message, as argparse's errors do."""
    try:
        yield
    except ParameterError as err:
        raise UsageError(str(err)) from None


def _netcdf_attrs(attrs: Mapping[Any, Any]) -> dict[Any, Any]:
    """NetCDF attributes are numbers, strings or flat arrays of them: booleans become ints, numpy strings str, and
    what nests (a dict, a list of dicts or lists) or is empty (None, []) becomes its JSON text."""
    def fix(value: Any) -> Any:
        if isinstance(value, (bool, np.bool_)):
            return int(value)
        if value is None or isinstance(value, Mapping) or (
                isinstance(value, (list, tuple)) and (not value or any(isinstance(v, (Mapping, list, tuple))
                                                                       for v in value))):
            return json.dumps(value, default=str)
        if isinstance(value, (list, tuple, np.ndarray)):
            return [fix(v) for v in value]
        return str(value) if isinstance(value, np.str_) else value
    return {k: fix(v) for k, v in attrs.items()}


def _provenance(store_attrs: Mapping[Any, Any], store: str) -> dict[str, Any]:
    """The store's provenance for a result written from it: its root attributes (model, weights and their digest,
    input size, resize, preprocessing, dtype, versions, created, skipped images, ...) and its path under ``store``.

    The format marker is left out, so that a result saved as .zarr is never taken for an activation store, and so
    is the store's layer list (a result holds the layers it was computed for)."""
    from .schema import FORMAT_ATTR, LAYERS_ATTR

    kept = {str(k): v for k, v in store_attrs.items() if k not in (FORMAT_ATTR, LAYERS_ATTR)}
    return {**kept, "store": store}


def _cmd_summarize(args: argparse.Namespace) -> int:
    from .analysis.summaries import filter_means
    from .extraction.cluster import get_client
    from .extraction.store import open_activations
    from .plot import layer_unit_name

    if not args.out.endswith((".nc", ".zarr")):
        raise UsageError(f"--out {args.out!r}: give a .nc (NetCDF) or .zarr path")
    _check_out(args.out, args.overwrite)
    tree = open_activations(args.store)
    with _bad_input():  # e.g. a reduced store extracted without --filter-means
        fm = filter_means(tree, zscore=args.zscore, layers=_names(args.layers), sets=_names(args.sets))
    with get_client(args.scheduler, n_workers=args.workers) as client:
        (fm,) = compute(fm, client=client, progress=wanted(quiet=args.quiet))
    # the store's provenance travels with the numbers (the root keeps filter_means' own layers, zscore and sets), and
    # each layer says what its filter axis counts, so that 'cnndiff plot' labels the heatmaps as from the store
    fm.attrs = {**_provenance(tree.attrs, args.store), **fm.attrs}
    for name in fm.children:
        fm[name].attrs = {**fm[name].attrs, "unit_name": layer_unit_name(tree, name)}
    if args.out.endswith(".zarr"):
        fm.to_zarr(args.out, mode="w")
    else:
        for node in fm.subtree:
            node.attrs = _netcdf_attrs(node.attrs)
            for var in node.variables.values():
                var.attrs = _netcdf_attrs(var.attrs)
        fm.to_netcdf(args.out)
    print(f"wrote filter means of {len(fm.children)} layers to {args.out}")
    return 0


def _filter_mean_layers(source: str) -> xr.DataTree | None:
    """The filter means in ``source`` (a ``cnndiff summarize`` output: one group per layer holding
    ``filter_mean``), or None when it holds none."""
    import xarray as xr

    try:
        tree = xr.open_datatree(source, engine="zarr") if source.endswith(".zarr") else xr.open_datatree(source)
    except Exception:  # not a tree either: the caller says what SOURCE should be
        return None
    if not any("filter_mean" in tree[name].data_vars for name in tree.children):
        return None
    return tree


def _draw_filter_means(fm: xr.DataTree, out: Path, layers: Sequence[str] | None,
                       max_images_per_set: int) -> list[Path]:
    """Filter-mean heatmaps (``filter_means/<layer>``) from a ``cnndiff summarize`` output, as ``cnndiff plot
    STORE`` draws them: at most ``max_images_per_set`` images per set, read from the file lazily (only those)."""
    from . import plot

    present = [name for name in fm.children if "filter_mean" in fm[name].data_vars]
    order = [str(v) for v in fm.attrs.get("layers", [])]  # network order, when the file says it
    present = sorted(present, key=lambda name: order.index(name) if name in order else len(order))
    if layers is not None:
        unknown = [name for name in layers if name not in present]
        if unknown:
            raise UsageError(f"--layers: {unknown} not in this file; it holds {present}")
        present = [name for name in present if name in layers]
    # the same colours as the store's figures: from every set in the file (all the store's sets, unless --sets)
    palette = plot.set_colours(np.concatenate([fm[name]["set"].values for name in present]))
    return plot.write_filter_mean_figures(fm, out, layers=present, note=plot.figure_note(fm.attrs),
                                          unit_names={name: fm[name].attrs.get("unit_name") for name in present},
                                          colours=palette, max_images_per_set=max_images_per_set)


def _cmd_plot(args: argparse.Namespace) -> int:
    import xarray as xr

    from . import plot
    from .extraction import store
    from .outputs import OutputExistsError, OutputFolderError, check_inside, place_files, staging_folder, taken

    layers = _names(args.layers)
    draw: Callable[[Path], list[Path]]
    if store.is_store(args.source):
        tree = store.open_activations(args.source)
        with _bad_input():  # lazy: a layer the store lacks is refused here, before any folder is made
            inputs = plot.store_figure_inputs(tree, layers=layers, rdm_units=args.rdm_units,
                                              max_images_per_set=args.max_images_per_set)
        _note_reduced_store_figures(tree, inputs, args.rdm_units)
        fm_layers = [] if inputs["filter_means"] is None else list(inputs["filter_means"].children)
        expected = [plot.filter_mean_file(name) for name in fm_layers]

        def draw(staging: Path) -> list[Path]:
            (computed,) = compute(inputs, progress=wanted(quiet=args.quiet))
            return plot.write_store_figures(tree, computed, staging, note=plot.figure_note(tree.attrs))
    else:
        if not os.path.exists(args.source):
            raise UsageError(f"SOURCE {args.source!r} does not exist")
        try:
            result = xr.open_zarr(args.source) if args.source.endswith(".zarr") else xr.open_dataset(args.source)
        except Exception as err:
            raise UsageError(f"SOURCE {args.source!r} is neither a cnndiff store nor a result of 'cnndiff "
                             f"differentiation', 'compare', 'similarity' or 'summarize' (.nc/.zarr): {err}") from None
        kind = next((name for name in ("p_value", "similarity", "differentiation") if name in result), None)
        fm = None if kind else _filter_mean_layers(args.source)
        if kind == "p_value":  # 'cnndiff compare'
            comparison = result.load()
            expected = ["comparison.png"]

            def draw(staging: Path) -> list[Path]:
                return plot.write_comparison_figure(comparison, staging, note=plot.figure_note(result.attrs))
        elif kind == "similarity":  # 'cnndiff similarity'
            similarity = result["similarity"].load()
            expected = ["similarity.png"]

            def draw(staging: Path) -> list[Path]:
                return plot.write_similarity_figure(similarity, staging, note=plot.figure_note(result.attrs))
        elif fm is not None:
            expected = [plot.filter_mean_file(name) for name in (layers or fm.children)]

            def draw(staging: Path) -> list[Path]:
                return _draw_filter_means(fm, staging, layers, args.max_images_per_set)
        else:
            if "differentiation" not in result:
                raise UsageError(f"SOURCE {args.source!r} has neither a 'differentiation' variable nor filter means; "
                                 "make one with 'cnndiff differentiation STORE --out FILE' or 'cnndiff summarize "
                                 "STORE --out FILE'")
            d = result["differentiation"].load()
            boot = result["bootstrap"].load() if "bootstrap" in result else None
            reference = args.reference or result.attrs.get("reference") or None
            if reference and reference not in d["set"].values:
                raise UsageError(f"--reference {reference!r} is not a set of this result: {list(d['set'].values)}")
            expected = ["differentiation.png"]

            def draw(staging: Path) -> list[Path]:
                return plot.write_result_figures(d, staging, reference=reference,
                                                 note=plot.figure_note(result.attrs), bootstrap=boot)
    # Refuse early, before any computing, when a figure this run surely writes is there already; the full check of
    # every name happens when the figures, drawn in a staging folder, are moved into place.
    clashes = [] if args.overwrite else taken(args.out, expected)
    if clashes:
        raise UsageError(f"--out {args.out!r} already holds {', '.join(map(str, clashes[:5]))}"
                         f"{' ...' if len(clashes) > 5 else ''} (from an earlier 'cnndiff plot'?); pass --overwrite "
                         "to replace the figures this command draws, or choose another --out")
    try:  # and when one would land outside --out (a folder of it that links elsewhere)
        for name in expected:
            check_inside(Path(args.out) / name, args.out, label=name, renamed_onto=True)
    except OutputFolderError as err:
        raise UsageError(f"--out {args.out!r}: {err}") from None
    with staging_folder(args.out) as staging:
        try:
            written = place_files(draw(staging), staging, args.out, overwrite=args.overwrite)
        except (OutputExistsError, OutputFolderError) as err:
            raise UsageError(f"--out {args.out!r}: {err}") from None
    for path in written:
        print(path)
    return 0


def _note_reduced_store_figures(tree: xr.DataTree, inputs: Mapping[str, Any], rdm_units: int) -> None:
    """Say on stderr (stdout lists the figures written) what a reduced store's figures use or leave out: the
    registered draw of the RDMs, and the filter-mean heatmaps of layers it cannot give (extracted without
    --filter-means). Those are left out rather than failing the command: the RDMs and the prediction heatmap of such a
    store are still worth drawing, and its filter means cannot be had without extracting again."""
    from . import plot
    from .schema import ACTIVATION, LAYERS_ATTR, UNIT_DIM, UNIT_DRAWS_ATTR

    if UnitDraws.from_attrs(tree.attrs.get(UNIT_DRAWS_ATTR)) is None:
        return
    draw = plot.rdm_draw(tree, rdm_units)
    why = ("--rdm-units" if draw.max_units == rdm_units else
           f"the largest registered not above --rdm-units {rdm_units}" if draw.max_units < rdm_units else
           f"none registered is at most --rdm-units {rdm_units}")
    print(f"reduced store: RDMs from its registered draw of {draw.max_units} units ({why}), seed {draw.seed}, "
          f"unit_type {draw.unit_type!r}, resample 0", file=sys.stderr)
    fm = inputs["filter_means"]
    missing = [name for name in inputs["rdms"] if fm is None or name not in fm.children]
    if missing:
        print(f"reduced store without filter means: no filter-mean heatmap of {', '.join(missing)} (only sampled "
              "units are stored); extract with --filter-means for them", file=sys.stderr)
    last = str(tree.attrs[LAYERS_ATTR][-1])
    if UNIT_DIM in tree[last].dataset[ACTIVATION].dims:  # write_store_figures draws it for a whole dense last layer
        print(f"reduced store: no prediction heatmap (layer {last!r} keeps only sampled units; register --n-units "
              "at least its size to keep it whole)", file=sys.stderr)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import PHOTOS, run_demo
    from .outputs import OutputFolderError

    if args.n_images > len(PHOTOS):
        raise UsageError(f"--n-images {args.n_images}: the demo has {len(PHOTOS)} bundled photographs per set at most")
    weights = {"auto": "auto", "imagenet": "imagenet", "random": "random"}[args.weights]
    try:
        report = run_demo(args.out, n_images=args.n_images, weights=weights, resamples=args.resamples,
                          n_workers=args.workers, progress=not args.quiet)
    except OutputFolderError as err:
        raise UsageError(f"--out {args.out!r}: {err}") from None
    print(report.read_text())
    print(f"report: {report}")
    return 0


def _draw_options(parser: argparse.ArgumentParser) -> None:
    """The unit draws and the distance of an analysis over several draws (differentiation, compare)."""
    parser.add_argument("--n-units", default=None, metavar="N[,N...]",
                        help="comma-separated unit counts (default 200,10000; on a reduced store: its registered "
                        "counts)")
    parser.add_argument("--resamples", type=_positive_int, default=None, metavar="K",
                        help="independent unit draws (default 10; on a reduced store: its registered resamples)")
    parser.add_argument("--unit-type", default=None, choices=options.UNIT_TYPES,
                        help="how units are drawn (default random; on a reduced store: its registered unit type). "
                        "top: the units with the highest mean over all analysed images (every set uses the same "
                        "units)")
    parser.add_argument("--seed", type=_non_negative_int, default=None, metavar="SEED",
                        help="seed of the unit draws (default 0; on a reduced store: its registered seed); also of "
                        "the bootstrap and permutation resamples")
    parser.add_argument("--norm", default="layer", choices=options.NORMS)
    parser.add_argument("--metric", default="euclidean", choices=options.METRICS)
    parser.add_argument("--reduction", default="median", choices=options.REDUCTIONS)
    parser.add_argument("--layers", default=None, help="comma-separated layers (default: all)")


def _result_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None, help="write the result here (.nc or .zarr) and a .csv beside it")
    parser.add_argument("--csv", default=None, help="CSV path (default: --out with .csv)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out (never a store)")


def _quiet_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="no progress bar (drawn on stderr only when it is a "
                        "terminal)")


def _cluster_options(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--scheduler", default=None, metavar="ADDRESS", help="an existing Dask scheduler address")
    where.add_argument("--workers", type=_positive_int, default=None, help="local worker processes (default: cores)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="cnndiff", description="Differentiation of CNN responses to image sets, "
                                     "on labelled Zarr stores and Dask.")
    parser.add_argument("--version", action="version", version=f"cnndiff_xr {__version__}")
    _global_options(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    ext = sub.add_parser("extract", help="run a CNN over image sets and store every layer's activations",
                         description="Run a Keras CNN over image sets and write every layer's activations to a "
                         "Zarr store on Dask. Rerunning the same command finishes only what is missing.")
    ext.add_argument("store", help="store path or fsspec URL (e.g. acts.zarr, s3://bucket/acts.zarr)")
    ext.add_argument("--set", action="append", default=[], metavar="NAME=SPEC",
                     help="an image set: a glob, folder, image file, .npy movie or noise:N[:SEED] (repeatable)")
    ext.add_argument("--model", default="vgg16", help="keras.applications model name (default vgg16)")
    ext.add_argument("--weights", default="imagenet", help="imagenet (default), random, or a weights file path")
    ext.add_argument("--layers", default=None, help="default (all but reshapes), seed (the seed's 21 VGG16 "
                     "layers) or a comma-separated list")
    ext.add_argument("--dtype", default="float32", choices=options.DTYPES)
    ext.add_argument("--batch-size", type=_positive_int, default=8, help="images per task and per chunk")
    ext.add_argument("--resize", default="nearest", choices=options.RESIZE_POLICIES)
    ext.add_argument("--frame-step", type=_positive_int, default=1, help="take every k-th frame of .npy movies")
    ext.add_argument("--seed", type=_non_negative_int, default=0,
                     help="seed of random weights (with --weights random) and, with --units draws, of the registered "
                     "draws unless --draw-seed is given (default 0)")
    ext.add_argument("--on-error", default="raise", choices=options.ON_ERROR,
                     help="unreadable images: stop before writing (raise) or skip and record them")
    ext.add_argument("--compression", default="lz4", choices=options.COMPRESSIONS,
                     help="lz4 (default: blosc/lz4 with bit shuffle, the fastest), zstd (smallest), blosc "
                     "(blosc/zstd with bit shuffle), none")
    ext.add_argument("--level", type=int, default=1, help="compression level")
    red = ext.add_argument_group(
        "reduced stores", "Keep, per layer, only the units of draws registered now (a store many times smaller); "
        "'cnndiff differentiation' uses these draws by default and refuses others.")
    red.add_argument("--units", default="all", choices=UNITS_CHOICES,
                     help="all (default): every unit of every layer; draws: only the units of the draws below "
                     "(layers no larger than the biggest --n-units are kept whole)")
    red.add_argument("--n-units", default=None, metavar="N[,N...]",
                     help="with --units draws: comma-separated unit counts to register (default 200,10000)")
    red.add_argument("--resamples", type=_positive_int, default=None, metavar="K",
                     help="with --units draws: draws per unit count (default 10)")
    red.add_argument("--unit-type", default=None, choices=REGISTRABLE_UNIT_TYPES,
                     help="with --units draws: how units are drawn (default random; 'top' depends on the data and "
                     "needs every unit)")
    red.add_argument("--draw-seed", type=_non_negative_int, default=None, metavar="SEED",
                     help="with --units draws: the draws' seed (default: --seed)")
    red.add_argument("--filter-means", action="store_true",
                     help="also store every filter's mean over (y, x) per image, for 'cnndiff summarize' and the "
                     "filter-mean figures (needed for them with --units draws; cheap)")
    _cluster_options(ext)
    ext.add_argument("--break-lock", action="store_true", help="remove the store's writer lock even if its holder "
                     "may be alive (only when that run is known to be dead)")
    ext.add_argument("--force", action="store_true", help="start even when the store's disk looks clearly too small "
                     "for the images (the space preflight); a run that fills the disk stops and resumes on a rerun")
    ext.add_argument("--repair", action="store_true", help="verify every chunk of the existing store first and "
                     "re-extract the batches holding damaged ones (see 'cnndiff info --verify')")
    ext.add_argument("--quiet", action="store_true", help="no size preflight or progress bar")
    ext.set_defaults(func=_cmd_extract)

    inf = sub.add_parser("info", help="describe a store", description="Layers, shapes, dtype, sizes on disk and "
                         "uncompressed, compression ratio, completion and provenance of a store.")
    inf.add_argument("store", help="store path or fsspec URL")
    inf.add_argument("--json", action="store_true", help="print JSON instead of text")
    inf.add_argument("--verify", action="store_true", help="read every chunk of every array and list the damaged "
                     "ones (checksum mismatch, file cut short, missing); exit status 1 if any")
    inf.add_argument("--scheduler", default=None, metavar="ADDRESS", help="with --verify: read the chunks on this "
                     "Dask scheduler's workers (default: threads here)")
    inf.set_defaults(func=_cmd_info)

    dif = sub.add_parser("differentiation", help="differentiation per layer and set",
                         description="Median (or mean) pairwise distance per layer and image set, for one or more "
                         "unit counts and resamples; prints a layer x set table and writes the result. On a "
                         "reduced store ('cnndiff extract --units draws') the draws default to those it registered.")
    dif.add_argument("store", help="store path or fsspec URL")
    _draw_options(dif)
    dif.add_argument("--reference", default=None, help="divide by this set's differentiation (e.g. white_noise)")
    dif.add_argument("--sets", default=None, help="comma-separated sets (default: all)")
    dif.add_argument("--bootstrap", type=_non_negative_int, default=0, metavar="N",
                     help="also N bootstrap resamples of each set's images (e.g. 1000): their intervals appear in "
                     "'cnndiff plot RESULT' (default 0: none)")
    _result_options(dif)
    _cluster_options(dif)
    _quiet_option(dif)
    dif.set_defaults(func=_cmd_differentiation)

    cmp_ = sub.add_parser("compare", help="is one set more differentiated than another? (a permutation test)",
                          description="Per layer, the difference in differentiation between two sets (mean over "
                          "unit redraws) and a two-sided permutation p-value (set labels permuted over both sets' "
                          "images, the same unit draws throughout), with a Holm correction over the layers. "
                          "'cnndiff plot RESULT' draws it.")
    cmp_.add_argument("store", help="store path or fsspec URL")
    cmp_.add_argument("--sets", required=True, metavar="A,B", help="the two sets, e.g. cats,random_photos")
    _draw_options(cmp_)
    cmp_.add_argument("--permutations", type=_positive_int, default=1000, metavar="N",
                      help="relabellings of the images (default 1000; the smallest p is 1/(N+1))")
    cmp_.add_argument("--bootstrap", type=_non_negative_int, default=0, metavar="N",
                      help="also N bootstrap resamples of each set's images, for intervals of the difference in the "
                      "figure (default 0: none)")
    _result_options(cmp_)
    _cluster_options(cmp_)
    _quiet_option(cmp_)
    cmp_.set_defaults(func=_cmd_compare)

    sim = sub.add_parser("similarity", help="how similar the layers are (CKA or RDM comparisons)",
                         description="A layer x layer matrix: linear CKA of the images' Gram matrices, or a "
                         "comparison of the layers' RDMs, between the layers of one store or, given OTHER (a second "
                         "store of the same images, e.g. another model), between the two. 'cnndiff plot RESULT' "
                         "draws it.")
    sim.add_argument("store", help="store path or fsspec URL")
    sim.add_argument("other", nargs="?", default=None, help="a second store of the same images (matched by id)")
    sim.add_argument("--method", default="cka", choices=options.SIMILARITY_METHODS,
                     help="cka (default), cka_unbiased, or an RDM comparison: rsa_spearman, rsa_kendall (tau-a), "
                     "rsa_cosine")
    sim.add_argument("--n-units", type=_positive_int, default=None, metavar="N",
                     help="units of one draw per layer (default: every unit for CKA, 10000 for the RDM methods; a "
                     "reduced store: one of its registered counts)")
    sim.add_argument("--unit-type", default="random", choices=options.UNIT_TYPES)
    sim.add_argument("--seed", type=_non_negative_int, default=0, metavar="SEED", help="seed of the unit draw")
    sim.add_argument("--resample", type=_non_negative_int, default=0, metavar="K", help="which draw (default 0)")
    sim.add_argument("--norm", default="layer", choices=options.NORMS, help="RDM methods: the RDMs' norm")
    sim.add_argument("--metric", default="euclidean", choices=options.METRICS, help="RDM methods: their distance")
    sim.add_argument("--layers", default=None, help="comma-separated layers of STORE (default: all)")
    sim.add_argument("--layers-other", default=None, help="comma-separated layers of OTHER (default: all)")
    sim.add_argument("--sets", default=None, help="comma-separated sets (default: all images)")
    _result_options(sim)
    _cluster_options(sim)
    _quiet_option(sim)
    sim.set_defaults(func=_cmd_similarity)

    summ = sub.add_parser("summarize", help="filter means per layer",
                          description="Mean over (y, x) of every filter for every image, per layer.")
    summ.add_argument("store", help="store path or fsspec URL")
    summ.add_argument("--out", required=True, help="output .nc or .zarr")
    summ.add_argument("--zscore", action="store_true", help="on layer-z-scored activations (the seed's heatmaps)")
    summ.add_argument("--overwrite", action="store_true", help="replace an existing --out (never a store)")
    summ.add_argument("--layers", default=None, help="comma-separated layers (default: all)")
    summ.add_argument("--sets", default=None, help="comma-separated sets (default: all)")
    _cluster_options(summ)
    _quiet_option(summ)
    summ.set_defaults(func=_cmd_summarize)

    plo = sub.add_parser("plot", help="figures from a store, a differentiation result or filter means",
                         description="From a differentiation result (.nc/.zarr): differentiation by layer, "
                         "reference-normalised, R2 by depth. From a store: filter-mean heatmaps, the prediction "
                         "heatmap, RDMs. From filter means ('cnndiff summarize'): their heatmaps. PNG and SVG. "
                         "Existing figures are never replaced unless --overwrite.")
    plo.add_argument("source", help="a differentiation result or filter means (.nc/.zarr), or a store")
    plo.add_argument("--out", required=True, help="output folder")
    plo.add_argument("--reference", default=None, help="reference set for the normalised figure")
    plo.add_argument("--layers", default=None, help="store figures: comma-separated layers (default: all)")
    plo.add_argument("--rdm-units", type=_positive_int, default=10000, help="units per RDM (default 10000)")
    plo.add_argument("--max-images-per-set", type=_positive_int, default=MAX_IMAGES_PER_SET, metavar="N",
                     help="store and filter-mean figures: draw at most N images per set (larger sets: a seeded "
                     f"sample, said in the titles; only those images are read; default {MAX_IMAGES_PER_SET})")
    plo.add_argument("--overwrite", action="store_true", help="replace figures of the same names in --out (other "
                     "files there are never touched)")
    _quiet_option(plo)
    plo.set_defaults(func=_cmd_plot)

    dem = sub.add_parser("demo", help="the offline end-to-end demo",
                         description="Builds three image sets from packaged photographs, white noise and one cat "
                         "photo, extracts VGG16 activations on a local Dask cluster, computes differentiation for "
                         "200 and 10,000 units and writes figures and a report (about 1 GB with the defaults).")
    dem.add_argument("--out", default="cnndiff-demo", help="output folder (default cnndiff-demo): new, empty, or "
                     "written by an earlier demo, whose files (listed in .cnndiff-demo.json) a rerun replaces; "
                     "never a folder holding other files")
    dem.add_argument("--n-images", type=_int_at_least(3), default=12, help="images per set (default 12, 3..18)")
    dem.add_argument("--weights", default="auto", choices=["auto", "imagenet", "random"],
                     help="auto (default): ImageNet if cached or downloadable, else random (said loudly)")
    dem.add_argument("--resamples", type=_positive_int, default=5)
    dem.add_argument("--workers", type=_positive_int, default=None, help="local worker processes (default: cores)")
    dem.add_argument("--quiet", action="store_true")
    dem.set_defaults(func=_cmd_demo)
    for command in sub.choices.values():  # also after the command: cnndiff extract ... --verbose
        _global_options(command, after_command=True)
    return parser


def _global_options(parser: argparse.ArgumentParser, *, after_command: bool = False) -> None:
    """--debug and --verbose, before the command or after it; given after it they must not reset the value given
    before it to a default (argparse would), hence no default there."""
    default: dict[str, Any] = {"default": argparse.SUPPRESS} if after_command else {}
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors", **default)
    parser.add_argument("--verbose", action="store_true", help="let TensorFlow and Dask print their log lines "
                        "(hidden by default), here and in the worker processes", **default)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose:
        set_verbose(True)  # before any framework is imported; the worker processes inherit it
    previous = None if args.verbose else _hide_dask_logs()
    interrupted = False
    try:
        return args.func(args)
    except KeyboardInterrupt:
        interrupted = True
        if args.debug:
            raise
        print(f"cnndiff {args.command}: interrupted (Ctrl-C); {_interruption_note(args)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except UsageError as err:
        if args.debug:
            raise
        print(f"cnndiff {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as err:
        if args.debug:
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"cnndiff {args.command}: error: {type(err).__name__}: {message}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        # after Ctrl-C the process ends while the cluster's event loop may still report, from its own thread, what
        # it could not send to a client already gone: the logs stay hidden to the end
        if previous is not None and not interrupted:
            logging.getLogger("distributed").setLevel(previous)


def _hide_dask_logs() -> int:
    """Hide distributed's log lines, CRITICAL ones included, as the CLI promises without --verbose (errors reach the
    user as the command's one-line message); returns the level to restore. Set after distributed is imported: its
    import sets its loggers' levels from its configuration."""
    import distributed  # noqa: F401  (its import configures the "distributed" loggers)

    logger = logging.getLogger("distributed")
    previous = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    return previous


if __name__ == "__main__":
    sys.exit(main())
