"""Try ``export.to_onnx_opsets`` on a broad corpus of real architectures and report each cell.

``python -m tests.thirdparty.corpus [--out reports/corpus.json] [--only ID ...] [--eval-only]
[--jobs N]``

For every architecture (random init, small config, randomized norms) and mode (eval; train as
well where the model has BatchNorm with running statistics, dropout / drop-path left in eval),
one trace per mode emitted at opsets 13, 17 and 23, then per cell: works / fails (error class and
first line), the worst absolute error against PyTorch (eval: batches of 2 and 3; train: three
fed-back steps of 4, 3, 5, outputs and running statistics) and whether it is within the test
tolerances, and the number of norm nodes against the number of norm modules.  Prints a table and
writes JSON.  Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import multiprocessing
import os
import re
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tests.thirdparty import models as m
from tests.thirdparty.harness import Reference, compare, norm_nodes, reference

__all__ = ["CORPUS", "Cell", "main", "run_arch"]

OPSETS = {"eval": (13, 17, 23), "train": (17, 23)}
EVAL_BATCHES = ((2, 0), (3, 11))
TRAIN_BATCHES = ((4, 21), (3, 22), (5, 23))
# Hand-written norm classes (not torch.nn subclasses) are recognized by name in the corpus;
# the test rows name theirs explicitly.
HANDWRITTEN = re.compile(r"(RMS|Layer|Group|Batch|Instance)Norm")
# A mismatch is put down to conditioning (batch statistics over a handful of values) when
# onnxruntime's distance to a float64 PyTorch run is within this factor of float32 PyTorch's.
CONDITIONING = 4.0


# --- extra factories -----------------------------------------------------------------------


def _tv_vit_tiny() -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        image_size=32,
        patch_size=8,
        num_layers=2,
        num_heads=2,
        hidden_dim=32,
        mlp_dim=64,
        num_classes=10,
    )


def _mixer_b16_small() -> nn.Module:
    """mixer_b16_224's patch 16 on 32 px (4 tokens), two blocks, width 128."""
    from timm.models.mlp_mixer import MlpMixer

    return MlpMixer(num_classes=10, img_size=32, patch_size=16, num_blocks=2, embed_dim=128)


def _hf(config_cls: str, model_cls: str, **config) -> Callable[[], nn.Module]:
    def factory() -> nn.Module:
        import transformers

        cfg = getattr(transformers, config_cls)(**config)
        return getattr(transformers, model_cls)(cfg)

    factory.__name__ = f"hf_{model_cls}"
    return factory


T = m.TINY
DECODER = {
    "vocab_size": m.VOCAB,
    "hidden_size": T["hidden"],
    "intermediate_size": T["intermediate"],
    "num_hidden_layers": T["layers"],
    "num_attention_heads": T["heads"],
    "max_position_embeddings": T["positions"],
    "bos_token_id": 0,
    "eos_token_id": 0,
    "use_cache": False,
}
ENCODER = {
    "vocab_size": m.VOCAB,
    "hidden_size": T["hidden"],
    "intermediate_size": T["intermediate"],
    "num_hidden_layers": T["layers"],
    "num_attention_heads": T["heads"],
    "max_position_embeddings": T["positions"],
    "pad_token_id": 0,
}
VISION = {
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": T["hidden"],
    "intermediate_size": T["intermediate"],
    "num_hidden_layers": T["layers"],
    "num_attention_heads": T["heads"],
}
img32, img64 = m.image_inputs(32), m.image_inputs(64)
tv, tm = m.torchvision_model, m.timm_model

