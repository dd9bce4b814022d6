"""Choose the runtime an archive serves with: build the candidates this host can run, prove each
against fp32 TorchScript, time them side by side, and keep fp32 TorchScript unless another is
clearly faster (``--runtime auto``).

    python -m b4serve.build.runtimes describe BUILD/extra     # what a build chose, and why

Parity is b4serve.build.parity's: TTA probabilities, the served output, on its check set (or the
user's own ``.npy`` images), each candidate within its precision's tolerance. Speeds are
per-forward medians of interleaved calls (each image goes through every candidate in turn), at
micro-batch 1 as served, so a slow spell of a shared machine falls on all of them alike.

A candidate replaces the incumbent (fp32 TorchScript, or this checkpoint's earlier choice on
this kind of host) only when it is faster by more than :data:`MIN_GAIN` and by more than the
spread of either one's own timed forwards, so two builds on one host choose alike. The choice is
cached (``cache_dir``) by checkpoint, settings, CPU model and flags, and package versions: a
repeat build on the same kind of host reads it instead of timing. Where the workers get GPUs,
nothing is timed: TorchScript, the only runtime with a GPU path, serves.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import importlib.metadata
import json
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

import torch
from torch import nn

from b4serve.build.parity import QUANTITY, agreement, check_images, tolerance
from b4serve.serving.allocator import keep_freed_memory
from b4serve.serving.config import ModelConfig
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
    openvino_runs_bf16,
    runtime_spec,
    unsupported,
)

__all__ = [
    "AUTO",
    "MIN_GAIN",
    "Candidate",
    "RuntimeChoiceError",
    "Selection",
    "Timer",
    "check_set",
    "choice_identity",
    "choose_runtime",
    "evaluate",
    "pick",
]

AUTO = "auto"
# A candidate must beat the incumbent by this much at least, and by more than the spread of
# either's timed forwards: fp32 candidates sat 5% apart with more spread than that between
# rounds, so max() alone flipped between builds of one checkpoint (issue 22).
MIN_GAIN = 0.05
# Timing: every candidate gets at least this many timed forwards (the parity pass counts), as
# long as the timing rounds stay within TIMING_BUDGET_S in all.
MIN_TIMED_FORWARDS = 16
TIMING_BUDGET_S = 8.0
# Idle time before each timed forward. ONNX Runtime's and OpenVINO's threads spin on the cores
# for a while after a forward; the next candidate, timed at once, ran 40% slower (measured:
# TorchScript 80 ms alone, 112 ms right after an ONNX Runtime forward, 80 ms after 50 ms idle).
SETTLE_S = 0.05
# The packages whose versions change what a runtime computes and how fast: a new one re-times.
TIMED_PACKAGES = ("torch", "openvino", "onnxruntime")
# ModelConfig fields the choice itself sets: not part of what it is chosen for.
_CHOICE_FIELDS = ("runtime", "openvino_precision", "runtime_choice", "extra")

progress = functools.partial(print, flush=True)  # deploy shows it as it comes


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

    @property
    def spread(self) -> float:
        """How much its own timed forwards vary: their interquartile range over their median
        (0 with fewer than two)."""
        if len(self.seconds) < 2:
            return 0.0
        low, _, high = statistics.quantiles(self.seconds, n=4)
        return (high - low) / statistics.median(self.seconds)

    def as_dict(self) -> dict[str, Any]:
        speed = self.images_per_s
        return {
            "runtime": self.runtime,
            "precision": self.precision,
            "tta_images_per_s": None if speed is None else round(speed, 3),
            "spread": round(self.spread, 3),
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
        if speed:
            parts.append(
                f"{speed:6.2f} TTA img/s (spread {self.spread:.0%}; {len(self.seconds)} forwards "
                f"in {sum(self.seconds):.1f} s)"
            )
        else:
            parts.append(f"{'-':>6} TTA img/s")
        if self.max_abs_diff is not None:
            parts.append(
                f"max |diff| {self.max_abs_diff:.2e}, top-1 {self.same_top1}/{self.images}"
            )
        if self.excluded:
            parts.append(f"EXCLUDED: {self.excluded}")
        return "  ".join(parts)

    @property
    def key(self) -> tuple[str, str]:
        return self.runtime, self.precision


@dataclass
class Selection:
    """The runtime chosen, the config fields it sets, and the record kept in the metadata."""

    runtime: str
    settings: dict[str, Any]  # ModelConfig fields: runtime, openvino_precision, runtime_choice
    candidates: list[Candidate]


# --- the check set ------------------------------------------------------------------------


def check_set(
    config: ModelConfig, directory: str | Path | None = None
) -> list[tuple[str, torch.Tensor]]:
    """The check set of b4serve.build.parity (or the user's images in ``directory``), named and
    preprocessed as the worker does."""
    preprocess = Preprocessor(config)
    return [(name, preprocess(image)) for name, image in check_images(config, directory)]


# --- evaluation ---------------------------------------------------------------------------

# Runs one forward of a candidate and says how long it took: (probabilities, seconds). The
# default is :func:`stopwatch`; a test gives its own timings here, with the real forward.
Timer = Callable[[Candidate, Callable[[], torch.Tensor]], tuple[torch.Tensor, float]]


def stopwatch(
    candidate: Candidate, forward: Callable[[], torch.Tensor]
) -> tuple[torch.Tensor, float]:
    """``forward()``'s output and wall-clock seconds, after :func:`_settle`."""
    _settle()
    started = time.perf_counter()
    probabilities = forward()
    return probabilities, time.perf_counter() - started


def evaluate(
    build: Path,
    config: ModelConfig,
    runtimes: Sequence[str],
    images: Sequence[tuple[str, torch.Tensor]],
    *,
    min_forwards: int = MIN_TIMED_FORWARDS,
    budget_s: float = TIMING_BUDGET_S,
    reduced_tolerance: float | None = None,
    host: HostCaps | None = None,
    timer: Timer = stopwatch,
    log: Callable[[str], None] = progress,
) -> list[Candidate]:
    """Each of ``runtimes`` (files in ``build``) against fp32 TorchScript on ``images``, timed
    side by side. A candidate that fails to load, or its parity check, is excluded."""
    cpu = torch.device("cpu")
    # The worker's allocator setting: glibc's defaults page-fault every TorchScript forward
    # anew (TorchScript 109 ms a forward here without it, 80 ms with it, measured), while ONNX
    # Runtime and OpenVINO keep their own arenas, so without it TorchScript is timed unfairly.
    keep_freed_memory(config.malloc_keep_mb)
    tensors = [tensor for _, tensor in images]
    began = time.perf_counter()
    log(f"  runtime choice: the fp32 reference on {len(tensors)} check images ...")
    # The reference: fp32 TorchScript, frozen and without fusion. The plain scripted model
    # (which export checked against the eager one) gives the same to ~1e-6, 5-10x slower.
    reference = Classifier(load_torchscript(build / RUNTIMES[REFERENCE].file, cpu, fuse=False),
                           dataclasses.replace(config, runtime=REFERENCE), cpu)  # fmt: skip
    expected = torch.cat([reference.predict([tensor]) for tensor in tensors])
    del reference
    began = _took(log, "reference", began)

    candidates = [Candidate(name, precision) for name, precision in variants(runtimes, host)]
    loaded: list[tuple[Candidate, Classifier]] = []
    for candidate in candidates:
        settings = dataclasses.replace(config, runtime=candidate.runtime)
        if candidate.runtime == "openvino":
            settings = dataclasses.replace(settings, openvino_precision=candidate.precision)
        log(f"  runtime choice: loading {candidate.runtime} {candidate.precision} ...")
        try:
            model = load_runtime(candidate.runtime, build, settings, cpu)
            classifier = Classifier(model, settings, cpu)
            classifier.warm_up()
        except Exception as error:  # whatever it was, this runtime cannot serve here: say why
            candidate.excluded = f"failed to load: {type(error).__name__}: {error}"[:300]
            log(f"  {candidate.runtime} excluded: {candidate.excluded}")
            continue
        began = _took(log, f"{candidate.runtime} {candidate.precision} loaded", began)
        loaded.append((candidate, classifier))

    # the parity pass: every image through every candidate in turn, each forward timed
    names = ", ".join(f"{c.runtime} {c.precision}" for c, _ in loaded)
    log(f"  runtime choice: parity and timing of {names}, interleaved ...")
    outputs: list[list[torch.Tensor]] = [[] for _ in loaded]
    for tensor in tensors:
        for (candidate, classifier), found in zip(loaded, outputs, strict=True):
            found.append(_timed(timer, candidate, classifier, tensor))
    for (candidate, _), found in zip(loaded, outputs, strict=True):
        _judge(candidate, torch.cat(found), expected, reduced_tolerance)
    # more interleaved forwards, for a steadier median, within the budget (none to rank alone)
    started = time.perf_counter()
    timing = [(c, classifier) for c, classifier in loaded if not c.excluded]
    timing = timing if len(timing) > 1 else []
    index = 0
    while any(len(c.seconds) < min_forwards for c, _ in timing):
        if time.perf_counter() - started > budget_s:
            break
        for candidate, classifier in timing:
            _timed(timer, candidate, classifier, tensors[index % len(tensors)])
        index += 1
    _took(log, "parity and timing", began)
    return candidates


def _took(log: Callable[[str], None], what: str, began: float) -> float:
    now = time.perf_counter()
    log(f"  runtime choice: {what} in {now - began:.1f} s")
    return now


def variants(runtimes: Sequence[str], host: HostCaps | None = None) -> list[tuple[str, str]]:
    """(runtime, precision) to try: OpenVINO in bf16 where its CPU plugin has it (and ``host``
    has bf16 instructions) and in fp32 (if bf16 fails its check, fp32 may still beat the
    others); the rest in their one precision."""
    host = host or host_caps()
    found = []
    for runtime in runtimes:
        if runtime == "openvino":
            bf16 = openvino_runs_bf16(host)
            found += [(runtime, p) for p in (("bf16", "fp32") if bf16 else ("fp32",))]
        else:
            found.append((runtime, RUNTIMES[runtime].precision))
    return found


def _settle() -> None:
    """Idle :data:`SETTLE_S`: the previous candidate's threads stop spinning."""
    time.sleep(SETTLE_S)


def _timed(
    timer: Timer, candidate: Candidate, classifier: Classifier, tensor: torch.Tensor
) -> torch.Tensor:
    """``classifier``'s TTA probabilities for one image; its time is kept in ``candidate``."""
    probabilities, seconds = timer(candidate, lambda: classifier.predict([tensor]))
    candidate.seconds.append(seconds)
    return probabilities


def _judge(
    candidate: Candidate,
    got: torch.Tensor,
    expected: torch.Tensor,
    reduced_tolerance: float | None = None,
) -> None:
    """Record ``candidate``'s parity and exclude it when b4serve.build.parity refuses it."""
    found = agreement(got, expected, candidate.precision or "fp32", reduced_tolerance)
    candidate.max_abs_diff = found.max_difference
    candidate.images = found.images
    candidate.same_top1 = found.images - len(found.top1_mismatches)
    if not found.passed:
        candidate.excluded = f"against fp32 TorchScript: {found.failure()}"


# --- the choice ---------------------------------------------------------------------------


def choose_runtime(
    requested: str,
    model: nn.Module,
    config: ModelConfig,
    scripted: Path,
    *,
    check_images: str | Path | None = None,
    reduced_tolerance: float | None = None,
    host: HostCaps | None = None,
    gpus: int = 0,
    cache_dir: Path | None = None,
    timer: Timer = stopwatch,
    export: Callable[[nn.Module, ModelConfig, Path], float] | None = None,
    log: Callable[[str], None] = progress,
) -> Selection:
    """The runtime to serve ``model`` (scripted in ``scripted``) with: ``requested`` (a name:
    pinned, an error where this host cannot run it or it fails its parity check), or under
    ``auto`` fp32 TorchScript unless a candidate is clearly faster (:func:`pick`). Where the
    workers get ``gpus`` GPUs, TorchScript (their GPU path), untimed. A choice found in
    ``cache_dir`` for the same :func:`choice_identity` is reused untimed. Writes what the
    candidates need (``model.onnx``, by ``export``: default
    b4serve.build.onnx_export.export_onnx) beside ``scripted``."""
    host = host or host_caps()
    record: dict[str, Any] = {"mode": "pinned" if requested != AUTO else AUTO,
                              "host": host.summary(), "cpu": host.kind()}  # fmt: skip
    if requested != AUTO:
        runtime_spec(requested)  # unknown names: ValueError
    if gpus > 0:
        return _for_gpu_workers(requested, config, gpus, record, log)
    if requested != AUTO:
        refused = unsupported(requested, host)
        if refused:
            raise RuntimeChoiceError(
                f"--runtime {requested} cannot run on this host: {refused.reason}"
            )
        runtimes, skipped = [requested], {}
    else:
        runtimes = [name for name in RUNTIMES if unsupported(name, host) is None]
        skipped = {name: unsupported(name, host) for name in RUNTIMES if name not in runtimes}
    if runtimes == [REFERENCE]:  # pinned to the reference itself: nothing to compare it with
        log(f"runtime {REFERENCE} (pinned): the fp32 reference, no parity check needed")
        return Selection(REFERENCE, {"runtime": REFERENCE, "runtime_choice": record}, [])
    identity = choice_identity(config, requested, reduced_tolerance, check_images, host)
    cached = _read_cache(cache_dir, identity)
    started = time.perf_counter()
    onnx = scripted.with_name(ONNX_FILE)
    wanted = [cached["settings"]["runtime"]] if cached else runtimes
    if any(RUNTIMES[name].file == ONNX_FILE for name in wanted):
        log("  runtime choice: exporting ONNX and checking it ...")
        if export is None:
            from b4serve.build.onnx_export import (
                export_onnx as export,  # only ONNX runtimes need it
            )
        difference = export(model, config, onnx)
        log(f"  runtime choice: exported ONNX to {onnx} in {time.perf_counter() - started:.1f} s;"
            f" {QUANTITY} to eager {difference:.2e}")  # fmt: skip
    if cached:
        return _from_cache(cached, log)
    images = check_set(config, check_images)
    source = f"{len(images)} of {check_images}" if check_images else f"{len(images)} check"
    log(f"runtime choice: checking and timing {', '.join(runtimes)} against fp32 TorchScript "
        f"on {source} images")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="b4-runtimes-") as workspace:
        # the runtimes' files under the names an archive gives them (--output may name another)
        build = Path(workspace)
        (build / MODEL_FILE).symlink_to(scripted.resolve())
        if onnx.is_file():
            (build / ONNX_FILE).symlink_to(onnx.resolve())
        candidates = evaluate(
            build, config, runtimes, images, reduced_tolerance=reduced_tolerance, host=host,
            timer=timer, log=log,
        )  # fmt: skip
    candidates += [Candidate(name, excluded=why.reason) for name, why in skipped.items() if why]
    for candidate in candidates:
        log(f"  {candidate.line()}")
    pinned = None if requested == AUTO else requested
    earlier = None if pinned else _earlier_choice(cache_dir, identity)
    chosen, why = pick(candidates, pinned, earlier)
    record |= {
        "chosen": chosen.runtime,
        "why": why,
        "check_images": source,
        "tolerances": {p: tolerance(p, reduced_tolerance) for p in ("fp32", "bf16")},
        "seconds": round(time.perf_counter() - started, 1),
        "chosen_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "candidates": [c.as_dict() for c in candidates],
    }
    log(
        f"runtime {chosen.runtime} ({record['mode']}; {chosen.precision}, "
        f"{chosen.images_per_s:.2f} TTA img/s in-process; {why}; choice took "
        f"{record['seconds']} s)"
    )
    settings: dict[str, Any] = {"runtime": chosen.runtime, "runtime_choice": record}
    if chosen.runtime == "openvino":
        settings["openvino_precision"] = chosen.precision
    _write_cache(cache_dir, identity, settings)
    return Selection(chosen.runtime, settings, candidates)


