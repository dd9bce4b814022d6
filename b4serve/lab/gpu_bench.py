"""The GPU check's measurements, printed as a markdown table (scripts/gpu_check.sh runs this).

    python -m b4serve.lab.gpu_bench --model build/model.pt --out "$OUT"

On one GPU, with the exported model and its metadata (beside ``--model``):
- in-process: TTA images/s of the GPU path (stage, one copy, normalise and flip on the device,
  forward, probabilities back) on decoded 380x380 uint8 images, at each bucket size, in each
  precision; and how each precision's answers compare with fp32's on those images;
- the real handler through TorchServe's worker-side classes (b4serve.lab.inprocess_worker): a
  batch of good and bad ``.npy`` bodies mixed, checked request by request against the handler's
  own classifier; then its images/s at the handler batch size, with one worker process and with
  several on the same GPU (TorchServe runs each worker as its own process).

There is no frontend (no Java on the GPU machine), so the handler rows leave out the HTTP and
socket hops a served request also takes. Throughput counts each image once; TTA runs it twice.
Writes ``gpu-check.md`` and ``gpu-check.json`` into ``--out``; exits 1 if a check failed.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import queue
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from b4serve.lab.demo import generate_images
from b4serve.lab.host import cpu_name
from b4serve.lab.inprocess_worker import decode_replies, load_service, request, unpack_archive
from b4serve.serving.codec import encode_npy
from b4serve.serving.config import GPU_PRECISIONS, ModelConfig
from b4serve.serving.gpu import DTYPES, DeviceBatches, load_device_torchscript
from b4serve.serving.pipeline import WARM_UP_CALLS

__all__ = ["BEST_TTA_IMAGES_PER_S", "HANDLER_SHARE", "Report", "main", "measure"]

# The targets on an H200, one home: TTA images/s at the best bucket in fp16, and the
# handler at the handler batch size against the in-process figure at the same size.
BEST_TTA_IMAGES_PER_S = 2000.0
HANDLER_SHARE = 0.8
IMAGES_SEED = 31  # distinct from the demo's train, test and examples seeds
WORKERS_TIMEOUT_S = 600.0  # for worker processes to load, warm up and report


@dataclass
class Report:
    """Everything one run measured, as written to gpu-check.json."""

    command: str
    started: str
    host: dict[str, str]
    model: dict[str, Any]
    in_process: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # what did not run -> why
    agreement: dict[str, dict[str, float]] = field(default_factory=dict)  # vs fp32
    mixed_batch: dict[str, Any] = field(default_factory=dict)
    handler: dict[str, dict[str, float]] = field(default_factory=dict)  # workers -> figures
    checks: dict[str, bool] = field(default_factory=dict)
    seconds: float = 0.0


def timed(run: Callable[[], None], seconds: float, min_calls: int = 3) -> tuple[int, float]:
    """Call ``run`` until ``seconds`` and ``min_calls`` have both passed: (calls, seconds)."""
    calls, started = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - started < seconds:
        run()
        calls += 1
    return calls, time.perf_counter() - started


def host_facts(device: torch.device) -> dict[str, str]:
    """What this ran on, for the table's heading."""
    cpu = cpu_name()
    facts = {
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        facts["gpu"] = f"{properties.name}, {properties.total_memory / 2**30:.0f} GiB"
        facts["cuda"] = str(torch.version.cuda)
        facts["cudnn"] = str(torch.backends.cudnn.version())
    return facts


def demo_blobs(config: ModelConfig, count: int) -> tuple[list[np.ndarray], np.ndarray]:
    """``count`` demo blobs (uint8 at the input size) and their classes, never trained on."""
    per_class = -(-count // len(config.class_names))
    images, labels = generate_images(
        per_class, IMAGES_SEED, config.input_size, num_classes=min(config.num_classes, 6)
    )
    return list(images[:count]), labels[:count]


def in_process(
    model_path: Path,
    config: ModelConfig,
    device: torch.device,
    precision: str,
    images: Sequence[np.ndarray],
    seconds: float,
) -> tuple[dict[str, dict[str, float]], np.ndarray]:
    """TTA images/s and ms per batch at each bucket size in ``precision``, and the answers for
    ``images`` (one padded forward per largest bucket)."""
    model = load_device_torchscript(model_path, device, precision)
    batches = DeviceBatches(model, config, device, DTYPES[precision])
    rows: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        started = time.perf_counter()
        batches.warm_up(WARM_UP_CALLS)
        warm_up = time.perf_counter() - started
        pixels = [batches.pixels(image) for image in images]
        answers = batches.predict(pixels).numpy()
        for size in batches.sizes:
            chunk = pixels[:size]  # there are as many as the largest size
            calls, elapsed = timed(lambda chunk=chunk: batches.predict(chunk), seconds)
            rows[str(size)] = {
                "images_per_s": size * calls / elapsed,
                "ms_per_batch": elapsed / calls * 1e3,
            }
    rows["warm_up"] = {"seconds": warm_up}
    return rows, answers


def mixed_batch(
    config: ModelConfig, size: int, rng: np.random.Generator
) -> tuple[list[bytes], list[int], list[int | None]]:
    """``size`` bodies, good and bad mixed: the bodies, the status each should get, and the
    true demo class of each good one (None for the bad)."""
    side = config.input_size
    images, labels = demo_blobs(config, size)
    bodies: list[bytes] = []
    for index, image in enumerate(images):
        if index % 4 == 1:  # float32 in [0, 1]
            bodies.append(encode_npy(image.astype(np.float32) / 255.0))
        elif index % 7 == 2:  # RGBA
            alpha = np.full((side, side, 1), 255, np.uint8)
            bodies.append(encode_npy(np.concatenate([image, alpha], axis=2)))
        else:
            bodies.append(encode_npy(image))
    oversized = math.isqrt(config.max_pixels) + 1
    bad = [
        (b"not an npy body", 415),
        (b"", 400),
        (encode_npy(np.zeros((8, 8, 3), np.int64)), 400),
        (encode_npy(np.full((side, side, 3), 2.0, np.float32)), 400),
        (encode_npy(np.zeros((oversized, oversized), np.uint8)), 413),
    ]
    statuses = [200] * size
    classes: list[int | None] = [int(label) for label in labels]
    for (body, status), position in zip(
        bad, rng.choice(size, len(bad), replace=False), strict=True
    ):
        bodies[position], statuses[position], classes[position] = body, status, None
    return bodies, statuses, classes


def check_mixed_batch(service: Any, config: ModelConfig, size: int) -> dict[str, Any]:
    """Send one mixed batch through ``service``; compare each answer with what it should be."""
    bodies, expected, classes = mixed_batch(config, size, np.random.default_rng(IMAGES_SEED))
    replies = decode_replies(service.predict([request(i, b) for i, b in enumerate(bodies)]))
    statuses = [reply.status for reply in replies]
    good = [i for i, status in enumerate(expected) if status == 200]
    handler = service._entry_point.__self__  # the B4Handler TorchServe's loader built
    own = handler.classifier.classify([bodies[i] for i in good])
    difference, correct = 0.0, 0
    for index, outcome in zip(good, own, strict=True):
        if replies[index].status != 200 or outcome.probabilities is None:
            continue
        served = np.array(json.loads(replies[index].body))
        difference = max(difference, float(np.abs(served - outcome.probabilities).max()))
        correct += int(served.argmax() == classes[index])
    bad_bodies = [json.loads(replies[i].body) for i, s in enumerate(expected) if s != 200]
    return {
        "requests": size,
        "bad": size - len(good),
        "statuses_as_expected": statuses == expected,
        "statuses": statuses,
        "bad_bodies_have_a_reason": all(b.get("message") and b.get("type") for b in bad_bodies),
        "max_difference_to_in_process": difference,
        "top1_is_true_class": correct,
        "good": len(good),
    }


def _good_bodies(config: ModelConfig, size: int) -> list[bytes]:
    images, _ = demo_blobs(config, size)
    return [encode_npy(image) for image in images]


def handler_rate(service: Any, bodies: Sequence[bytes], seconds: float) -> tuple[int, float]:
    """(images, seconds) of ``service`` answering batches of ``bodies`` for ``seconds``."""
    batch = [request(i, body) for i, body in enumerate(bodies)]
    calls, elapsed = timed(lambda: service.predict(batch), seconds)
    return calls * len(bodies), elapsed


def _worker(
    model_dir: str, gpu_id: int | None, size: int, seconds: float, barrier: Any, results: Any
) -> None:
    """One worker process: load the archive, wait for the others, serve batches for a while."""
    service = load_service(Path(model_dir), gpu_id=gpu_id, batch_size=size)
    bodies = _good_bodies(ModelConfig.load(Path(model_dir)), size)
    barrier.wait(timeout=600)
    results.put(handler_rate(service, bodies, seconds))


def workers_rate(
    model_dir: Path, gpu_id: int | None, workers: int, size: int, seconds: float
) -> dict[str, float]:
    """Images/s of ``workers`` worker processes serving batches of ``size`` on one device."""
    context = multiprocessing.get_context("spawn")  # a CUDA process cannot fork a CUDA child
    barrier, results = context.Barrier(workers), context.Queue()
    processes = [
        context.Process(
            target=_worker, args=(str(model_dir), gpu_id, size, seconds, barrier, results)
        )
        for _ in range(workers)
    ]
    for process in processes:
        process.start()
    measured: list[tuple[int, float]] = []
    deadline = time.monotonic() + WORKERS_TIMEOUT_S
    try:
        while len(measured) < workers:
            try:
                measured.append(results.get(timeout=1.0))
            except queue.Empty:
                failed = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
                if failed or time.monotonic() > deadline:
                    why = f"exited with {failed[0]}" if failed else "took too long"
                    raise RuntimeError(
                        f"a worker process {why} before it reported (its output is above)"
                    ) from None
    finally:
        for process in processes:
            if process.is_alive() and len(measured) < workers:
                process.terminate()
            process.join(timeout=60)
    images = sum(count for count, _ in measured)
    elapsed = max(seconds for _, seconds in measured)
    return {"images_per_s": images / elapsed, "workers": float(workers)}


def measure(
    model_path: Path,
    config: ModelConfig,
    device: torch.device,
    *,
    precisions: Sequence[str],
    seconds: float,
    handler_batch: int,
    workers: Sequence[int],
    command: str = "",
) -> Report:
    """Every measurement of the GPU check, in one run."""
    started = time.perf_counter()
    report = Report(
        command=command,
        started=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        host=host_facts(device),
        model={
            "arch": config.arch, "input_size": config.input_size, "demo": config.demo,
            "served_precision": config.gpu_precision, "buckets": list(config.gpu_buckets),
            "gpu_parity_at_export": config.extra.get("gpu_parity", "not recorded"),
        },
    )  # fmt: skip
    images, _ = demo_blobs(config, config.gpu_buckets[-1])
    answers: dict[str, np.ndarray] = {}
    for precision in precisions:
        try:
            rows, answers[precision] = in_process(
                model_path, config, device, precision, images, seconds
            )
        except (RuntimeError, torch.jit.Error) as error:  # e.g. a precision the GPU lacks
            report.errors[precision] = str(error).strip().splitlines()[-1][:300]
            continue
        finally:
            if device.type == "cuda":  # the next precision's model starts from an empty cache
                torch.cuda.empty_cache()
        report.in_process[precision] = rows
        print(f"[gpu_bench] in-process {precision}: {_best(rows)}", file=sys.stderr)
    if "fp32" in answers:
        for precision, got in answers.items():
            reference = answers["fp32"]
            report.agreement[precision] = {
                "images": float(len(got)),
                "top1_same_as_fp32": float((got.argmax(1) == reference.argmax(1)).sum()),
                "max_difference": float(np.abs(got - reference).max()),
            }
    with tempfile.TemporaryDirectory(prefix="b4-gpu-check-") as scratch:
        model_dir = unpack_archive(Path(scratch) / "unpacked", model_path, config)
        gpu_id = device.index if device.type == "cuda" else None
        service = load_service(model_dir, gpu_id=gpu_id, batch_size=handler_batch)
        report.mixed_batch = check_mixed_batch(service, config, handler_batch)
        count, elapsed = handler_rate(service, _good_bodies(config, handler_batch), seconds)
        report.handler["1"] = {"images_per_s": count / elapsed, "workers": 1.0}
        print(f"[gpu_bench] handler, 1 worker: {_rate(count / elapsed)} images/s", file=sys.stderr)
        del service
        if device.type == "cuda":
            torch.cuda.empty_cache()
        for count in (w for w in workers if w > 1):
            try:
                report.handler[str(count)] = workers_rate(
                    model_dir, gpu_id, count, handler_batch, seconds
                )
            except RuntimeError as error:
                report.errors[f"{count} workers"] = str(error)
    mixed = report.mixed_batch
    report.checks = {
        "mixed batch: every request got its expected status": mixed["statuses_as_expected"],
        "mixed batch: every bad request's body says why": mixed["bad_bodies_have_a_reason"],
        "mixed batch: the handler answers as its classifier does (<= 1e-3)": (
            mixed["max_difference_to_in_process"] <= 1e-3
        ),
        "every measurement asked for ran": not report.errors,
    }
    report.seconds = time.perf_counter() - started
    return report


def _best(rows: dict[str, dict[str, float]]) -> str:
    size, row = max(
        ((s, r) for s, r in rows.items() if s != "warm_up"),
        key=lambda item: item[1]["images_per_s"],
    )
    return f"best {_rate(row['images_per_s'])} TTA images/s at forward size {size}"


def markdown(report: Report, handler_batch: int) -> str:
    """The report as a markdown page (its figures go into docs/GPU.md)."""
    host, model = report.host, report.model
    lines = [
        f"# GPU check: {host.get('gpu', host['device'])}",
        "",
        f"Made by `{report.command}` on {report.started}, in {report.seconds:.0f} s. "
        f"torch {host['torch']}, CUDA {host.get('cuda', '-')}, cuDNN {host.get('cudnn', '-')}, "
        f"Python {host['python']}; CPU: {host['cpu']}.",
        "",
        f"Model: {'DEMO ' if model['demo'] else ''}{model['arch']} at {model['input_size']} px, "
        f"exported on this machine; served in {model['served_precision']}, buckets "
        f"{model['buckets']}. GPU parity at export: {model['gpu_parity_at_export']}.",
        *_in_process_section(report),
        *_handler_section(report, handler_batch),
        "",
        "## Targets",
        "",
        *targets(report, handler_batch),
        "",
        "## Checks",
        "",
        *(f"- {_yes(ok)}: {name}" for name, ok in report.checks.items()),
        *(f"  - {what} did not run: {error}" for what, error in report.errors.items()),
    ]
    return "\n".join(lines) + "\n"


def _in_process_section(report: Report) -> list[str]:
    precisions = list(report.in_process)
    lines = [
        "",
        "## In-process: the GPU path on decoded uint8 images",
        "",
        "TTA images/s (each image also runs mirrored, in the same forward), and ms per batch.",
        "",
        "| forward size | " + " | ".join(precisions) + " |",
        "|---:|" + "---:|" * len(precisions),
    ]
    sizes = [s for s in next(iter(report.in_process.values()), {}) if s != "warm_up"]
    for size in sizes:
        cells = []
        for precision in precisions:
            row = report.in_process[precision].get(size)
            cells.append(
                f"{_rate(row['images_per_s'])} ({row['ms_per_batch']:.1f} ms)" if row else "-"
            )
        lines.append(f"| {size} | " + " | ".join(cells) + " |")
    warm = [f"{report.in_process[p]['warm_up']['seconds']:.1f} s" for p in precisions]
    lines.append("| warm-up, all sizes | " + " | ".join(warm) + " |")
    if report.agreement:
        lines += [
            "",
            "Answers on the same images against fp32's:",
            "",
            "| precision | images | same top-1 as fp32 | max \\|probability difference\\| |",
            "|---|---:|---:|---:|",
        ]
        for precision, figures in report.agreement.items():
            lines.append(
                f"| {precision} | {figures['images']:.0f} | {figures['top1_same_as_fp32']:.0f} | "
                f"{figures['max_difference']:.2e} |"
            )
    return lines


def _handler_section(report: Report, handler_batch: int) -> list[str]:
    served = report.model["served_precision"]
    in_process = _in_process_rate(report, handler_batch)
    lines = [
        "",
        f"## The handler through TorchServe's worker-side classes, batch {handler_batch}",
        "",
        f"No frontend: these leave out HTTP and the worker socket. In-process at {handler_batch} "
        f"({served}): " + (f"{_rate(in_process)} TTA images/s." if in_process else "not measured."),
        "",
        "| worker processes on the GPU | images/s | / in-process |",
        "|---:|---:|---:|",
    ]
    for workers, figures in report.handler.items():
        share = f"{figures['images_per_s'] / in_process:.2f}" if in_process else "-"
        lines.append(f"| {workers} | {_rate(figures['images_per_s'])} | {share} |")
    mixed = report.mixed_batch
    lines += [
        "",
        f"Mixed batch: {mixed['requests']} requests, {mixed['bad']} of them bad (not .npy, empty, "
        "int64, float out of range, too large) at random places. Every status as expected: "
        f"{_yes(mixed['statuses_as_expected'])}; every bad body says why: "
        f"{_yes(mixed['bad_bodies_have_a_reason'])}; max |probability difference| to the "
        f"handler's own classifier on the good ones: {mixed['max_difference_to_in_process']:.1e}; "
        f"top-1 is the true demo class on {mixed['top1_is_true_class']} of {mixed['good']}.",
    ]
    return lines


def _in_process_rate(report: Report, size: int) -> float | None:
    served = report.in_process.get(report.model["served_precision"], {})
    return served.get(str(size), {}).get("images_per_s")


def targets(report: Report, handler_batch: int) -> list[str]:
    """The issue's targets, each with the figure measured and whether it was met."""
    found = []
    fp16 = report.in_process.get("fp16")
    if fp16:
        best = max(r["images_per_s"] for s, r in fp16.items() if s != "warm_up")
        met = best >= BEST_TTA_IMAGES_PER_S
        found.append(f"- fp16 in-process at the best bucket >= {BEST_TTA_IMAGES_PER_S:,.0f} TTA "
                     f"images/s: {_rate(best)}, {'met' if met else 'missed'}")  # fmt: skip
    in_process = _in_process_rate(report, handler_batch)
    one = report.handler.get("1", {}).get("images_per_s")
    if in_process and one:
        share = one / in_process
        found.append(f"- the handler at batch {handler_batch} >= {HANDLER_SHARE}x in-process: "
                     f"{share:.2f}x, {'met' if share >= HANDLER_SHARE else 'missed'}")  # fmt: skip
    found.append(f"- fp16 parity at export: {report.model['gpu_parity_at_export']}")
    return found


def _rate(images_per_s: float) -> str:
    return f"{images_per_s:,.0f}" if images_per_s >= 100 else f"{images_per_s:.3g}"


def _yes(ok: bool) -> str:
    return "yes" if ok else "NO"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m b4serve.lab.gpu_bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--model", type=Path, required=True, help="exported model.pt")
    parser.add_argument("--meta-dir", type=Path, help="its metadata (default: beside --model)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the md and json")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--precisions", default="fp32,fp16,bf16")
    parser.add_argument("--seconds", type=float, default=1.5, help="length of each timed row")
    parser.add_argument("--handler-batch", type=int, default=64)
    parser.add_argument("--workers", default="1,2", help="worker processes to measure")
    parser.add_argument("--command", default="", help="the command to quote in the report")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    config = ModelConfig.load(args.meta_dir or args.model.parent)
    precisions = [p for p in args.precisions.split(",") if p]
    unknown = sorted(set(precisions) - set(GPU_PRECISIONS))
    if unknown:
        print(f"gpu_bench: error: unknown precisions {unknown}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"gpu_bench: error: no CUDA device here for --device {args.device}", file=sys.stderr)
        return 2
    report = measure(
        args.model, config, device, precisions=precisions, seconds=args.seconds,
        handler_batch=args.handler_batch, workers=[int(w) for w in args.workers.split(",")],
        command=args.command or " ".join(["python -m b4serve.lab.gpu_bench", *(argv or [])]),
    )  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu-check.md").write_text(markdown(report, args.handler_batch))
    (args.out / "gpu-check.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    print(markdown(report, args.handler_batch))
    return 0 if all(report.checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
