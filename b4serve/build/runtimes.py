"""Choose the runtime an archive serves with: build the candidates this host can run, prove each
against fp32 TorchScript, time them side by side, keep the fastest (``--runtime auto``).

    python -m b4serve.build.runtimes describe BUILD/extra     # what a build chose, and why

Parity is on TTA probabilities, the served output, on a check set: the demo examples and varied
probes, or the user's own ``.npy`` images. fp32 runtimes must agree within
:data:`FP32_TOLERANCE`; reduced precision within :data:`REDUCED_TOLERANCE` and with the same
top-1 on every image, or it is excluded with its reason. Speeds are per-forward medians of
interleaved calls (each image goes through every candidate in turn), at micro-batch 1 as served,
so a slow spell of a shared machine falls on all of them alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from b4serve.build.check_images import DEMO_CLASSES, EXAMPLES_SEED, generate_images
from b4serve.serving.allocator import keep_freed_memory
from b4serve.serving.codec import decode_npy
from b4serve.serving.config import ModelConfig
from b4serve.serving.errors import InferenceError
from b4serve.serving.pipeline import Classifier
from b4serve.serving.preprocess import Preprocessor
from b4serve.serving.runtime import (
    MODEL_FILE,
    ONNX_FILE,
    REFERENCE,
    RUNTIMES,
    HostCaps,
    host_caps,
    load_runtime,
    load_torchscript,
    openvino_has_bf16,
    runtime_spec,
    unsupported,
)

__all__ = [
    "AUTO",
    "FP32_TOLERANCE",
    "REDUCED_TOLERANCE",
    "Candidate",
    "RuntimeChoiceError",
    "Selection",
    "check_set",
    "choose_runtime",
    "evaluate",
]

AUTO = "auto"
FP32_TOLERANCE = 1e-4  # max abs difference of TTA probabilities to fp32 TorchScript
REDUCED_TOLERANCE = 2e-2  # bf16: and the same top-1 on every check image
MAX_CHECK_IMAGES = 24  # of the user's --check-images; more adds build time, not much proof
DEMO_EXAMPLES_PER_CLASS = 1
# Timing: every candidate gets at least this many timed forwards (the parity pass counts), as
# long as the timing rounds stay within TIMING_BUDGET_S in all.
MIN_TIMED_FORWARDS = 16
TIMING_BUDGET_S = 8.0
# Idle time before each timed forward. ONNX Runtime's and OpenVINO's threads spin on the cores
# for a while after a forward; the next candidate, timed at once, ran 40% slower (measured:
# TorchScript 80 ms alone, 112 ms right after an ONNX Runtime forward, 80 ms after 50 ms idle).
SETTLE_S = 0.05


class RuntimeChoiceError(ValueError):  # export_torchscript reports a ValueError in one line
    """A runtime that cannot be used: not runnable here, or failed its parity check."""


@dataclass
class Candidate:
    """One runtime tried on this host: its precision, parity, speed, and why it was excluded."""

    runtime: str
    precision: str = ""
    max_abs_diff: float | None = None
    same_top1: int = 0
    images: int = 0
    seconds: list[float] = field(default_factory=list, repr=False)  # one per timed forward
    excluded: str = ""  # why it may not serve ("": eligible)

    @property
    def images_per_s(self) -> float | None:
        """TTA images per second at micro-batch 1: one over the median forward."""
        return 1.0 / statistics.median(self.seconds) if self.seconds else None

    def as_dict(self) -> dict[str, Any]:
        speed = self.images_per_s
        return {
            "runtime": self.runtime,
            "precision": self.precision,
            "tta_images_per_s": None if speed is None else round(speed, 3),
            "timed_forwards": len(self.seconds),
            "max_abs_diff": None
            if self.max_abs_diff is None
            else float(f"{self.max_abs_diff:.3g}"),
            "same_top1": f"{self.same_top1}/{self.images}",
            "excluded": self.excluded,
        }

    def line(self) -> str:
        """One line for the build's output."""
        speed = self.images_per_s
        parts = [f"{self.runtime:<17}", f"{self.precision or '-':<5}"]
        parts.append(f"{speed:6.2f} TTA img/s" if speed else f"{'-':>6} TTA img/s")
        if self.max_abs_diff is not None:
            parts.append(
                f"max |diff| {self.max_abs_diff:.2e}, top-1 {self.same_top1}/{self.images}"
            )
        if self.excluded:
            parts.append(f"EXCLUDED: {self.excluded}")
        return "  ".join(parts)