def _for_gpu_workers(
    requested: str, config: ModelConfig, gpus: int, record: dict[str, Any],
    log: Callable[[str], None],
) -> Selection:  # fmt: skip
    """TorchScript for workers that get GPUs: their GPU path; any other runtime is refused."""
    if requested not in (AUTO, REFERENCE):
        raise RuntimeChoiceError(
            f"--runtime {requested} runs on the CPU only, and this host's workers get {gpus} "
            f"GPU(s): use --runtime auto or {REFERENCE} (the GPU path), or serve on the CPU "
            "(B4_GPUS=0)"
        )
    precision = config.gpu_precision if config.optimize else "fp32"
    why = (
        f"the workers get {gpus} GPU(s), and only TorchScript has a GPU path ({precision} "
        "there, checked against fp32 on the CPU where this machine has CUDA); no CPU runtime "
        "was timed"
    )
    record |= {"chosen": REFERENCE, "workers": "gpu", "gpus": gpus, "why": why}
    log(f"runtime {REFERENCE} ({record['mode']}): {why}")
    return Selection(REFERENCE, {"runtime": REFERENCE, "runtime_choice": record}, [])


def pick(
    candidates: Sequence[Candidate],
    pinned: str | None = None,
    earlier: tuple[str, str] | None = None,
) -> tuple[Candidate, str]:
    """The candidate to serve, and why. With ``pinned``, its fastest eligible variant (an
    error if none is eligible). Under auto, the incumbent (fp32 TorchScript, or ``earlier``:
    this checkpoint's earlier choice on this kind of host, where it is still eligible) unless
    a candidate beats it by more than :data:`MIN_GAIN` and the spread of either's timings: then
    the fastest such. An error if fp32 TorchScript itself is not eligible (then the export is
    broken)."""
    eligible = [c for c in candidates if not c.excluded and c.images_per_s]
    if pinned is not None:
        if not eligible:
            failed = "; ".join(f"{c.runtime} {c.precision}: {c.excluded}" for c in candidates)
            raise RuntimeChoiceError(f"--runtime {pinned} failed its check: {failed}")
        return max(eligible, key=_speed), "pinned"
    reference = next((c for c in eligible if c.runtime == REFERENCE), None)
    if reference is None:
        reasons = "; ".join(f"{c.runtime}: {c.excluded}" for c in candidates if c.excluded)
        raise RuntimeChoiceError(f"fp32 TorchScript does not match the scripted model: {reasons}")
    incumbent = next((c for c in eligible if c.key == earlier), reference)
    held = "the earlier choice on this kind of host" if incumbent is not reference else ""
    winners = [c for c in eligible if c is not incumbent and _beats(c, incumbent)]
    if not winners:
        return incumbent, (
            f"kept {incumbent.runtime} {incumbent.precision}"
            + (f" ({held})" if held else "")
            + ": no candidate faster by more than its timings' spread and "
            f"{MIN_GAIN:.0%}"
        )
    best = max(winners, key=_speed)
    return best, (
        f"{best.runtime} {best.precision} {_gain(best, incumbent):.0%} faster than "
        f"{incumbent.runtime} {incumbent.precision}"
        f" (needed over {_needed(best, incumbent):.0%}: the spread of their timings, at least "
        f"{MIN_GAIN:.0%})"
    )


