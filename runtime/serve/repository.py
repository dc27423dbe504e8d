"""The model repository: scan ``<root>/<name>/{config.pbtxt, <version>/model.onnx}``, load
every version, keep the ones that fail as UNAVAILABLE with their reason.

Model names and versions come only from listing ``root``; a request's path is only ever a key
into the dicts built here, never part of a filesystem path.  Names starting with ``.`` are
skipped.  Symlinks are followed, but what they lead to must stay inside the repository:

- a model folder must resolve inside ``root``; one that resolves outside (a symlink to
  elsewhere) is listed as UNAVAILABLE, version ``""``, and nothing in it is read;
- ``config.pbtxt`` and every version folder must resolve inside their model folder;
- ``model.onnx`` and its ONNX external data must resolve inside the model folder.

Version folders are named as Triton names them, a positive integer without a leading zero
(``[1-9][0-9]{0,17}``).  Any other folder (``0``, ``01``, ``v2``) is ignored and logged once; it
shows in :meth:`Repository.index` as UNAVAILABLE with the reason :data:`IGNORED` but is no
version: requesting it is a 404, like any version that does not exist.

A model file is refused when it does not parse, is a training graph (the whole reason, never
cut: :mod:`runtime.serve.train_graph`), or does not load in onnxruntime / agree with its
config.  A model that fails does not stop the others.  Every version is first loaded and run in
a child process (:mod:`runtime.serve.probe`, all of them in one pass before any is loaded
here): one that crashes or hangs onnxruntime there is UNAVAILABLE with the signal or the time,
and the others serve.  The probe also measures the model's memory, from which each READY
version gets its memory budget (:mod:`runtime.serve.admission`): the config's
``normport.memory_budget`` parameter (a size such as ``"2GiB"``), else the server's default.

Reasons never quote a file's content (a config that does not parse is reported by line, column
and kind of token) nor the server's absolute paths.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from normport.export import triton_config
from normport.export.triton_config import (
    CONFIG_NAME,
    MEMORY_BUDGET,
    MODEL_NAME,
    PLATFORM,
    ModelConfig,
)
from normport.runtime.messages import first_line
from normport.runtime.serve.admission import Budget, parse_bytes
from normport.runtime.serve.batcher import Batcher, Execution
from normport.runtime.serve.decoder import RequestDecoder
from normport.runtime.serve.errors import ModelNotFound, ModelUnavailable
from normport.runtime.serve.memory import MemoryProfile, machine_memory
from normport.runtime.serve.metrics import Metrics, ModelMetrics
from normport.runtime.serve.probe import DEFAULT_TIMEOUT_S, Job, Probed, ProbeFailed, probe_all
from normport.runtime.serve.probe_cache import ProbeCache
from normport.runtime.serve.session import Session
from normport.runtime.serve.spec import ModelSpec
from normport.runtime.serve.stats import ModelStats
from normport.runtime.serve.train_graph import TrainGraphError, check_not_train

__all__ = [
    "IGNORED",
    "READY",
    "UNAVAILABLE",
    "ModelVersion",
    "Repository",
    "default_memory_budget",
]

log = logging.getLogger(__name__)

READY = "READY"
UNAVAILABLE = "UNAVAILABLE"
IGNORED = "ignored: version folder names are positive integers without a leading zero"
_VERSION = re.compile(r"[1-9][0-9]{0,17}")  # Triton's rule; 18 digits stay below 2**63
_MAX_REASON = 500
_MAX_CONFIG_BYTES = 1 << 20  # configs are a few hundred bytes; this bounds a stray huge file


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
    profile: MemoryProfile | None = None
    budget: Budget | None = None
    decoder: RequestDecoder | None = None

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
        model_memory_budget: bytes, each model's budget unless its config sets one (default
            :func:`default_memory_budget`).
        load_timeout: seconds each model may take to load and calibrate in the probe.
        probe_cache: a folder of kept probe results (:mod:`runtime.serve.probe_cache`): a
            model probed before with the same bytes and settings loads without a probe.
            None: every model is probed.

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
        model_memory_budget: int | None = None,
        load_timeout: float = DEFAULT_TIMEOUT_S,
        probe_cache: str | os.PathLike | None = None,
    ) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise ValueError(f"model repository {os.fspath(root)!r} is not a folder")
        self._threads = threads
        self._batching = batching
        self._providers = providers
        self._metrics = metrics or Metrics()
        self._model_memory_budget = model_memory_budget or default_memory_budget()
        # name -> version -> ModelVersion, versions in ascending numeric order
        self.models: dict[str, dict[str, ModelVersion]] = {}
        # name -> the folders of that model that are not versions (only listed in the index)
        self.ignored: dict[str, list[ModelVersion]] = {}
        pending: list[_Pending] = []
        for folder in sorted(p for p in self.root.iterdir() if not p.name.startswith(".")):
            if folder.is_dir():
                self.models[folder.name] = self._scan_model(folder, pending)
        cache = None if probe_cache is None else ProbeCache(probe_cache)
        probed = _probe(pending, load_timeout, cache)
        for p, result in zip(pending, probed, strict=True):
            self.models[p.spec.name][p.spec.version] = self._load_version(p, result)

    # -- loading ---------------------------------------------------------------------------

    def _scan_model(self, folder: Path, pending: list[_Pending]) -> dict[str, ModelVersion]:
        """The versions of ``folder``: UNAVAILABLE ones now, the others appended to ``pending``
        (placeholders in the dict, replaced once probed)."""
        name = folder.name
        try:
            if not _inside(folder, self.root) or _resolve(folder) == self.root:
                raise ValueError("model folder resolves outside the repository")
            names = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
            folders = [n for n in names if (folder / n).is_dir()]
            versions = sorted((n for n in folders if _VERSION.fullmatch(n)), key=int)
            self.ignored[name] = [
                self._ignore(name, n) for n in folders if not _VERSION.fullmatch(n)
            ]
            config = _read_config(folder)
            if not versions:
                raise ValueError("no version folder (e.g. '1/') holding model.onnx")
        except (OSError, ValueError) as e:
            return {"": self._unavailable(name, "", self._reason(e))}
        return {v: self._prepare(folder, config, v, pending) for v in versions}

    def _ignore(self, name: str, folder_name: str) -> ModelVersion:
        log.warning("model %s: folder %r is not a version folder, ignored", name, folder_name)
        return ModelVersion(name, folder_name, UNAVAILABLE, IGNORED)

    def _prepare(
        self, folder: Path, config: ModelConfig, version: str, pending: list[_Pending]
    ) -> ModelVersion:
        """Check what can be checked without onnxruntime; queue the version for its probe."""
        name = folder.name
        try:
            spec = ModelSpec.from_config(config, version)
            if not self._batching:
                spec = replace(spec, batching=None)
            path = _model_file(folder / version, folder)
            _check_external_data(path, folder)
            limit = _memory_budget(config, self._model_memory_budget)
        except Exception as e:  # anything a bad file makes onnx raise
            return self._unavailable(name, version, self._reason(e))
        providers = None if self._providers is None else tuple(self._providers)
        job = Job(os.fspath(path), config, version, self._threads, providers)
        pending.append(_Pending(spec, path, limit, job))
        return ModelVersion(name, version, UNAVAILABLE, "loading")

    def _load_version(self, pending: _Pending, probed: Probed | ProbeFailed) -> ModelVersion:
        spec, name, version = pending.spec, pending.spec.name, pending.spec.version
        if isinstance(probed, ProbeFailed):
            return self._unavailable(name, version, self._reason(probed, typed=False))
        try:
            session = Session(pending.path, spec, threads=self._threads, providers=self._providers)
        except Exception as e:  # the probe loaded it: only a changed file or memory
            return self._unavailable(name, version, self._reason(e))
        budget = Budget(
            f"model '{name}''s memory budget",
            pending.memory_budget,
            f"parameter {MEMORY_BUDGET!r} in {CONFIG_NAME}, or --model-memory-budget",
        )
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
            max_batch_bytes=budget.limit,
        )
        log.info("loaded %s version %s on %s", name, version, session.providers[0])
        return ModelVersion(
            name, version, READY, "", spec, session, batcher, stats, metrics,
            probed.profile, budget, RequestDecoder(spec),
        )  # fmt: skip

    def _unavailable(self, name: str, version: str, reason: str) -> ModelVersion:
        log.warning("model %s version %s is unavailable: %s", name, version or "-", reason)
        self._metrics.model(name, version, ready=False)
        return ModelVersion(name, version, UNAVAILABLE, reason)

    def _reason(self, error: Exception, typed: bool = True) -> str:
        """One line, without the server's absolute paths; ``typed``: prefixed with the type."""
        text = first_line(error, default="")
        text = text.replace(f"{self.root}{os.sep}", "").replace(str(self.root), ".")
        text = f"{type(error).__name__}: {text}" if typed else text
        # a train graph's reason is bounded by construction and useless cut short
        return text if isinstance(error, TrainGraphError) else text[:_MAX_REASON]

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
        """The repository index: one entry per model version (per model when its config fails),
        then one per ignored folder of that model (UNAVAILABLE, reason :data:`IGNORED`)."""
        entries = []
        for name, versions in self.models.items():
            entries += [v.index_entry() for v in versions.values() if v.ready or not ready_only]
            if not ready_only:
                entries += [v.index_entry() for v in self.ignored.get(name, [])]
        return entries

    @property
    def all_ready(self) -> bool:
        return all(v.ready for v in self.versions())

    async def close(self) -> None:
        """Finish queued requests and stop every worker thread."""
        for version in self.versions():
            if version.batcher is not None:
                await version.batcher.close()


