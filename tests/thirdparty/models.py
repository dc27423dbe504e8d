"""Real architectures from torchvision, timm and transformers: random init, small configs.

Every factory is deterministic (``torch.manual_seed``) and downloads nothing.  After building,
:func:`randomize_norms` gives every normalization layer non-trivial affine parameters and
running statistics (never weight=1 / bias=0, running_var in [0.5, 2]), so that a lowering that
drops the affine, swaps mean and variance, or reads the wrong buffer cannot pass.

>>> arch = ARCHS["tv_resnet18"]
>>> model = arch.build()  # eval mode, randomized norms
>>> inputs = arch.inputs(batch=2, seed=0)
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from tests.thirdparty._torchvision import torchvision  # before timm, which imports torchvision

__all__ = [
    "ARCHS",
    "DROP_TYPES",
    "TINY",
    "TORCH_NORM_TYPES",
    "VOCAB",
    "Arch",
    "drop_modules",
    "image_inputs",
    "mixed_train",
    "norm_calls",
    "norm_modules",
    "randomize_norms",
    "timm_model",
    "token_inputs",
    "torchvision_model",
]

IDS_LEN = 16
VOCAB = 100

# torch.nn's normalization classes: their third-party subclasses (timm's BatchNormAct2d,
# GroupNormAct, LayerNorm2d, ...) count too.  Written here, not imported from the package under
# test, so the count is independent of what the exporter thinks a norm is.
TORCH_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,  # BatchNorm1d/2d/3d, SyncBatchNorm, LazyBatchNorm*
    nn.modules.instancenorm._InstanceNorm,  # InstanceNorm1d/2d/3d
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    torchvision.ops.misc.FrozenBatchNorm2d,
)


def _drop_types() -> tuple[type[nn.Module], ...]:
    import timm.layers

    return (
        nn.modules.dropout._DropoutNd,  # Dropout, Dropout1d/2d/3d, AlphaDropout, ...
        torchvision.ops.StochasticDepth,
        timm.layers.DropPath,
    )


DROP_TYPES = _drop_types()


@dataclass(frozen=True)
class Arch:
    """One architecture: how to build it, feed it, and which hand-written norms it has."""

    id: str
    factory: Callable[[], nn.Module]  # random init (under torch.manual_seed), any mode
    inputs: Callable[[int, int], tuple[Tensor, ...]]  # (batch, seed) -> example inputs
    handwritten: tuple[str, ...] = ()  # class names of norm modules outside torch.nn
    # Class names of non-norm modules whose forward normalizes with a functional call, one
    # norm node each (timm's StdConv2d standardizes its weight with F.batch_norm).
    functional: tuple[str, ...] = ()
    # At most this many top-level nodes of the ops a norm decomposes into (ReduceMean, Sqrt,
    # Pow): what the network's other layers use (global pooling, SE blocks, GELU's tanh
    # approximation), counted by exporting the model with every norm replaced by Identity.
    # More means a norm was left as a primitive pile.
    op_limits: Mapping[str, int] = field(default_factory=dict)
    train: bool = False  # has BatchNorm layers: also exported (and checked) in train mode

    def build(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        model = self.factory()
        randomize_norms(model, self.handwritten, torch.Generator().manual_seed(seed + 1))
        return model.eval()


def norm_modules(model: nn.Module, *class_names: tuple[str, ...]) -> dict[str, nn.Module]:
    """``{path: module}`` of every normalization layer: torch.nn's classes (subclasses too),
    torchvision's FrozenBatchNorm2d, and modules whose class name is in ``class_names``."""
    names = {name for group in class_names for name in group}
    return {
        path: m
        for path, m in model.named_modules()
        if isinstance(m, TORCH_NORM_TYPES) or type(m).__name__ in names
    }


