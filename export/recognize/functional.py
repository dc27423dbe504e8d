"""``F.batch_norm`` / ``F.layer_norm`` / ``F.group_norm`` / ``F.instance_norm`` / ``F.rms_norm``.

torch.export's training IR keeps each of these calls as one ATen node, whoever made it: a
custom module, a torch.nn subclass whose ``forward`` wraps the norm (timm's ``LayerNorm2d``
permutes around it, ``BatchNormAct2d`` adds an activation), or plain user code.  Each becomes
one placeholder; the arguments give the exact semantics::

    aten.batch_norm(x, w, b, running_mean, running_var, training, momentum, eps, cudnn)
    aten.instance_norm(x, w, b, running_mean, running_var, use_input_stats, momentum, eps, _)
    aten.layer_norm(x, normalized_shape, w, b, eps, cudnn)
    aten.group_norm(x, num_groups, w, b, eps, cudnn)
    aten.rms_norm(x, normalized_shape, w, eps)

A training step that updates running statistics (``training`` with running buffers) takes the
layer's ``num_batches_tracked`` buffer too, and the module's own ``num_batches_tracked.add_(1)``
is dropped: the exported update advances it (see :mod:`export.lowerings._stats`).
"""

from __future__ import annotations

import torch
from torch import fx
from torch.fx.operator_schemas import normalize_function

from normport.export._placeholder import LayerSpec
from normport.export.recognize._graph import Graph, Slots, is_op

__all__ = ["recognize_functional"]

aten = torch.ops.aten


def _base(g: Graph, node: fx.Node, kind: str, x: fx.Node) -> dict:
    path, cls = g.owner(node)
    return {"kind": kind, "path": path, "cls": cls, "rank": g.val(x).dim(), "source": "functional"}


def _state_path(g: Graph, node: fx.Node, running_mean: fx.Node | None) -> str:
    """A stateful layer's path: its ``running_mean`` buffer's owner, else the calling module."""
    name = g.buffer_name(running_mean)
    if name is None:
        return g.owner(node)[0]
    return name.rsplit(".", 1)[0] if "." in name else ""


def _counter(g: Graph, node: fx.Node, path: str) -> fx.Node:
    name = f"{path}.num_batches_tracked" if path else "num_batches_tracked"
    counter = g.buffer_node(name)
    if counter is None:
        raise ValueError(
            f"{path or '<root>'!r}: a training-mode {node.target} updates running statistics "
            f"but the module has no {name!r} buffer; normport exports running-statistics "
            "updates with PyTorch's counter (torch.nn's _NormBase state)"
        )
    for user in list(counter.users):  # the module's own `num_batches_tracked.add_(1)`
        if is_op(user, aten.add_) and not user.users:
            g.fx.erase_node(user)
    return counter


def _arguments(node: fx.Node) -> dict:
    """The call's arguments by schema name, defaults filled in."""
    pair = normalize_function(
        node.target, tuple(node.args), dict(node.kwargs), normalize_to_only_use_kwargs=True
    )
    return dict(pair.kwargs)


def _running(g: Graph, node: fx.Node, kind: str, training: bool) -> None:
    a = _arguments(node)
    x, rm, momentum = a["input"], a["running_mean"], a["momentum"]
    base = _base(g, node, kind, x)
    update = bool(training) and rm is not None
    if rm is not None and g.buffer_name(rm) is None and update:
        raise ValueError(
            f"{base['path'] or '<root>'!r}: {node.target} in training updates running "
            "statistics that are not module buffers; normport can only expose buffers"
        )
    slots = Slots(x, a["weight"], a["bias"])
    if rm is not None:
        slots.running_mean, slots.running_var = rm, a["running_var"]
    if update:
        base["path"] = _state_path(g, node, rm)
        slots.num_batches_tracked = _counter(g, node, base["path"])
    spec = LayerSpec(
        **base,
        channels=g.val(x).shape[1],
        eps=float(a["eps"]),
        momentum=None if momentum is None else float(momentum),
        batch_stats=bool(training) or rm is None,
        update_stats=update,
    )
    g.replace(node, spec, slots)


def _trailing(g: Graph, node: fx.Node, kind: str) -> None:
    a = _arguments(node)
    x, eps = a["input"], a["eps"]
    if eps is None:  # rms_norm's default: the input dtype's machine epsilon
        eps = torch.finfo(g.val(x).dtype).eps
    shape = tuple(int(s) for s in a["normalized_shape"])
    spec = LayerSpec(
        **_base(g, node, kind, x),
        channels=int(torch.Size(shape).numel()),
        eps=float(eps),
        normalized_ndim=len(shape),
        normalized_shape=shape,
    )
    g.replace(node, spec, Slots(x, a["weight"], a.get("bias")))


def _group(g: Graph, node: fx.Node) -> None:
    a = _arguments(node)
    x = a["input"]
    spec = LayerSpec(
        **_base(g, node, "groupnorm", x),
        channels=g.val(x).shape[1],
        eps=float(a["eps"]),
        num_groups=int(a["num_groups"]),
    )
    g.replace(node, spec, Slots(x, a["weight"], a["bias"]))


def recognize_functional(g: Graph) -> None:
    """Replace every ATen normalization node of ``g`` with a placeholder."""
    for node in g.nodes():
        if is_op(node, aten.batch_norm):
            _running(g, node, "batchnorm", _arguments(node)["training"])
        elif is_op(node, aten.instance_norm):
            _running(g, node, "instancenorm", _arguments(node)["use_input_stats"])
        elif is_op(node, aten.layer_norm):
            _trailing(g, node, "layernorm")
        elif is_op(node, aten.rms_norm):
            _trailing(g, node, "rmsnorm")
        elif is_op(node, aten.group_norm):
            _group(g, node)