@dataclass(frozen=True)
class _Pending:
    """A version that passed the checks onnxruntime is not needed for, waiting for its probe."""

    spec: ModelSpec
    path: Path
    memory_budget: int
    job: Job


def _probe(
    pending: list[_Pending], timeout: float, cache: ProbeCache | None
) -> list[Probed | ProbeFailed]:
    """Every pending version's probe result: kept ones from ``cache``, the others probed (and
    kept when they succeed)."""
    keys = [cache.key(p.job) if cache else None for p in pending]
    results: list[Probed | ProbeFailed | None] = [
        cache.load(k) if cache and k else None for k in keys
    ]
    todo = [i for i, r in enumerate(results) if r is None]
    if todo:
        log.info("probing %d model version(s) (%d kept)", len(todo), len(pending) - len(todo))
        found = probe_all([pending[i].job for i in todo], timeout=timeout)
        for i, result in zip(todo, found, strict=True):
            results[i] = result
            key = keys[i]
            if cache is not None and key is not None and isinstance(result, Probed):
                cache.store(key, result)
    return [r for r in results if r is not None]


def default_memory_budget() -> int:
    """Half the memory of the machine (or of the cgroup, when it is lower)."""
    return machine_memory() // 2


def _memory_budget(config: ModelConfig, default: int) -> int:
    """The config's ``normport.memory_budget`` parameter, else ``default``.

    Raises:
        ValueError: the parameter is not a size (the message names the parameter).
    """
    if MEMORY_BUDGET not in config.parameters:
        return default
    text = config.parameters[MEMORY_BUDGET].string_value
    try:
        return parse_bytes(text)
    except ValueError as e:
        raise ValueError(f"parameter {MEMORY_BUDGET!r}: {e}") from None


