"""The model repository: scan ``<root>/<name>/{config.pbtxt, <version>/model.onnx}``, load
every version, keep the ones that fail as UNAVAILABLE with their reason.

Model names and versions come only from listing ``root``; a request's path is only ever a key
into the dicts built here, never part of a filesystem path.  A model file is refused when it
resolves outside its model folder (a symlink), does not parse, has ONNX external data whose
location resolves outside the model folder, or does not load in onnxruntime / agree with its
config.  A model that fails does not stop the others.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import onnx
from google.protobuf.message import DecodeError

from export.repository import CONFIG_NAME, MODEL_NAME, PLATFORM, read_config
from runtime.serve.batcher import Batcher, Execution
from runtime.serve.errors import ModelNotFound, ModelUnavailable
from runtime.serve.metrics import Metrics, ModelMetrics
from runtime.serve.session import Session
from runtime.serve.spec import ModelSpec
from runtime.serve.stats import ModelStats

__all__ = ["READY", "UNAVAILABLE", "ModelVersion", "Repository"]

log = logging.getLogger(__name__)

READY = "READY"
UNAVAILABLE = "UNAVAILABLE"
_VERSION = re.compile(r"[0-9]{1,18}")
_MAX_REASON = 500


@dataclass
class ModelVersion:
    """One version folder: READY with a session and batcher, or UNAVAILABLE with a reason."""

    name: str
    version: str
    state: str
    reason: str = ""
    spec: ModelSpec | None = None
    session: Session | None = None
    batcher: Batcher | None = None
    stats: ModelStats | None = None
    metrics: ModelMetrics | None = None

    @property
    def ready(self) -> bool:
        return self.state == READY

    def index_entry(self) -> dict[str, str]:
        return {
            "name": self.name,
            "version": self.version,
            "state": self.state,
            "reason": self.reason,
        }


class Repository:
    """Every model of ``root``, loaded at construction.

    Args:
        root: the repository folder.
        threads: onnxruntime intra-op threads per session (0: onnxruntime's default).
        batching: False turns dynamic batching off for every model.
        providers: execution providers (default: CUDA when available, else CPU).
        metrics: where the per-model metrics live.

    Raises:
        ValueError: ``root`` is not a folder.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        threads: int = 0,
        batching: bool = True,
        providers: Sequence[str] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise ValueError(f"model repository {os.fspath(root)!r} is not a folder")
        self._threads = threads
        self._batching = batching
        self._providers = providers
        self._metrics = metrics or Metrics()
        # name -> version -> ModelVersion, versions in ascending numeric order
        self.models: dict[str, dict[str, ModelVersion]] = {}
        for folder in sorted(p for p in self.root.iterdir() if not p.name.startswith(".")):
            if folder.is_dir():
                self.models[folder.name] = self._load_model(folder)

    # -- loading ---------------------------------------------------------------------------

    def _load_model(self, folder: Path) -> dict[str, ModelVersion]:
        name = folder.name
        try:
            config = _read_config(folder)
            versions = sorted(
                (p.name for p in folder.iterdir() if p.is_dir() and _VERSION.fullmatch(p.name)),
                key=int,
            )
            if not versions:
                raise ValueError("no version folder (e.g. '1/') holding model.onnx")
        except (OSError, ValueError) as e:
            return {"": self._unavailable(name, "", self._reason(e))}
        return {v: self._load_version(folder, config, v) for v in versions}

    def _load_version(self, folder: Path, config: dict[str, Any], version: str) -> ModelVersion:
        name = folder.name
        try:
            spec = ModelSpec.from_config(config, version)
            if not self._batching:
                spec = replace(spec, batching=None)
            path = _model_file(folder / version, folder)
            _check_external_data(path, folder)
            session = Session(path, spec, threads=self._threads, providers=self._providers)
        except Exception as e:  # anything a bad file makes onnx/onnxruntime raise
            return self._unavailable(name, version, self._reason(e))
        stats = ModelStats(name, version)
        metrics = self._metrics.model(name, version, ready=True)

        def on_execution(execution: Execution) -> None:
            stats.record_execution(execution)
            metrics.record_execution(execution)

        batcher = Batcher(
            session,
            f"{name}:{version}",
            max_batch_size=spec.max_batch_size,
            batching=spec.batching,
            on_execution=on_execution,
        )
        log.info("loaded %s version %s on %s", name, version, session.providers[0])
        return ModelVersion(name, version, READY, "", spec, session, batcher, stats, metrics)

    def _unavailable(self, name: str, version: str, reason: str) -> ModelVersion:
        log.warning("model %s version %s is unavailable: %s", name, version or "-", reason)
        self._metrics.model(name, version, ready=False)
        return ModelVersion(name, version, UNAVAILABLE, reason)

    def _reason(self, error: Exception) -> str:
        """One line, without the server's absolute paths."""
        text = str(error).strip().splitlines()[0] if str(error).strip() else ""
        text = text.replace(f"{self.root}{os.sep}", "").replace(str(self.root), ".")
        return f"{type(error).__name__}: {text}"[:_MAX_REASON]

    # -- lookups ---------------------------------------------------------------------------

    def versions(self) -> Iterator[ModelVersion]:
        for versions in self.models.values():
            yield from versions.values()

    def resolve(self, name: str, version: str | None = None) -> ModelVersion:
        """The version to serve: ``version``, or the newest READY one when None.

        Raises:
            ModelNotFound: no such model, or no such version of it.
            ModelUnavailable: it exists but is not loaded (the message gives the reason).
        """
        versions = self.models.get(name)
        if versions is None:
            raise ModelNotFound(f"unknown model '{_clip(name)}'")
        if version is None:
            ready = [v for v in versions.values() if v.ready]
            if ready:
                return ready[-1]
            latest = list(versions.values())[-1]
            raise ModelUnavailable(f"model '{name}' is not available: {latest.reason}")
        found = versions.get(version)
        if found is None:
            raise ModelNotFound(f"model '{name}' has no version '{_clip(version)}'")
        if not found.ready:
            raise ModelUnavailable(
                f"model '{name}' version {version} is not available: {found.reason}"
            )
        return found

    def ready_versions(self, name: str) -> list[str]:
        return [v.version for v in self.models.get(name, {}).values() if v.ready]

    def index(self, ready_only: bool = False) -> list[dict[str, str]]:
        """The repository index: one entry per model version (per model when its config fails)."""
        return [v.index_entry() for v in self.versions() if v.ready or not ready_only]

    @property
    def all_ready(self) -> bool:
        return all(v.ready for v in self.versions())

    async def close(self) -> None:
        """Finish queued requests and stop every worker thread."""
        for version in self.versions():
            if version.batcher is not None:
                await version.batcher.close()


def _clip(text: str, limit: int = 100) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _read_config(folder: Path) -> dict[str, Any]:
    if not (folder / CONFIG_NAME).is_file():
        raise ValueError(f"no {CONFIG_NAME}")
    config = read_config(folder / CONFIG_NAME)
    if config["name"] != folder.name:
        raise ValueError(f"config name {config['name']!r} differs from the folder name")
    if config["platform"] != PLATFORM:
        raise ValueError(f"platform {config['platform']!r} is not {PLATFORM!r}")
    return config


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def _model_file(version_folder: Path, model_folder: Path) -> Path:
    """``<v>/model.onnx``, or ``<v>/model.onnx/model.onnx`` (Triton's external-data layout)."""
    path = version_folder / MODEL_NAME
    if path.is_dir():
        path = path / MODEL_NAME
    if not path.is_file():
        raise ValueError(f"no {MODEL_NAME} in version folder {version_folder.name}")
    if not _inside(path, model_folder):
        raise ValueError(f"{MODEL_NAME} resolves outside the model folder")
    return path


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of ``graph`` and its subgraphs: initializers and tensor attributes."""
    yield from graph.initializer
    yield from (s.values for s in graph.sparse_initializer)
    for node in graph.node:
        yield from _attribute_tensors(node)


def _attribute_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        if attr.HasField("g"):
            yield from _tensors(attr.g)
        for graph in attr.graphs:
            yield from _tensors(graph)


def _check_external_data(path: Path, model_folder: Path) -> None:
    """Parse ``path`` (without its external data) and refuse external data outside the folder.

    Raises:
        ValueError: the file does not parse (corrupt, truncated), or an external data location
            resolves outside ``model_folder``.
    """
    try:
        model = onnx.load(os.fspath(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError) as e:
        raise ValueError(f"corrupt or truncated model file: {e}") from None
    if not model.graph.node and not model.graph.output:
        raise ValueError("corrupt or truncated model file: no graph")
    tensors = [*_tensors(model.graph)]
    for function in model.functions:
        for node in function.node:
            tensors.extend(_attribute_tensors(node))
    for tensor in tensors:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        if not location or not _inside(path.parent / location, model_folder):
            raise ValueError(
                f"external data {location!r} of tensor {tensor.name!r} resolves outside "
                "the model folder"
            )
