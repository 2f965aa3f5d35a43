"""Progress bars for the command line's long computations (``cnndiff differentiation``, ``summarize``, ``plot``).

An analysis of a large store runs for minutes with nothing else to show, so the commands draw a bar while they
compute:

- on a distributed :class:`~distributed.Client`: distributed's text progress bar (:func:`distributed.progress`), which
  follows every task of the graph on the scheduler;
- otherwise: dask's local :class:`~dask.diagnostics.ProgressBar` (threaded and synchronous schedulers).

Both look the same (``[#####   ] | 60% Completed |  2.1s``) and write to stderr, since stdout holds what the command
prints (tables, the files written). A bar is drawn only when stderr is a terminal (:func:`wanted`): in a CI log or a
file, a line redrawn with carriage returns is noise. On the top layer: it knows nothing of the analyses.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from distributed import Client

__all__ = ["compute", "wanted"]


def wanted(*, quiet: bool = False, stream: TextIO | None = None) -> bool:
    """Whether to draw a progress bar: not ``quiet`` (``--quiet``) and ``stream`` (default ``sys.stderr``, looked up
    when called) is a terminal."""
    if quiet:
        return False
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


def compute(*collections: Any, client: Client | None = None, progress: bool = False) -> tuple[Any, ...]:
    """Compute dask collections (arrays, xarray objects, DataTrees, ...) together and return their results, as
    ``dask.compute`` does, drawing a progress bar on stderr when ``progress``.

    With ``client``, the collections are computed on its cluster and followed with distributed's progress bar; a bar
    that cannot follow them (a scheduler that refuses the bar's connection) is given up silently, never the
    computation. Without a client, the collections are computed by dask's default scheduler with dask's local
    progress bar.
    """
    flat, rebuild = _without_trees(collections)
    if client is not None:
        futures = client.compute(flat)
        if progress:
            _distributed_bar(futures, client)
        return rebuild(client.gather(futures))
    import dask

    if not progress:
        return rebuild(dask.compute(*flat))
    from dask.diagnostics import ProgressBar

    with ProgressBar(out=sys.stderr):
        return rebuild(dask.compute(*flat))


def _without_trees(collections: Sequence[Any]) -> tuple[list[Any], Callable[[Sequence[Any]], tuple[Any, ...]]]:
    """The collections flattened to a list of leaves, every DataTree (at any depth of dicts, lists and tuples, as in
    ``cnndiff plot``'s figure inputs) replaced by its nodes' datasets, and the function that puts computed results
    back together. A DataTree is not a dask collection: ``client.compute`` hands it back uncomputed, and it would be
    computed later, wherever it is first used (after the cluster has closed, on the local threads)."""
    import xarray as xr

    leaves: list[Any] = []

    def flatten(obj: Any) -> Callable[[Sequence[Any]], Any]:
        if isinstance(obj, xr.DataTree):
            nodes = list(obj.subtree)
            paths, first = [node.path for node in nodes], len(leaves)
            leaves.extend(node.to_dataset(inherit=False) for node in nodes)
            return lambda results: xr.DataTree.from_dict(
                dict(zip(paths, results[first:first + len(paths)], strict=True)), name=obj.name)
        if isinstance(obj, dict):
            parts = {key: flatten(value) for key, value in obj.items()}
            return lambda results: {key: part(results) for key, part in parts.items()}
        if isinstance(obj, list | tuple):
            items = [flatten(value) for value in obj]
            kind = type(obj)
            return lambda results: kind(item(results) for item in items)
        index = len(leaves)
        leaves.append(obj)
        return lambda results: results[index]

    rebuilders = [flatten(obj) for obj in collections]

    def rebuild(results: Sequence[Any]) -> tuple[Any, ...]:
        return tuple(part(results) for part in rebuilders)

    return leaves, rebuild


def _distributed_bar(futures: list[Any], client: Client) -> None:
    """distributed's text bar for ``futures`` on stderr, until they finish or fail (the caller gathers them)."""
    from distributed import progress

    # the text bar writes to sys.stdout, looked up at every redraw; the command's own output waits for the results
    with contextlib.redirect_stdout(sys.stderr):
        try:
            # the client's own scheduler: a Client passed in need not be the default client
            progress(futures, notebook=False, scheduler=getattr(client.scheduler, "address", None))
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception:  # a bar is a convenience: the results are still gathered, and their errors reported
            sys.stderr.write("\n")
