"""The ``cnndiff`` command: one entry point, one subcommand per job.

Exit codes: 0 success, 1 the job failed (bad image, store refused, weights unavailable, ...), 2 bad arguments.
Errors go to stderr as one ``cnndiff <subcommand>: error: ...`` message, never a traceback, unless ``--debug``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

EXIT_FAILED = 1
EXIT_USAGE = 2


class UsageError(ValueError):
    """A command-line argument that cannot be used; the message names it."""


def _parse_sets(pairs: Sequence[str], frame_step: int) -> dict:
    """``NAME=SPEC`` pairs: SPEC is a glob, folder, image file, ``.npy`` movie (every ``frame_step``-th frame) or
    ``noise:N[:SEED]`` (N white-noise images)."""
    from . import images  # noqa: PLC0415

    sets: dict = {}
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


def _parse_layers(value: str | None):
    if value is None or value == "default":
        return None
    if value == "seed":
        return "seed"
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise UsageError(f"--layers {value!r}: give 'default', 'seed' or a comma-separated list of layer names")
    return names


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _cmd_extract(args) -> int:
    from .extract import extract  # noqa: PLC0415

    weights = {"imagenet": "imagenet", "random": None}.get(args.weights, args.weights)
    if weights not in ("imagenet", None) and not os.path.isfile(weights):
        raise UsageError(f"--weights {args.weights!r}: use 'imagenet', 'random' or the path of a weights file")
    sets = _parse_sets(args.set, args.frame_step)
    _, report = extract(
        sets, store=args.store, model=args.model, weights=weights, layers=_parse_layers(args.layers),
        dtype=args.dtype, client=args.scheduler, batch_size=args.batch_size, resize=args.resize, seed=args.seed,
        on_error=args.on_error, compression=args.compression, compression_level=args.level,
        n_workers=args.workers, progress=not args.quiet, return_report=True,
    )
    print(f"{report.images_computed} images extracted in {report.seconds:.1f} s "
          f"({report.images_per_second:.2f} images/s); store complete: {args.store}")
    if report.skipped:
        print(f"{len(report.skipped)} unreadable image(s) skipped (listed in the store's skipped_images attribute)")
    return 0


def _cmd_info(args) -> int:
    from . import store  # noqa: PLC0415

    summary = store.info(args.store)
    if args.json:
        print(json.dumps(summary, default=str, indent=2))
    else:
        print(store.format_info(summary))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__  # noqa: PLC0415

    parser = argparse.ArgumentParser(prog="cnndiff", description="Differentiation of CNN responses to image sets, "
                                     "on labelled Zarr stores and Dask.")
    parser.add_argument("--version", action="version", version=f"cnndiff_xr {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
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
    ext.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    ext.add_argument("--batch-size", type=_positive_int, default=8, help="images per task and per chunk")
    ext.add_argument("--resize", default="nearest", choices=["nearest", "bilinear", "center_crop"])
    ext.add_argument("--frame-step", type=_positive_int, default=1, help="take every k-th frame of .npy movies")
    ext.add_argument("--seed", type=int, default=0, help="seed of random weights (with --weights random)")
    ext.add_argument("--on-error", default="raise", choices=["raise", "skip"],
                     help="unreadable images: stop before writing (raise) or skip and record them")
    ext.add_argument("--compression", default="zstd", choices=["zstd", "blosc", "none"])
    ext.add_argument("--level", type=int, default=1, help="compression level")
    where = ext.add_mutually_exclusive_group()
    where.add_argument("--scheduler", default=None, metavar="ADDRESS", help="an existing Dask scheduler address")
    where.add_argument("--workers", type=_positive_int, default=None, help="local worker processes (default: cores)")
    ext.add_argument("--quiet", action="store_true", help="no size preflight or progress bar")
    ext.set_defaults(func=_cmd_extract)

    inf = sub.add_parser("info", help="describe a store", description="Layers, shapes, dtype, sizes on disk and "
                         "uncompressed, compression ratio, completion and provenance of a store.")
    inf.add_argument("store", help="store path or fsspec URL")
    inf.add_argument("--json", action="store_true", help="print JSON instead of text")
    inf.set_defaults(func=_cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as err:
        if args.debug:
            raise
        print(f"cnndiff {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, TypeError, KeyError, OSError, RuntimeError) as err:
        if args.debug:
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"cnndiff {args.command}: error: {message}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
