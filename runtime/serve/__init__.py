"""The Open Inference Protocol (KServe v2 / Triton HTTP) service for a model repository.

::

    python -m runtime serve --repository model_repository --host 127.0.0.1 --port 8000

Architecture, one concern per module:

- :mod:`~runtime.serve.repository`: scan the folder, load each model version, refuse bad files;
- :mod:`~runtime.serve.probe`, :mod:`~runtime.serve.calibrate`: each model is first loaded and
  run in a child process (a crash or hang there makes it UNAVAILABLE, not the server), which
  also measures its working memory (:mod:`~runtime.serve.memory`);
- :mod:`~runtime.serve.admission`: per-model and server-wide memory budgets;
- :mod:`~runtime.serve.session`: the onnxruntime session of one version (BF16, strings, CUDA);
- :mod:`~runtime.serve.spec`, :mod:`~runtime.serve.datatypes`: what the config declares;
- :mod:`~runtime.serve.body`, :mod:`~runtime.serve.codec`: request bodies, JSON and binary tensors;
- :mod:`~runtime.serve.batcher`: dynamic batching and the onnxruntime worker thread;
- :mod:`~runtime.serve.inference`: one infer request end to end;
- :mod:`~runtime.serve.stats`, :mod:`~runtime.serve.metrics`: Triton statistics, Prometheus;
- :mod:`~runtime.serve.errors`: typed errors and their HTTP statuses;
- :mod:`~runtime.serve.app`: routes and handlers; :mod:`~runtime.serve.cli`: the command;
- :mod:`~runtime.serve.server`: uvicorn in a background thread.

Importing this package is cheap: :func:`create_app` (the web stack) loads on first use, so the
probe child process (``python -m runtime.serve.probe``) starts without it.
"""

from __future__ import annotations

__all__ = ["create_app"]


def __getattr__(name: str):
    if name == "create_app":
        from normport.runtime.serve.app import create_app

        return create_app
    raise AttributeError(f"module 'runtime.serve' has no attribute {name!r}")
