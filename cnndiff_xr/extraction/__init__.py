"""The extraction half: images -> model -> Zarr store, on Dask.

Modules, in the order data flows through them (``docs/architecture.md`` has the picture):

* :mod:`~cnndiff_xr.extraction.images` -- image sources and references (the ``ImageRef`` protocol), decoding to RGB
  uint8, resizing, the image table of a store;
* :mod:`~cnndiff_xr.extraction.backends` -- the model backend protocols and their discovery; ``backends.keras`` is
  the Keras implementation (the only module that imports Keras or TensorFlow);
* :mod:`~cnndiff_xr.extraction.config` -- ``ExtractionConfig``: every setting of a run, validated once; the
  provenance and identity of a store;
* :mod:`~cnndiff_xr.extraction.store` -- the store layout (``cnndiff_xr.schema``) written and read;
* :mod:`~cnndiff_xr.extraction.lock` -- the writer lock that keeps two runs off one store;
* :mod:`~cnndiff_xr.extraction.cluster` -- the embedded LocalCluster, scheduler addresses, the per-worker model;
* :mod:`~cnndiff_xr.extraction.run` -- ``extract``: the batches as Dask tasks, resume, the report.

This half imports only the bottom layer (``validation``, ``schema``, ``options``), never the analysis.
"""