# BatchNorm CNNs get 64 px: at 32 px their last stage is 1x1 and train-mode batch statistics
# over 3-5 values are ill-conditioned (float32 PyTorch itself is ~1e-2 off float64).
_EXTRA = [
    # torchvision (full-size versions of the test rows' shortened ones first)
    m.Arch("tv_convnext_tiny", tv("convnext_tiny"), img32),
    m.Arch("tv_swin_t", tv("swin_t"), img32),
    m.Arch("tv_resnet50", tv("resnet50"), img64),
    m.Arch("tv_densenet121", tv("densenet121"), img64),
    m.Arch("tv_efficientnet_b0", tv("efficientnet_b0"), img64),
    m.Arch("tv_regnet_x_400mf", tv("regnet_x_400mf"), img64),
    m.Arch("tv_shufflenet_v2_x0_5", tv("shufflenet_v2_x0_5"), img64),
    m.Arch("tv_squeezenet1_0", tv("squeezenet1_0"), img64),
    m.Arch("tv_mnasnet0_5", tv("mnasnet0_5"), img64),
    m.Arch("tv_vit_tiny", _tv_vit_tiny, img32),
    # timm
    m.Arch("timm_vit_tiny_patch16", tm("vit_tiny_patch16_224", img_size=32), img32),
    m.Arch("timm_resnet18", tm("resnet18"), img64),
    m.Arch("timm_resnet26d", tm("resnet26d"), img64),
    m.Arch("timm_mobilenetv3_small_050", tm("mobilenetv3_small_050"), img64),
    m.Arch("timm_deit_tiny", tm("deit_tiny_patch16_224", img_size=32), img32),
    m.Arch(
        "timm_swin_tiny",
        tm("swin_tiny_patch4_window7_224", img_size=64, window_size=2),
        img64,
    ),
    m.Arch("timm_levit_128s", tm("levit_128s"), m.image_inputs(224)),
    m.Arch("timm_regnety_002", tm("regnety_002"), img64),
    m.Arch("timm_mixer_b16_small", _mixer_b16_small, img32),
    m.Arch("timm_poolformer_s12", tm("poolformer_s12"), img32),
    # Its last stage's attention biases are sized for 7x7 tokens: 224 px only.
    m.Arch("timm_efficientformer_l1", tm("efficientformer_l1"), m.image_inputs(224)),
    m.Arch("timm_cspresnet50", tm("cspresnet50"), img64),
    # transformers
    m.Arch(  # the test row uses eager attention: torch.onnx fails on this SDPA path
        "hf_t5_encoder_sdpa",
        _hf(
            "T5Config",
            "T5EncoderModel",
            vocab_size=m.VOCAB,
            d_model=T["hidden"],
            d_kv=T["hidden"] // T["heads"],
            d_ff=T["intermediate"],
            num_layers=T["layers"],
            num_heads=T["heads"],
            use_cache=False,
            attn_implementation="sdpa",
        ),
        m.token_inputs,
        handwritten=("T5LayerNorm",),
    ),
    m.Arch(
        "hf_distilbert",
        _hf(
            "DistilBertConfig",
            "DistilBertModel",
            vocab_size=m.VOCAB,
            dim=T["hidden"],
            hidden_dim=T["intermediate"],
            n_layers=T["layers"],
            n_heads=T["heads"],
            max_position_embeddings=T["positions"],
            pad_token_id=0,
        ),
        m.token_inputs,
    ),
    m.Arch(
        "hf_roberta",
        _hf("RobertaConfig", "RobertaModel", **{**ENCODER, "max_position_embeddings": 66}),
        m.token_inputs,
    ),
    m.Arch(
        "hf_albert",
        _hf("AlbertConfig", "AlbertModel", **ENCODER, embedding_size=16),
        m.token_inputs,
    ),
    m.Arch("hf_vit", _hf("ViTConfig", "ViTModel", **VISION), img32),
    m.Arch(
        "hf_convnext",
        _hf("ConvNextConfig", "ConvNextModel", hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1]),
        img32,
    ),
    m.Arch(
        "hf_mobilebert",
        _hf(
            "MobileBertConfig",
            "MobileBertModel",
            **ENCODER,
            embedding_size=16,
            intra_bottleneck_size=16,
            true_hidden_size=16,
            num_feedforward_networks=1,
        ),
        m.token_inputs,
    ),
    m.Arch(
        "hf_mistral",
        _hf("MistralConfig", "MistralModel", **DECODER, num_key_value_heads=T["kv_heads"]),
        m.token_inputs,
    ),
    m.Arch(
        "hf_qwen2",
        _hf("Qwen2Config", "Qwen2Model", **DECODER, num_key_value_heads=T["kv_heads"]),
        m.token_inputs,
    ),
    m.Arch("hf_phi", _hf("PhiConfig", "PhiModel", **DECODER), m.token_inputs),
    m.Arch(
        "hf_falcon",
        _hf(
            "FalconConfig",
            "FalconModel",
            vocab_size=m.VOCAB,
            hidden_size=T["hidden"],
            num_hidden_layers=T["layers"],
            num_attention_heads=T["heads"],
            bos_token_id=0,
            eos_token_id=0,
            use_cache=False,
        ),
        m.token_inputs,
    ),
    m.Arch(
        "hf_opt",
        _hf(
            "OPTConfig",
            "OPTModel",
            vocab_size=m.VOCAB,
            hidden_size=T["hidden"],
            ffn_dim=T["intermediate"],
            num_hidden_layers=T["layers"],
            num_attention_heads=T["heads"],
            max_position_embeddings=T["positions"],
            word_embed_proj_dim=T["hidden"],
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=0,
            use_cache=False,
        ),
        m.token_inputs,
    ),
]
# The test rows, except those shortened for the test's time budget: their full-size models
# are in _EXTRA.
SHORTENED = ("tv_convnext_tiny_short", "tv_swin_t_short", "timm_vit_tiny_patch16_depth4")
CORPUS: dict[str, m.Arch] = {
    **{k: a for k, a in m.ARCHS.items() if k not in SHORTENED},
    **{a.id: a for a in _EXTRA},
}


