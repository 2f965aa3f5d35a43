"""Hand-built dask graphs: :class:`GraphBuilder` and the helpers the analyses share to build them.

The analyses emit thousands of small tasks (a task per pair of row blocks, per draw table, per chunk); building
them as plain tuple tasks with explicit keys is orders of magnitude cheaper than ``dask.delayed``. A graph's name is
a ``tokenize`` of everything that changes its result (the caller's job), and every key is ``(stage-name, *index)``,
so identical calls share keys and different calls never collide.

Task arguments follow one rule: graph keys travel as task arguments (dask finds keys only in tuples, lists and
dicts), the static data of a task in a small frozen dataclass (dask leaves those untouched).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import dask.array as da
import numpy as np
from dask.core import flatten
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph
from dask.typing import Key

__all__ = ["GraphBuilder", "Key", "block_keys", "sum_parts"]


class GraphBuilder:
    """A low-level dask graph under construction: tuple tasks with explicit, deterministic keys.

    Intermediate tasks are keyed ``(f"{stage}-{name}", *index)``, output chunks ``(name, *index)``.
    """

    def __init__(self, name: str):
        self.name = name
        self.tasks: dict[Key, Any] = {}
        # the collections whose keys the tasks use (dask types them DaskCollection, which its Array does not satisfy)
        self.dependencies: list[Any] = []

    def add(self, stage: str, index: tuple[int, ...], func: Callable[..., Any], *args: Any) -> Key:
        """Add the task ``func(*args)`` of a stage; returns its key."""
        key: tuple[str | int, ...] = (f"{stage}-{self.name}", *index)
        self.tasks[key] = (func, *args)
        return key

    def output(self, index: tuple[int, ...], func: Callable[..., Any], *args: Any) -> Key:
        """Add the task computing output chunk ``index``."""
        key: tuple[str | int, ...] = (self.name, *index)
        self.tasks[key] = (func, *args)
        return key

    def depend(self, collection: da.Array | Delayed) -> None:
        """Make the graph include ``collection``'s graph (a dask collection whose keys the tasks use)."""
        self.dependencies.append(collection)

    def reduce(self, stage: str, index: tuple[int, ...], keys: list[Key], combine: Callable[[list[Any]], Any],
               fan_in: int = 8) -> Key:
        """Combine many partial results in a tree with bounded fan-in; returns the final key."""
        if not keys:
            raise ValueError("nothing to reduce")
        level = 0
        while len(keys) > 1:
            keys = [
                self.add(stage, (*index, level, i), combine, keys[j : j + fan_in]) if len(keys[j : j + fan_in]) > 1
                else keys[j]
                for i, j in enumerate(range(0, len(keys), fan_in))
            ]
            level += 1
        return keys[0]

    def array(self, chunks: tuple[tuple[int, ...], ...], dtype: type[np.generic]) -> da.Array:
        """The dask array of the output chunks added so far."""
        graph = HighLevelGraph.from_collections(self.name, self.tasks, dependencies=self.dependencies)
        return da.Array(graph, self.name, chunks=chunks, dtype=dtype)


def sum_parts(parts: Sequence[np.ndarray]) -> np.ndarray:
    """Sum numpy arrays elementwise, left to right."""
    out = parts[0]
    for p in parts[1:]:
        out = out + p
    return out


def block_keys(array: da.Array) -> list[Key]:
    """Keys of the blocks of an array chunked along its first axis only, in order."""
    return list(flatten(array.__dask_keys__()))
