"""normport's benchmarks: run from the repository root (``make bench``), never installed.

- ``python -m benchmarks.layers``: normport layers vs torch.nn, eager;
- ``python -m benchmarks.export``: onnxruntime on normport's export vs torch.onnx's;
- ``python -m benchmarks.serve``: the service vs in-process onnxruntime;
- ``python -m benchmarks.kserve``: the service vs KServe's Python model server, side by side;
- ``python -m benchmarks.soak``: a minute of mixed load with every answer checked;
- ``python -m benchmarks.export_time``: ``export.to_onnx`` vs ``torch.onnx.export``;
- ``python -m benchmarks.startup``: server start to ready and idle RSS (cold and cached).

Shared: :mod:`benchmarks.cases` (the one case list: the layer cases of the layer and export
benchmarks, the networks the serve benchmark drives), :mod:`benchmarks.twins` (a case's
normport layer with random state and the twin it is compared with), :mod:`benchmarks.options`
(the options of the layer and export benchmarks), :mod:`benchmarks.timing` (interleaved
timing: every side in every round), :mod:`benchmarks.report` (the metadata every report starts
with, and the JSON writer), :mod:`benchmarks.loadgen` (the HTTP load generator).
"""