# --- running -------------------------------------------------------------------------------


@dataclass
class Cell:
    arch: str
    mode: str
    opset: int
    status: str  # ok | ill-conditioned | mismatch | fail (see STATUS)
    error: str = ""  # "ErrorClass: first line"
    max_abs: float | None = None  # onnxruntime vs PyTorch float32, worst tensor
    mismatches: list[str] | None = None  # tensors beyond the test tolerances
    # Over the mismatching tensors: onnxruntime vs PyTorch float64, and PyTorch's own float32
    # error (float32 vs float64).
    onnx_vs_f64: float | None = None
    torch_vs_f64: float | None = None
    norm_nodes: int | None = None
    norm_calls: int = 0  # norm module calls in one forward (shared layers count per call)
    norm_modules: int = 0
    norm_classes: dict[str, int] | None = None
    export_s: float = 0.0


STATUS = {
    "ok": "every output / statistic within the test tolerances, norm nodes == norm calls",
    "ill-conditioned": (
        "beyond tolerance, but onnxruntime is no further from a float64 PyTorch run than "
        f"{CONDITIONING}x PyTorch's own float32 error (tiny-batch statistics)"
    ),
    "mismatch": "beyond that, or norm nodes != norm calls",
    "fail": "export or onnxruntime raised",
}


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _error(e: BaseException) -> str:
    """``ErrorClass: first line``; for torch.onnx's long reports, the summarized cause."""
    lines = [line.strip() for line in ANSI.sub("", str(e)).splitlines() if line.strip()]
    if "## Exception summary" in lines:
        lines = lines[lines.index("## Exception summary") + 1 :]
    return f"{type(e).__name__}: {lines[0][:240] if lines else ''}"


def _handwritten(net: nn.Module) -> tuple[str, ...]:
    names = {
        type(mod).__name__
        for mod in net.modules()
        if HANDWRITTEN.search(type(mod).__name__) and not isinstance(mod, m.TORCH_NORM_TYPES)
    }
    return tuple(sorted(names))


def _export(net: nn.Module, inputs, mode: str, opsets: tuple[int, ...]):
    """``{opset: model or exception}``: one trace; per opset again only if an opset failed."""
    from normport import export

    try:
        return export.to_onnx_opsets(net, inputs, mode=mode, opsets=opsets)
    except export.OpsetError:
        pass  # one opset blocked by an op: find which
    except Exception as e:
        return dict.fromkeys(opsets, e)
    out = {}
    for opset in opsets:
        try:
            out[opset] = export.to_onnx(net, inputs, mode=mode, opset=opset)
        except Exception as e:
            out[opset] = e
    return out