def norm_calls(
    model: nn.Module, inputs: tuple[Tensor, ...], *class_names: tuple[str, ...]
) -> dict[str, int]:
    """``{path: calls}`` of :func:`norm_modules` in one forward of a copy of ``model``: a
    module applied several times (ALBERT shares one layer across depth) is several norms."""
    model = copy.deepcopy(model)
    calls = dict.fromkeys(norm_modules(model, *class_names), 0)
    handles = []
    for path in calls:

        def hook(module, args, output, path=path):
            calls[path] += 1

        handles.append(model.get_submodule(path).register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def drop_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {path: m for path, m in model.named_modules() if isinstance(m, DROP_TYPES)}


def mixed_train(model: nn.Module) -> nn.Module:
    """``model.train()``, then every dropout / drop-path module back in eval (in place)."""
    model.train()
    for m in drop_modules(model).values():
        m.eval()
    return model


@torch.no_grad()
def randomize_norms(model: nn.Module, handwritten: tuple[str, ...], gen: torch.Generator) -> None:
    """Non-trivial affine parameters and running statistics for every norm layer."""

    def randn(t: Tensor) -> Tensor:
        return torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype)

    for m in norm_modules(model, handwritten).values():
        for name, value in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]:
            if value is None:
                continue
            if name == "weight":
                value.copy_(1.0 + 0.5 * randn(value))
            elif name in ("bias", "running_mean"):
                value.copy_(0.5 * randn(value))
            elif name == "running_var":
                u = torch.rand(value.shape, generator=gen, dtype=torch.float64)
                value.copy_((0.5 + 1.5 * u).to(value.dtype))
            elif name == "num_batches_tracked":
                value.fill_(7)


def image_inputs(size: int) -> Callable[[int, int], tuple[Tensor, ...]]:
    def make(batch: int, seed: int) -> tuple[Tensor, ...]:
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn((batch, 3, size, size), generator=gen)
        return (x * 1.5 + 0.3,)

    return make


def token_inputs(batch: int, seed: int) -> tuple[Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, VOCAB, (batch, IDS_LEN), generator=gen, dtype=torch.int64),)


# --- torchvision ---------------------------------------------------------------------------


def torchvision_model(name: str, **kwargs) -> Callable[[], nn.Module]:
    def factory() -> nn.Module:
        return torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs)

    factory.__name__ = f"torchvision_{name}"
    return factory


def _tv_convnext_tiny_short() -> nn.Module:
    """``convnext_tiny`` (widths 96-768, LayerNorm2d stem and downsampling, LayerNorm blocks,
    stochastic depth 0.1) with one block per stage instead of 3, 3, 9, 3: tracing cost grows
    with the block count, and every kind of layer is still there."""
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    setting = [CNBlockConfig(96, 192, 1), CNBlockConfig(192, 384, 1)]
    setting += [CNBlockConfig(384, 768, 1), CNBlockConfig(768, None, 1)]
    return ConvNeXt(setting, stochastic_depth_prob=0.1, num_classes=10)


def _tv_swin_t_short() -> nn.Module:
    """``swin_t`` (patch 4, width 96, heads 3 / 6, window 7, stochastic depth 0.2) with its
    first two stages only: 2 + 2 blocks and one patch merging.  On 32 px stage 1 has 8x8
    tokens (windows padded to 14x14, every second block shifted), stage 2 4x4 (one window, no
    shift); the full model's stages 3 and 4 (2x2, 1x1 tokens) would add no new kind of layer."""
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer(
        patch_size=[4, 4],
        embed_dim=96,
        depths=[2, 2],
        num_heads=[3, 6],
        window_size=[7, 7],
        stochastic_depth_prob=0.2,
        num_classes=10,
    )


# --- timm ----------------------------------------------------------------------------------


def timm_model(name: str, **kwargs) -> Callable[[], nn.Module]:
    def factory() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)

    factory.__name__ = f"timm_{name}"
    return factory


def _resnetv2_bit_tiny() -> nn.Module:
    """ResNetV2 as BiT builds it (pre-activation, GroupNormAct, weight-standardized StdConv2d,
    fixed stem), one bottleneck per stage: ``resnetv2_50x1_bit``'s layers, 1/50 of its size.
    StdConv2d standardizes its weight with ``F.batch_norm`` on the weight, not a norm layer."""
    from timm.layers import GroupNormAct, StdConv2d
    from timm.models.resnetv2 import ResNetV2

    return ResNetV2(
        layers=[1, 1, 1, 1],
        channels=(64, 128, 256, 512),
        stem_chs=32,
        stem_type="fixed",
        norm_layer=functools.partial(GroupNormAct, num_groups=8),
        conv_layer=functools.partial(StdConv2d, eps=1e-8),
        num_classes=10,
    )


# --- transformers --------------------------------------------------------------------------

TINY = {"hidden": 32, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 64, "positions": 64}


def _bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=TINY["hidden"],
        num_hidden_layers=TINY["layers"],
        num_attention_heads=TINY["heads"],
        intermediate_size=TINY["intermediate"],
        max_position_embeddings=TINY["positions"],
    )
    return BertModel(config)


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2Model

    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=TINY["hidden"],
        n_layer=TINY["layers"],
        n_head=TINY["heads"],
        n_inner=TINY["intermediate"],
        n_positions=TINY["positions"],
        bos_token_id=0,
        eos_token_id=0,
        use_cache=False,
    )
    return GPT2Model(config)


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=TINY["hidden"],
        num_hidden_layers=TINY["layers"],
        num_attention_heads=TINY["heads"],
        num_key_value_heads=TINY["kv_heads"],
        intermediate_size=TINY["intermediate"],
        max_position_embeddings=TINY["positions"],
        use_cache=False,
    )
    return LlamaModel(config)