def _speed(candidate: Candidate) -> float:
    return candidate.images_per_s or 0.0


def _gain(challenger: Candidate, incumbent: Candidate) -> float:
    """How much faster ``challenger`` is than ``incumbent``: 0.1 is 10% more images/s."""
    return _speed(challenger) / _speed(incumbent) - 1.0


def _beats(challenger: Candidate, incumbent: Candidate) -> bool:
    return _gain(challenger, incumbent) > _needed(challenger, incumbent)


def _needed(challenger: Candidate, incumbent: Candidate) -> float:
    return max(MIN_GAIN, challenger.spread, incumbent.spread)


# --- the cache ----------------------------------------------------------------------------


def choice_identity(
    config: ModelConfig,
    requested: str,
    reduced_tolerance: float | None,
    check_images: str | Path | None,
    host: HostCaps,
) -> dict[str, Any]:
    """What a runtime choice holds for: the checkpoint (its sha256), every setting of the
    archive, the request and tolerance, the check images, the CPU model and flags, and the
    versions of the packages the runtimes are."""
    settings = {
        name: value for name, value in dataclasses.asdict(config).items()
        if name not in _CHOICE_FIELDS
    }  # fmt: skip
    return {
        "checkpoint_sha256": config.extra.get("checkpoint_sha256", ""),
        "settings": json.loads(json.dumps(settings, default=str)),
        "requested": requested,
        "reduced_tolerance": reduced_tolerance,
        "check_images": _images_digest(check_images),
        "cpu": host.kind(),
        "packages": {name: _version(name) for name in TIMED_PACKAGES},
    }