def _clip(text: str, limit: int = 100) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _read_config(folder: Path) -> ModelConfig:
    """``folder/config.pbtxt``, parsed and checked; errors never quote the file's text.

    Raises:
        ValueError: missing, outside the model folder, too large, not UTF-8, not parsing, or
            naming another model or platform.
        OSError: unreadable.
    """
    path = folder / CONFIG_NAME
    if not _inside(path, folder):  # checked first: nothing outside is even opened
        raise ValueError(f"{CONFIG_NAME} resolves outside the model folder")
    if not path.is_file():
        raise ValueError(f"no {CONFIG_NAME}")
    with path.open("rb") as f:
        data = f.read(_MAX_CONFIG_BYTES + 1)
    if len(data) > _MAX_CONFIG_BYTES:
        raise ValueError(f"{CONFIG_NAME} is larger than {_MAX_CONFIG_BYTES} bytes")
    try:
        config = triton_config.parse(data.decode("utf-8"))
    except UnicodeDecodeError as e:  # its message would quote the byte
        raise ValueError(f"{CONFIG_NAME} is not UTF-8 text (byte offset {e.start})") from None
    except ValueError as e:
        raise ValueError(f"{CONFIG_NAME}: {e}") from None
    if config.name != folder.name:
        raise ValueError(f"the name in {CONFIG_NAME} differs from the folder name")
    if config.platform != PLATFORM:
        raise ValueError(f"the platform in {CONFIG_NAME} is not {PLATFORM!r}")
    return config


def _resolve(path: Path) -> Path | None:
    """``path`` after symlinks; None for a symlink loop."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # RuntimeError: Python 3.11's symlink loop
        return None


def _inside(path: Path, folder: Path) -> bool:
    """``path`` resolves inside ``folder`` (or is it); a symlink loop is never inside."""
    resolved, container = _resolve(path), _resolve(folder)
    return resolved is not None and container is not None and resolved.is_relative_to(container)


def _model_file(version_folder: Path, model_folder: Path) -> Path:
    """``<v>/model.onnx``, or ``<v>/model.onnx/model.onnx`` (Triton's external-data layout)."""
    if not _inside(version_folder, model_folder):
        raise ValueError(f"version folder {version_folder.name} resolves outside the model folder")
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
        TrainGraphError: a training graph (:mod:`runtime.serve.train_graph`).
    """
    try:
        model = onnx.load(os.fspath(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError) as e:
        raise ValueError(f"corrupt or truncated model file: {e}") from None
    if not model.graph.node and not model.graph.output:
        raise ValueError("corrupt or truncated model file: no graph")
    check_not_train(model)
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
