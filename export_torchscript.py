"""Export a checkpoint to TorchScript plus the metadata the handler reads.

    python export_torchscript.py --checkpoint ckpt.pth --output build/b4.pt

writes ``build/b4.pt``, ``build/model_meta.json``, ``build/index_to_name.json`` and
``build/v2_metadata.json`` (the v2 model metadata). The scripted model is checked against the
eager one before anything is written.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from b4serve.ops.checkpoint import CheckpointError, file_sha256, load_checkpoint
from b4serve.ops.onnx_export import export_onnx
from b4serve.serving.archs import ARCHS
from b4serve.serving.config import DEFAULT_MAX_PIXELS, ModelConfig
from b4serve.serving.protocol import write_model_metadata
from b4serve.serving.runtime import RUNTIMES

PARITY_TOLERANCE = 1e-5


def script_with_parity_check(
    model: nn.Module, input_size: int, *, tolerance: float = PARITY_TOLERANCE, batch: int = 2
) -> tuple[torch.jit.ScriptModule, float]:
    """Script ``model`` and return it with the max abs difference to eager on a random batch."""
    scripted = torch.jit.script(model.eval())
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, input_size, input_size, generator=generator)
    with torch.inference_mode():
        difference = (scripted(images) - model(images)).abs().max().item()
    if not difference <= tolerance:  # also catches NaN
        raise CheckpointError(
            f"scripted output differs from eager by {difference:.3g} (tolerance {tolerance:g})"
        )
    return scripted, difference


def read_class_names(value: str | None) -> list[str] | None:
    """Class names from a comma-separated list, a JSON file (list or index map) or a text file."""
    if not value:
        return None
    path = Path(value)
    if not path.is_file():
        return [name.strip() for name in value.split(",")]
    text = path.read_text()
    if path.suffix == ".json":
        parsed = json.loads(text)
        if isinstance(parsed, dict):
            return [str(parsed[str(i)]) for i in range(len(parsed))]
        return [str(name) for name in parsed]
    return [line.strip() for line in text.splitlines() if line.strip()]


def export(args: argparse.Namespace) -> ModelConfig:
    """Load, script, check and write the model and its metadata; return the config written."""
    loaded = load_checkpoint(
        args.checkpoint, args.arch, args.num_classes, trust=args.trust_checkpoint
    )
    names = read_class_names(args.class_names) or loaded.class_names
    if names is not None and len(names) != args.num_classes:
        raise CheckpointError(f"{len(names)} class names given for {args.num_classes} classes")
    config = ModelConfig.for_arch(
        args.arch,
        args.num_classes,
        names,
        input_size=args.input_size,
        max_pixels=args.max_pixels,
        demo=loaded.demo,
        micro_batch=args.micro_batch,
        threads=args.threads,
        malloc_keep_mb=args.malloc_keep_mb,
        optimize=not args.no_optimize,
        onednn_fusion=not args.no_onednn_fusion,
        runtime=args.runtime,
        extra={"checkpoint_sha256": file_sha256(args.checkpoint)},
    )
    scripted, difference = script_with_parity_check(loaded.model, config.input_size)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    scripted.save(str(output))
    print(
        f"exported {'DEMO ' if config.demo else ''}{config.arch} ({config.num_classes} classes, "
        f"{config.input_size}px) to {output}; scripted vs eager max abs diff {difference:.2e}"
    )
    if config.runtime == "onnxruntime":
        onnx_path = output.with_name(RUNTIMES["onnxruntime"])
        onnx_difference = export_onnx(loaded.model, config, onnx_path)
        print(
            f"exported ONNX to {onnx_path} (runs in float32 on ONNX Runtime); max abs probability "
            f"difference to eager {onnx_difference:.2e}, same top-1"
        )
    config.save(args.meta_dir or output.parent)
    write_model_metadata(config, args.meta_dir or output.parent)  # served at /v2/models/<name>
    return config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint file (.pth/.pt)")
    parser.add_argument("--arch", default="efficientnet_b4", choices=sorted(ARCHS))
    parser.add_argument("--num-classes", type=int, default=6)
    parser.add_argument("--output", required=True, help="TorchScript file to write")
    parser.add_argument("--meta-dir", help="where to write the metadata (default: beside --output)")
    parser.add_argument(
        "--class-names", help="comma-separated names, or a .json/.txt file (default: checkpoint's)"
    )
    parser.add_argument("--input-size", type=int, help="square input size (default: the arch's)")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    parser.add_argument(
        "--micro-batch",
        type=int,
        default=0,
        help="images per forward pass in the handler (default 0: 1 on CPU, all on GPU)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="intra-op threads per worker (default 0: torch's default, one per core)",
    )
    parser.add_argument(
        "--malloc-keep-mb",
        type=int,
        default=512,
        help="freed memory each worker keeps for reuse, MiB (default 512; 0: glibc's default)",
    )
    parser.add_argument(
        "--runtime",
        choices=sorted(RUNTIMES),
        default="torchscript",
        help="what serves the model; onnxruntime also writes model.onnx beside --output",
    )
    parser.add_argument(
        "--no-optimize",
        action="store_true",
        help="serve the plain scripted model, without freeze/channels_last (the seed's baseline)",
    )
    parser.add_argument(
        "--no-onednn-fusion",
        action="store_true",
        help="serve without oneDNN Graph fusion on the CPU (about 14%% slower, 390 MiB smaller)",
    )
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="allow unpickling whole modules (runs code from the file)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    try:
        export(args)
    except (CheckpointError, ValueError) as exc:
        print(f"export_torchscript: error: {exc}", file=sys.stderr)
        return 1
    print(f"export took {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