def _float64(net: nn.Module, batches) -> Reference:
    batches = [tuple(t.double() if t.is_floating_point() else t for t in b) for b in batches]
    return reference(copy.deepcopy(net).double(), batches)


def _judge(cell: Cell, steps, ref64: Reference) -> None:
    """Compare the mismatching tensors with a float64 PyTorch run (see :data:`STATUS`)."""
    onnx_err = torch_err = 0.0
    conditioned = True
    for i, step in enumerate(steps):
        bad = {x.split(":")[0] for x in step.mismatches()}
        for name, (ours, theirs) in {**step.outputs, **step.state}.items():
            if name not in bad:
                continue
            exact = ref64.outputs[i].get(name)
            if exact is None:
                exact = ref64.state[i][name.removesuffix(".next")]
            a = float(np.abs(ours - exact).max())
            b = float(np.abs(theirs - exact).max())
            onnx_err, torch_err = max(onnx_err, a), max(torch_err, b)
            conditioned &= a <= CONDITIONING * b
    cell.onnx_vs_f64, cell.torch_vs_f64 = onnx_err, torch_err
    cell.status = "ill-conditioned" if conditioned else "mismatch"


def run_arch(arch: m.Arch, modes: tuple[str, ...] = ("eval", "train")) -> list[Cell]:
    cells: list[Cell] = []
    try:
        net = arch.build()
        handwritten = tuple(sorted({*arch.handwritten, *_handwritten(net)}))
        layers = m.norm_modules(net, handwritten, arch.functional)
        calls = sum(
            m.norm_calls(net, arch.inputs(*EVAL_BATCHES[0]), handwritten, arch.functional).values()
        )
    except Exception as e:
        return [Cell(arch.id, "eval", o, "fail", "build: " + _error(e)) for o in OPSETS["eval"]]
    classes = dict(collections.Counter(type(layer).__name__ for layer in layers.values()))
    has_bn = any(
        isinstance(x, nn.modules.batchnorm._BatchNorm) and x.track_running_stats
        for x in layers.values()
    )
    for mode in modes:
        if mode == "train" and not has_bn:
            continue
        work = copy.deepcopy(net)
        if mode == "train":
            m.mixed_train(work)
        batches = [arch.inputs(*b) for b in (EVAL_BATCHES if mode == "eval" else TRAIN_BATCHES)]
        start = time.perf_counter()
        results = _export(work, arch.inputs(*EVAL_BATCHES[0]), mode, OPSETS[mode])
        seconds = time.perf_counter() - start
        ref = ref64 = None  # PyTorch's side, once per mode
        for opset, model in results.items():
            cell = Cell(arch.id, mode, opset, "fail", norm_calls=calls, norm_modules=len(layers))
            cell.norm_classes, cell.export_s = classes, round(seconds, 1)
            cells.append(cell)
            if isinstance(model, BaseException):
                cell.error = _error(model)
                continue
            cell.norm_nodes = len(norm_nodes(model))
            try:
                ref = ref or reference(work, batches)
                steps = compare(model, ref)
            except Exception as e:
                cell.error = "run: " + _error(e)
                continue
            cell.max_abs = max(s.max_abs() for s in steps)
            cell.mismatches = [
                f"step {i}: {x}" for i, s in enumerate(steps) for x in s.mismatches()
            ]
            cell.status = "ok"
            if cell.mismatches:
                ref64 = ref64 or _float64(work, batches)
                _judge(cell, steps, ref64)
            if cell.norm_nodes != calls:
                cell.status = "mismatch"
    return cells


FLAGS = {"ok": "", "ill-conditioned": "~", "mismatch": "!"}


def _cell_text(cell: Cell) -> str:
    if cell.status == "fail":
        return "FAIL " + cell.error.split(":")[0]
    err = f"{cell.max_abs:.0e}" if cell.max_abs else "0"
    return f"{FLAGS[cell.status]}{err} {cell.norm_nodes}/{cell.norm_calls}"


