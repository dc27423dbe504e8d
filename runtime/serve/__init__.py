"""The Open Inference Protocol (KServe v2 / Triton HTTP) service for a model repository.

::

    python -m runtime serve --repository model_repository --host 127.0.0.1 --port 8000

Architecture, one concern per module:

- :mod:`~runtime.serve.repository`: scan the folder, load each model version, refuse bad files;
- :mod:`~runtime.serve.session`: the onnxruntime session of one version (BF16, strings, CUDA);
- :mod:`~runtime.serve.spec`, :mod:`~runtime.serve.datatypes`: what the config declares;
- :mod:`~runtime.serve.body`, :mod:`~runtime.serve.codec`: request bodies, JSON and binary tensors;
- :mod:`~runtime.serve.batcher`: dynamic batching and the onnxruntime worker thread;
- :mod:`~runtime.serve.inference`: one infer request end to end;
- :mod:`~runtime.serve.stats`, :mod:`~runtime.serve.metrics`: Triton statistics, Prometheus;
- :mod:`~runtime.serve.errors`: typed errors and their HTTP statuses;
- :mod:`~runtime.serve.app`: routes and handlers; :mod:`~runtime.serve.cli`: the command;
- :mod:`~runtime.serve.server`: uvicorn in a background thread; :mod:`~runtime.serve.bench`.
"""

from runtime.serve.app import create_app

__all__ = ["create_app"]