def _images_digest(directory: str | Path | None) -> str | None:
    if directory is None:
        return None
    digest = hashlib.sha256()
    for path in sorted(Path(directory).glob("*.npy")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _key(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


def _read_cache(cache_dir: Path | None, identity: dict[str, Any]) -> dict[str, Any] | None:
    if cache_dir is None or not identity["checkpoint_sha256"]:
        return None
    path = cache_dir / f"{_key(identity)}.json"
    try:
        entry = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or unreadable: choose again
        return None
    return entry if entry.get("identity") == identity else None


def _write_cache(cache_dir: Path | None, identity: dict[str, Any], settings: dict) -> None:
    if cache_dir is None or not identity["checkpoint_sha256"]:
        return
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"{_key(identity)}.json"
    partial = path.with_suffix(f".{os.getpid()}.partial")
    partial.write_text(json.dumps({"identity": identity, "settings": settings}, indent=1))
    partial.replace(path)  # whole or not at all


def _from_cache(cached: dict[str, Any], log: Callable[[str], None]) -> Selection:
    settings = cached["settings"]
    record = settings["runtime_choice"]
    record["cached"] = True
    log(
        f"runtime {settings['runtime']} ({record['mode']}; chosen {record.get('chosen_at', '')} "
        f"on this kind of host for this checkpoint, settings and packages: not timed again; "
        f"{record.get('why', '')})"
    )
    return Selection(settings["runtime"], settings, [])


def _earlier_choice(cache_dir: Path | None, identity: dict[str, Any]) -> tuple[str, str] | None:
    """(runtime, precision) this checkpoint last chose on this kind of host (any settings or
    package versions), from ``cache_dir``; None when it never did."""
    if cache_dir is None or not identity["checkpoint_sha256"]:
        return None
    found: list[tuple[str, tuple[str, str]]] = []
    for path in cache_dir.glob("*.json"):
        try:
            entry = json.loads(path.read_text())
            earlier, record = entry["identity"], entry["settings"]["runtime_choice"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        same = (earlier.get("checkpoint_sha256"), earlier.get("cpu"))
        if same != (identity["checkpoint_sha256"], identity["cpu"]) or record["mode"] != AUTO:
            continue
        runtime = record["chosen"]
        precision = entry["settings"].get("openvino_precision", RUNTIMES[runtime].precision)
        found.append((record["chosen_at"], (runtime, precision)))
    return max(found)[1] if found else None


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
        model = choice.get("cpu", {}).get("model")
        lines[0] += f" on {model or 'a CPU'} with {have or 'none of ' + ', '.join(host)}"
    if choice.get("why"):
        cached = " (read from the cache: not timed again)" if choice.get("cached") else ""
        lines.append(f"  why: {choice['why']}{cached}")
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