def table(cells: list[Cell]) -> str:
    """One line per (arch, mode), per opset: max abs error vs PyTorch, norm nodes / norm calls;
    ``~`` ill-conditioned, ``!`` mismatch (see :data:`STATUS`)."""
    columns = sorted({c.opset for c in cells})
    rows: dict[tuple[str, str], dict[int, Cell]] = {}
    for c in cells:
        rows.setdefault((c.arch, c.mode), {})[c.opset] = c
    width = max(len("architecture"), *(len(a) for a, _ in rows)) + 2
    lines = [f"{'architecture':<{width}}mode   " + "".join(f"{o:<22}" for o in columns)]
    for (arch, mode), by_opset in rows.items():
        row = "".join(f"{_cell_text(by_opset[o]) if o in by_opset else '-':<22}" for o in columns)
        lines.append(f"{arch:<{width}}{mode:<7}{row}")
    errors = sorted({(c.arch, c.mode, c.error) for c in cells if c.error})
    if errors:
        lines.append("\nfailures:")
        lines += [f"  {a} {mode}: {e}" for a, mode, e in errors]
    bad = [c for c in cells if c.status in ("mismatch", "ill-conditioned")]
    if bad:
        lines.append("\nbeyond tolerance or miscounted (~ ill-conditioned, ! mismatch):")
        for c in bad:
            what = c.mismatches[:2] if c.mismatches else []
            count = f"{c.norm_nodes} nodes, {c.norm_calls} calls of {c.norm_classes}"
            f64 = ""
            if c.onnx_vs_f64 is not None:
                f64 = f"; vs float64: onnx {c.onnx_vs_f64:.1e}, torch {c.torch_vs_f64:.1e}"
            more = f" (+{len(c.mismatches) - 2})" if c.mismatches and len(c.mismatches) > 2 else ""
            lines.append(
                f"  {FLAGS[c.status]} {c.arch} {c.mode} {c.opset}: {count}; {what}{more}{f64}"
            )
    lines.append("")
    lines += [f"{status}: {meaning}" for status, meaning in STATUS.items()]
    return "\n".join(lines)


def _run_one(arch_id: str, modes: tuple[str, ...], threads: int) -> tuple[list[Cell], float]:
    """One architecture, in a worker process: its cells and wall seconds."""
    torch.set_num_threads(threads)
    start = time.perf_counter()
    try:
        cells = run_arch(CORPUS[arch_id], modes)
    except Exception as e:  # a harness bug: report it, keep going
        traceback.print_exc()
        cells = [Cell(arch_id, "eval", 0, "fail", "corpus: " + _error(e))]
    return cells, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("reports/corpus.json"))
    parser.add_argument("--only", nargs="+", metavar="ID", help=f"ids from: {', '.join(CORPUS)}")
    parser.add_argument("--eval-only", action="store_true", help="skip the train exports")
    parser.add_argument(
        "--jobs",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="worker processes (default: min(2, CPUs)); tracing is single-threaded Python",
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.only or ()) - set(CORPUS))
    if unknown:
        parser.error(f"unknown ids {unknown}")
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    modes = ("eval",) if args.eval_only else ("eval", "train")
    ids = [i for i in CORPUS if not args.only or i in args.only]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    by_id: dict[str, list[Cell]] = {}
    # spawn: a fresh interpreter per worker (forking after torch / onnxruntime started their
    # thread pools is not safe).
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
        futures = {pool.submit(_run_one, i, modes, threads): i for i in ids}
        for future in as_completed(futures):
            cells, seconds = future.result()
            by_id[futures[future]] = cells
            status = ", ".join(f"{c.mode}{c.opset}:{c.status}" for c in cells)
            print(f"{futures[future]}: {status} ({seconds:.0f} s)", file=sys.stderr, flush=True)
    cells = [c for i in ids for c in by_id[i]]
    print(table(cells))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps([asdict(c) for c in cells], indent=1) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