def _t5_encoder() -> nn.Module:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=VOCAB,
        d_model=TINY["hidden"],
        d_kv=TINY["hidden"] // TINY["heads"],
        d_ff=TINY["intermediate"],
        num_layers=TINY["layers"],
        num_heads=TINY["heads"],
        use_cache=False,
        # torch.onnx 2.13 cannot decompose T5's SDPA path ("Cannot view a tensor with shape
        # [2, 16, 4, 8] and strides (512, 8, 128, 1)"), an exporter bug outside normport.
        attn_implementation="eager",
    )
    return T5EncoderModel(config)


RMS_PILE = {"ReduceMean": 0, "Sqrt": 0, "Pow": 0}  # x * rsqrt(mean(x ** 2) + eps)

_ARCH_LIST = [
    # Images: 32x32, the smallest input these strides and pools take, except the BatchNorm
    # (train) rows: at 32 px their last stages are 1x1, batch statistics there come from 3-5
    # values, and float32 PyTorch itself is ~2e-2 off float64 (efficientnet_b0); at 64 px
    # ~5e-5.  swin: patch embedding 4 -> 8x8 tokens, so stage 1 (8 > window 7) has shifted
    # windows.  "_short": fewer blocks than the named model (see the factory), for the
    # `make test` time budget; the corpus runs the full-size ones.
    Arch(
        "tv_resnet18",
        torchvision_model("resnet18"),
        image_inputs(64),
        op_limits={"ReduceMean": 1, "Sqrt": 0, "Pow": 0},  # global average pool
        train=True,
    ),
    Arch(
        "tv_mobilenet_v3_small",
        torchvision_model("mobilenet_v3_small"),
        image_inputs(64),
        op_limits={"ReduceMean": 10, "Sqrt": 0, "Pow": 0},  # 9 squeeze-excitation + the head
        train=True,
    ),
    Arch(
        "tv_convnext_tiny_short",
        _tv_convnext_tiny_short,
        image_inputs(32),
        op_limits={"ReduceMean": 1, "Sqrt": 0, "Pow": 0},
    ),
    Arch(
        "tv_swin_t_short",
        _tv_swin_t_short,
        image_inputs(32),
        op_limits={"ReduceMean": 1, "Sqrt": 0, "Pow": 0},
    ),
    # timm
    Arch(
        "timm_vit_tiny_patch16_depth4",  # 4 of its 12 blocks: tracing cost grows with depth
        timm_model("vit_tiny_patch16_224", img_size=32, depth=4, drop_path_rate=0.1),
        image_inputs(32),
        op_limits={"ReduceMean": 0, "Sqrt": 0, "Pow": 0},  # class-token pooling
    ),
    Arch(
        "timm_convnext_atto",
        timm_model("convnext_atto", drop_path_rate=0.1),
        image_inputs(32),
        op_limits={"ReduceMean": 1, "Sqrt": 0, "Pow": 0},
    ),
    Arch(
        "timm_efficientnet_b0",
        timm_model("efficientnet_b0", drop_path_rate=0.1),
        image_inputs(64),
        op_limits={"ReduceMean": 17, "Sqrt": 0, "Pow": 0},  # 16 squeeze-excitation + the head
        train=True,
    ),
    Arch(
        "timm_resnetv2_bit_tiny",
        _resnetv2_bit_tiny,
        image_inputs(32),
        functional=("StdConv2d",),
        op_limits={"ReduceMean": 1, "Sqrt": 0, "Pow": 0},
    ),
    # transformers
    Arch("hf_bert", _bert, token_inputs, op_limits={"ReduceMean": 0, "Sqrt": 0, "Pow": 0}),
    Arch(
        "hf_gpt2",
        _gpt2,
        token_inputs,
        op_limits={"ReduceMean": 0, "Sqrt": 0, "Pow": 2},  # gelu_new's x ** 3
    ),
    Arch("hf_llama", _llama, token_inputs, handwritten=("LlamaRMSNorm",), op_limits=RMS_PILE),
    Arch(
        "hf_t5_encoder", _t5_encoder, token_inputs, handwritten=("T5LayerNorm",), op_limits=RMS_PILE
    ),
]
ARCHS: dict[str, Arch] = {a.id: a for a in _ARCH_LIST}