@dataclass
class Selection:
    """The runtime chosen, the config fields it sets, and the record kept in the metadata."""

    runtime: str
    settings: dict[str, Any]  # ModelConfig fields: runtime, openvino_precision, runtime_choice
    candidates: list[Candidate]


# --- the check set ------------------------------------------------------------------------


def probe_images(size: int) -> list[tuple[str, np.ndarray]]:
    """Varied inputs the server accepts: flat, extreme, noisy, striped, resized, float, grey."""
    rng = np.random.default_rng(7)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    gradient = np.stack([np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size)),
                         np.full((size, size), 128.0, np.float32)], axis=2)  # fmt: skip
    squares = (np.indices((size, size)).sum(axis=0) // 16 % 2 * 255).astype(np.uint8)
    return [
        ("black", np.zeros((size, size, 3), np.uint8)),
        ("white", np.full((size, size, 3), 255, np.uint8)),
        ("noise", rng.integers(0, 256, (size, size, 3), dtype=np.uint8)),
        ("gradient", gradient.astype(np.uint8)),
        ("checkerboard grey", squares),
        ("small float, resized", rng.random((97, 131, 3), dtype=np.float32)),
    ]


def check_set(
    config: ModelConfig, directory: str | Path | None = None
) -> list[tuple[str, torch.Tensor]]:
    """Named, preprocessed images for the parity check: the user's ``.npy`` files in
    ``directory`` (the first :data:`MAX_CHECK_IMAGES` by name), else the demo examples and
    :func:`probe_images`."""
    if directory is not None:
        paths = sorted(Path(directory).glob("*.npy"))[:MAX_CHECK_IMAGES]
        if not paths:
            raise RuntimeChoiceError(f"--check-images {directory}: no .npy files there")
        preprocess = Preprocessor(config)
        found = []
        for path in paths:
            try:  # as the server would take it
                found.append(
                    (path.name, preprocess(decode_npy(path.read_bytes(), config.max_pixels)))
                )
            except InferenceError as error:
                raise RuntimeChoiceError(
                    f"--check-images: the server would refuse {path}: {error}"
                ) from None
        return found

    images, labels = generate_images(DEMO_EXAMPLES_PER_CLASS, EXAMPLES_SEED, config.input_size)
    named = [
        (f"demo {DEMO_CLASSES[label]}", image) for image, label in zip(images, labels, strict=True)
    ]
    preprocess = Preprocessor(config)
    return [(name, preprocess(image)) for name, image in named + probe_images(config.input_size)]


# --- evaluation ---------------------------------------------------------------------------


def evaluate(
    build: Path,
    config: ModelConfig,
    runtimes: Sequence[str],
    images: Sequence[tuple[str, torch.Tensor]],
    *,
    min_forwards: int = MIN_TIMED_FORWARDS,
    budget_s: float = TIMING_BUDGET_S,
    reduced_tolerance: float = REDUCED_TOLERANCE,
    host: HostCaps | None = None,
    log: Callable[[str], None] = print,
) -> list[Candidate]:
    """Each of ``runtimes`` (files in ``build``) against fp32 TorchScript on ``images``, timed
    side by side. A candidate that fails to load, or its parity check, is excluded."""
    cpu = torch.device("cpu")
    # The worker's allocator setting: glibc's defaults page-fault every TorchScript forward
    # anew (TorchScript 109 ms a forward here without it, 80 ms with it, measured), while ONNX
    # Runtime and OpenVINO keep their own arenas, so without it TorchScript is timed unfairly.
    keep_freed_memory(config.malloc_keep_mb)
    tensors = [tensor for _, tensor in images]
    phases: list[str] = []
    began = time.perf_counter()
    # The reference: fp32 TorchScript, frozen and without fusion. The plain scripted model
    # (which export checked against the eager one) gives the same to ~1e-6, 5-10x slower.
    reference = Classifier(load_torchscript(build / RUNTIMES[REFERENCE].file, cpu, fuse=False),
                           dataclasses.replace(config, runtime=REFERENCE), cpu)  # fmt: skip
    expected = torch.cat([reference.predict([tensor]) for tensor in tensors])
    del reference
    began = _phase(phases, "reference", began)

    candidates = [Candidate(name, precision) for name, precision in variants(runtimes, host)]
    loaded: list[tuple[Candidate, Classifier]] = []
    for candidate in candidates:
        settings = dataclasses.replace(config, runtime=candidate.runtime)
        if candidate.runtime == "openvino":
            settings = dataclasses.replace(settings, openvino_precision=candidate.precision)
        try:
            model = load_runtime(candidate.runtime, build, settings, cpu)
            classifier = Classifier(model, settings, cpu)
            classifier.warm_up()
            began = _phase(phases, f"load {candidate.runtime} {candidate.precision}", began)
        except Exception as error:  # whatever it was, this runtime cannot serve here: say why
            candidate.excluded = f"failed to load: {type(error).__name__}: {error}"[:300]
            log(f"  {candidate.runtime} excluded: {candidate.excluded}")
            continue
        loaded.append((candidate, classifier))

    # the parity pass: every image through every candidate in turn, each forward timed
    outputs: list[list[torch.Tensor]] = [[] for _ in loaded]
    for tensor in tensors:
        for (candidate, classifier), found in zip(loaded, outputs, strict=True):
            found.append(_timed(candidate, classifier, tensor))
    for (candidate, _), found in zip(loaded, outputs, strict=True):
        _judge(candidate, torch.cat(found), expected, reduced_tolerance)
    began = _phase(phases, "parity pass", began)
    # more interleaved forwards, for a steadier median, within the budget (none to rank alone)
    started = time.perf_counter()
    timing = [(c, classifier) for c, classifier in loaded if not c.excluded]
    timing = timing if len(timing) > 1 else []
    index = 0
    while any(len(c.seconds) < min_forwards for c, _ in timing):
        if time.perf_counter() - started > budget_s:
            break
        for candidate, classifier in timing:
            _timed(candidate, classifier, tensors[index % len(tensors)])
        index += 1
    _phase(phases, "timing", began)
    log(f"  seconds: {', '.join(phases)}")
    return candidates


def _phase(phases: list[str], name: str, began: float) -> float:
    now = time.perf_counter()
    phases.append(f"{name} {now - began:.1f}")
    return now


def variants(runtimes: Sequence[str], host: HostCaps | None = None) -> list[tuple[str, str]]:
    """(runtime, precision) to try: OpenVINO in bf16 where its CPU plugin has it (and ``host``
    has bf16 instructions) and in fp32 (if bf16 fails its check, fp32 may still beat the
    others); the rest in their one precision."""
    host = host or host_caps()
    found = []
    for runtime in runtimes:
        if runtime == "openvino":
            bf16 = host.bf16 and openvino_has_bf16()
            found += [(runtime, p) for p in (("bf16", "fp32") if bf16 else ("fp32",))]
        else:
            found.append((runtime, RUNTIMES[runtime].precision))
    return found


def _settle() -> None:
    """Idle :data:`SETTLE_S`: the previous candidate's threads stop spinning."""
    time.sleep(SETTLE_S)


def _timed(candidate: Candidate, classifier: Classifier, tensor: torch.Tensor) -> torch.Tensor:
    """``classifier``'s TTA probabilities for one image; its time is kept in ``candidate``."""
    _settle()
    started = time.perf_counter()
    probabilities = classifier.predict([tensor])
    candidate.seconds.append(time.perf_counter() - started)
    return probabilities


def _judge(
    candidate: Candidate, got: torch.Tensor, expected: torch.Tensor, reduced_tolerance: float
) -> None:
    """Record ``candidate``'s parity and exclude it when outside its precision's tolerance."""
    difference = (got - expected).abs().max().item()
    candidate.max_abs_diff = difference
    candidate.images = len(expected)
    candidate.same_top1 = int((got.argmax(1) == expected.argmax(1)).sum())
    reduced = candidate.precision == "bf16"
    tolerance = reduced_tolerance if reduced else FP32_TOLERANCE
    if not difference <= tolerance:  # also catches NaN
        candidate.excluded = (
            f"max abs probability difference {difference:.3g} to fp32 TorchScript is over "
            f"{tolerance:g} ({candidate.precision or 'fp32'})"
        )
    elif reduced and candidate.same_top1 != candidate.images:
        candidate.excluded = (
            f"top-1 differs from fp32 TorchScript on {candidate.images - candidate.same_top1} "
            f"of {candidate.images} check images"
        )


# --- the choice ---------------------------------------------------------------------------


def choose_runtime(
    requested: str,
    model: nn.Module,
    config: ModelConfig,
    scripted: Path,
    *,
    check_images: str | Path | None = None,
    reduced_tolerance: float = REDUCED_TOLERANCE,
    host: HostCaps | None = None,
    export: Callable[[nn.Module, ModelConfig, Path], float] | None = None,
    log: Callable[[str], None] = print,
) -> Selection:
    """The runtime to serve ``model`` (scripted in ``scripted``) with: ``requested`` (a name:
    pinned, an error where this host cannot run it or it fails its parity check), or the fastest
    eligible candidate (``auto``). Writes what the candidates need (``model.onnx``, by
    ``export``: default b4serve.build.onnx_export.export_onnx) beside ``scripted``."""
    host = host or host_caps()
    if requested != AUTO:
        runtime_spec(requested)  # unknown names: ValueError
        refused = unsupported(requested, host)
        if refused:
            raise RuntimeChoiceError(
                f"--runtime {requested} cannot run on this host: {refused.reason}"
            )
        runtimes, skipped = [requested], {}
    else:
        runtimes = [name for name in RUNTIMES if unsupported(name, host) is None]
        skipped = {name: unsupported(name, host) for name in RUNTIMES if name not in runtimes}
    record: dict[str, Any] = {"mode": "pinned" if requested != AUTO else AUTO,
                              "host": host.summary()}  # fmt: skip
    if runtimes == [REFERENCE]:  # pinned to the reference itself: nothing to compare it with
        log(f"runtime {REFERENCE} (pinned): the fp32 reference, no parity check needed")
        return Selection(REFERENCE, {"runtime": REFERENCE, "runtime_choice": record}, [])
    started = time.perf_counter()
    onnx = scripted.with_name(ONNX_FILE)
    if any(RUNTIMES[name].file == ONNX_FILE for name in runtimes):
        if export is None:
            from b4serve.build.onnx_export import (
                export_onnx as export,  # only ONNX runtimes need it
            )
        difference = export(model, config, onnx)
        log(f"exported ONNX to {onnx} in {time.perf_counter() - started:.1f} s; max abs "
            f"probability difference to eager {difference:.2e}, same top-1")  # fmt: skip
    images = check_set(config, check_images)
    source = f"{len(images)} of {check_images}" if check_images else f"{len(images)} demo/probe"
    log(f"checking {', '.join(runtimes)} against fp32 TorchScript on {source} images")
    with tempfile.TemporaryDirectory(prefix="b4-runtimes-") as workspace:
        # the runtimes' files under the names an archive gives them (--output may name another)
        build = Path(workspace)
        (build / MODEL_FILE).symlink_to(scripted.resolve())
        if onnx.is_file():
            (build / ONNX_FILE).symlink_to(onnx.resolve())
        candidates = evaluate(
            build, config, runtimes, images, reduced_tolerance=reduced_tolerance, host=host,
            log=log,
        )  # fmt: skip
    candidates += [Candidate(name, excluded=why.reason) for name, why in skipped.items() if why]
    for candidate in candidates:
        log(f"  {candidate.line()}")
    chosen = pick(candidates, None if requested == AUTO else requested)
    record |= {
        "chosen": chosen.runtime,
        "check_images": source,
        "tolerances": {"fp32": FP32_TOLERANCE, "bf16": reduced_tolerance},
        "seconds": round(time.perf_counter() - started, 1),
        "candidates": [c.as_dict() for c in candidates],
    }
    log(
        f"runtime {chosen.runtime} ({record['mode']}; {chosen.precision}, "
        f"{chosen.images_per_s:.2f} TTA img/s in-process; choice took {record['seconds']} s)"
    )
    settings: dict[str, Any] = {"runtime": chosen.runtime, "runtime_choice": record}
    if chosen.runtime == "openvino":
        settings["openvino_precision"] = chosen.precision
    return Selection(chosen.runtime, settings, candidates)


def pick(candidates: Sequence[Candidate], pinned: str | None = None) -> Candidate:
    """The fastest eligible candidate. With ``pinned``, an error if none is eligible; under
    auto, an error if fp32 TorchScript itself is not (then the export is broken)."""
    eligible = [c for c in candidates if not c.excluded and c.images_per_s]
    if pinned is not None and not eligible:
        failed = "; ".join(f"{c.runtime} {c.precision}: {c.excluded}" for c in candidates)
        raise RuntimeChoiceError(f"--runtime {pinned} failed its check: {failed}")
    if pinned is None and REFERENCE not in [c.runtime for c in eligible]:
        reasons = "; ".join(f"{c.runtime}: {c.excluded}" for c in candidates if c.excluded)
        raise RuntimeChoiceError(f"fp32 TorchScript does not match the scripted model: {reasons}")
    return max(eligible, key=lambda c: c.images_per_s or 0.0)


def place_runtime_file(runtime: str, scripted: Path, directory: Path) -> Path | None:
    """Put ``runtime``'s file, written beside ``scripted``, into ``directory`` too (a hard link
    where the file system allows, else a copy); None for the TorchScript runtimes' model.pt."""
    name = RUNTIMES[runtime].file
    if name == MODEL_FILE:
        return None
    source, target = scripted.with_name(name), directory / name
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:  # another file system
        shutil.copyfile(source, target)
    return target


# --- reading a build's choice -------------------------------------------------------------


def describe(config: ModelConfig) -> str:
    """A few lines saying which runtime a build serves with and how it was chosen."""
    choice = config.runtime_choice
    took = f", chosen in {choice['seconds']} s" if "seconds" in choice else ""
    lines = [f"runtime: {config.runtime} ({choice.get('mode', 'pinned')}{took})"]
    host = choice.get("host")
    if host:
        have = ", ".join(name for name, on in host.items() if on)
        lines[0] += f" on a CPU with {have or 'none of ' + ', '.join(host)}"
    for entry in choice.get("candidates", []):
        speed = entry["tta_images_per_s"]
        text = f"  {entry['runtime']}: {entry['precision'] or '-'}, "
        text += f"{speed:.2f} TTA img/s" if speed else "not timed"
        if entry["max_abs_diff"] is not None:
            text += f", max |diff| {entry['max_abs_diff']:.2e}, top-1 {entry['same_top1']}"
        if entry["excluded"]:
            text += f", excluded: {entry['excluded']}"
        lines.append(text)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m b4serve.build.runtimes", description=__doc__)
    parser.add_argument("command", choices=["describe"])
    parser.add_argument("meta_dir", type=Path, help="where the build's model_meta.json is")
    args = parser.parse_args(argv)
    config = ModelConfig.load(args.meta_dir)
    print(describe(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
