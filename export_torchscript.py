"""Export a checkpoint to TorchScript plus the metadata the handler reads.

    python export_torchscript.py --checkpoint ckpt.pth --output build/b4.pt

writes ``build/b4.pt``, ``build/model_meta.json``, ``build/index_to_name.json`` and
``build/v2_metadata.json`` (the v2 model metadata). The arch is told from a whole pickled module
(``--arch`` for a state dict), and every model file written is proven to reproduce the
checkpoint's own module (b4serve.build.parity) before the metadata is. ``--runtime auto`` (the
default) then picks the fastest runtime this host runs that matches fp32 TorchScript
(b4serve.build.runtimes), writing ``model.onnx`` beside the TorchScript file when it needs it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from b4serve.build.checkpoint import CheckpointError, file_sha256, load_checkpoint
from b4serve.build.gpu_parity import FALLBACK_PRECISIONS, parity_at_export
from b4serve.build.parity import (
    QUANTITY,
    TOLERANCES,
    ParityProbe,
    check_images,
    prove_exported_files,
)
from b4serve.build.runtimes import AUTO, choose_runtime, place_runtime_file
from b4serve.serving.archs import ARCHS
from b4serve.serving.config import (
    DEFAULT_GPU_BUCKETS,
    DEFAULT_MAX_PIXELS,
    GPU_PRECISIONS,
    ModelConfig,
)
from b4serve.serving.protocol import write_model_metadata
from b4serve.serving.runtime import REFERENCE, RUNTIMES, runtime_spec


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
    for note in loaded.notes:
        print(f"export_torchscript: {note}")
    if loaded.warning:
        print(f"export_torchscript: warning: {loaded.warning}", file=sys.stderr)
    names = read_class_names(args.class_names) or loaded.class_names
    if names is not None and len(names) != args.num_classes:
        raise CheckpointError(f"{len(names)} class names given for {args.num_classes} classes")
    config = ModelConfig.for_arch(
        loaded.arch,
        args.num_classes,
        names,
        input_size=args.input_size or loaded.input_size,
        max_pixels=args.max_pixels,
        demo=loaded.demo,
        micro_batch=args.micro_batch,
        threads=args.threads,
        malloc_keep_mb=args.malloc_keep_mb,
        optimize=not args.no_optimize,
        onednn_fusion=not args.no_onednn_fusion,
        runtime=REFERENCE,  # until choose_runtime below
        openvino_hint=args.openvino_hint,
        openvino_streams=args.openvino_streams,
        gpu_precision=args.gpu_precision or ModelConfig.gpu_precision,
        gpu_buckets=args.gpu_buckets,
        extra={
            "checkpoint_sha256": file_sha256(args.checkpoint),
            "checkpoint_library": loaded.library,  # whose keys it had (b4serve.build.foreign)
        },
    )
    probe = ParityProbe.of(
        loaded.reference, config, against=loaded.against, hint=loaded.mismatch_hint
    )
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.script(loaded.model).save(str(output))
    print(
        f"exported {'DEMO ' if config.demo else ''}{config.arch} ({config.num_classes} classes, "
        f"{config.input_size}px) to {output}"
    )
    selection = choose_runtime(
        args.runtime, loaded.model, config, output, check_images=args.check_images,
        reduced_tolerance=args.reduced_tolerance, gpus=_worker_gpus(args.gpus),
        cache_dir=Path(args.choice_cache) if args.choice_cache else None,
    )  # fmt: skip
    config = dataclasses.replace(config, **selection.settings)
    onnx_path = output.with_name(runtime_spec("onnxruntime").file)
    if not onnx_path.is_file():  # auto or a pin wrote it when a runtime needed it
        onnx_path = None
    for what, difference in prove_exported_files(probe, config, output, onnx_path):
        print(
            f"{what} reproduces {probe.against}: {QUANTITY} {difference:.2e} with flip TTA on "
            f"{len(probe.batch)} probe images (tolerance {TOLERANCES['fp32']:g})"
        )
    images = None
    if args.check_images:
        images = [image for _, image in check_images(config, args.check_images)]
    fallback = () if args.gpu_precision else FALLBACK_PRECISIONS  # fp16, else bf16 if it holds
    parity = parity_at_export(output, config, args.gpu_parity, images, precisions=fallback)
    if parity is not None:  # recorded: the archive says how its GPU model was checked
        print(f"GPU parity: {parity.summary()}")
        config = dataclasses.replace(
            config,
            gpu_precision=parity.gpu_precision,
            extra={**config.extra, "gpu_parity": parity.summary()},
        )
    elif args.gpu_parity == "auto" and config.optimize:
        print(
            f"GPU parity not checked: no CUDA device here (a GPU worker runs this model in "
            f"{config.gpu_precision}; export on a GPU machine to check it)"
        )
    config.save(args.meta_dir or output.parent)
    write_model_metadata(config, args.meta_dir or output.parent)  # served at /v2/models/<name>
    if args.meta_dir:  # an archive's extra files: the chosen runtime's file travels with them
        place_runtime_file(config.runtime, output, Path(args.meta_dir))
    return config


def _worker_gpus(given: int | None) -> int:
    """The GPUs the workers get: ``--gpus``, else the CUDA devices torch sees here."""
    if given is not None:
        return given
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _sizes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(size) for size in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 1,2,4,8, got {text!r}") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint file (.pth/.pt)")
    parser.add_argument(
        "--arch",
        help="the checkpoint's variant (default: told from a whole module; for a state dict, "
        "the first that fits its keys, with a warning). gen-efficientnet and efficientnet_pytorch "
        f"checkpoints are accepted. One of: {', '.join(ARCHS)}",
    )
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
        choices=[AUTO, *RUNTIMES],
        default=AUTO,
        help="what serves the model (default auto: the fastest this host runs that matches fp32 "
        "TorchScript; a name pins one, an error where this host cannot run it); openvino and "
        "onnxruntime also write model.onnx beside --output",
    )
    parser.add_argument(
        "--openvino-hint",
        choices=["LATENCY", "THROUGHPUT"],
        default=ModelConfig.openvino_hint,
        help="OpenVINO's performance hint (default LATENCY: one forward at a time on every core)",
    )
    parser.add_argument(
        "--openvino-streams",
        type=int,
        default=0,
        help="OpenVINO streams (default 0: as many as the hint wants)",
    )
    parser.add_argument(
        "--check-images",
        help="directory of .npy images to check the runtimes (and, on a GPU, the GPU model) "
        "against fp32 TorchScript on (default: the demo examples and varied probes)",
    )
    parser.add_argument(
        "--reduced-tolerance",
        type=float,
        default=None,
        help=f"max abs probability difference a bf16 runtime may have to fp32 TorchScript "
        f"(default {TOLERANCES['bf16']:g}, with the same top-1 on every check image); raise it "
        "only for a model whose bf16 answers you have judged yourself",
    )
    parser.add_argument(
        "--no-optimize",
        action="store_true",
        help="serve the plain scripted model, without freeze/channels_last (the seed's baseline)",
    )
    parser.add_argument(
        "--no-onednn-fusion",
        action="store_true",
        help="serve TorchScript without oneDNN Graph fusion on the CPU (scripts/bench.sh "
        "measures both, speed and memory)",
    )
    parser.add_argument(
        "--gpu-precision",
        choices=GPU_PRECISIONS,
        default=None,
        help=f"weights and inputs on a GPU worker (default {ModelConfig.gpu_precision}, or bf16 "
        "where the GPU parity check refuses fp16 and accepts bf16; the CPU always runs fp32)",
    )
    parser.add_argument(
        "--gpu-buckets",
        type=_sizes,
        default=DEFAULT_GPU_BUCKETS,
        help="forward sizes a GPU worker pads batches to, comma-separated (default "
        f"{','.join(map(str, DEFAULT_GPU_BUCKETS))})",
    )
    parser.add_argument(
        "--gpu-parity",
        choices=("auto", "require", "off"),
        default="auto",
        help="check the GPU model on cuda:0 against fp32 on the CPU, refusing the export if "
        f"any top-1 differs or a probability moves by more than {TOLERANCES['fp16']:g} (fp16; "
        "b4serve.build.parity's table) (auto: when a GPU is here)",
    )
    parser.add_argument(
        "--gpus",
        type=int,
        help="GPUs the workers will get (default: the CUDA devices torch sees here); with any, "
        "the archive serves TorchScript, their GPU path, and no CPU runtime is timed",
    )
    parser.add_argument(
        "--choice-cache",
        help="directory of earlier runtime choices: a build of the same checkpoint and settings "
        "on the same kind of host reuses its choice instead of timing again",
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
