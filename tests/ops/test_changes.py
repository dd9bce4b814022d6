"""What a deploy changed, said in one line; the version a registration is served as."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from b4serve.ops.changes import DeployRecord, differences, served_version, summary
from b4serve.ops.manage import Registration

ARCHIVE = {
    "checkpoint_sha256": "ab" * 32,
    "settings": {"B4_NUM_CLASSES": "6", "B4_RUNTIME": "auto"},
    "code": "0123456789abcdef",
}


def record(version: str = "aaaaaaaaaaaa", **changes: object) -> DeployRecord:
    archive = {**ARCHIVE, "settings": dict(ARCHIVE["settings"])}
    registration = dataclasses.asdict(Registration())
    for name, value in changes.items():
        if name.startswith("B4_"):
            archive["settings"][name] = value
        elif name in registration:
            registration[name] = value
        else:
            archive[name] = value
    return DeployRecord(version, version[:12], archive, registration)


def test_default_registration_is_served_as_the_build_and_any_other_gets_its_own_version() -> None:
    defaults = Registration().reregistration_fields()
    assert served_version("abc", defaults, defaults) == "abc"
    batched = Registration(batch_size=8).reregistration_fields()
    delayed = Registration(max_batch_delay_ms=50).reregistration_fields()
    assert served_version("abc", batched, defaults).startswith("abc-r")
    assert served_version("abc", batched, defaults) != served_version("abc", delayed, defaults)
    assert served_version("abc", batched, defaults) == served_version("abc", batched, defaults)
    # workers are scaled in place: no new version
    scaled = Registration(initial_workers=3).reregistration_fields()
    assert served_version("abc", scaled, defaults) == "abc"
    # on a GPU host its own defaults are the plain build
    gpu = Registration.for_gpus(1).reregistration_fields()
    assert served_version("abc", gpu, gpu) == "abc"


def test_differences_name_each_changed_setting_with_both_values() -> None:
    old = record()
    new = record("bbbbbbbbbbbb", B4_ARCH="tf_efficientnet_b4", B4_CLASS_NAMES="a,b,c,d,e,f",
                 batch_size=8)  # fmt: skip
    assert differences(old, new) == [
        "B4_ARCH unset -> tf_efficientnet_b4",
        "B4_CLASS_NAMES unset -> a,b,c,d,e,f",
        "batch size 4 -> 8",
    ]
    assert differences(old, record()) == []
    moved = record(checkpoint_sha256="cd" * 32, code="fedcba9876543210")
    assert differences(old, moved) == ["checkpoint abababababab -> cdcdcdcdcdcd",
                                       "build or serving code changed"]  # fmt: skip


def test_the_summary_says_what_changed_and_what_was_done() -> None:
    old, same = record(), record()
    assert summary("b4", old, "aaaaaaaaaaaa", same, "unchanged", "stored", []) == (
        "b4 aaaaaaaaaaaa: nothing changed; already serving it: nothing to do"
    )
    more = record(initial_workers=2)
    assert summary("b4", old, "aaaaaaaaaaaa", more, "scaled", "stored", []) == (
        "b4 aaaaaaaaaaaa: workers 1 -> 2; scaled it in place to 2 workers"
    )
    arch = record("bbbbbbbbbbbb", B4_ARCH="tf_efficientnet_b4")
    line = summary("b4", old, "aaaaaaaaaaaa", arch, "deployed", "built", ["aaaaaaaaaaaa"])
    assert line == (
        "b4 bbbbbbbbbbbb: B4_ARCH unset -> tf_efficientnet_b4; built it (export, parity, runtime "
        "choice, archive), rolled it out, retired aaaaaaaaaaaa"
    )
    batch = record("aaaaaaaaaaaa-r123456", batch_size=8)
    line = summary("b4", old, "aaaaaaaaaaaa", batch, "deployed", "packed", ["aaaaaaaaaaaa"])
    assert "batch size 4 -> 8; packed the same build for the new registration (no rebuild)" in line
    assert summary("b4", None, None, arch, "deployed", "built", []).startswith(
        "b4 bbbbbbbbbbbb: first deploy; built it"
    )
    assert "which has no deploy record on this host" in summary(
        "b4", None, "zzz", arch, "deployed", "stored", ["zzz"]
    )


def test_records_round_trip_and_a_missing_one_is_none(tmp_path: Path) -> None:
    kept = record("bbbbbbbbbbbb", B4_ARCH="tf_efficientnet_b4")
    kept.save(tmp_path)
    assert DeployRecord.load(tmp_path, "bbbbbbbbbbbb") == kept
    assert DeployRecord.load(tmp_path, "never") is None
    (tmp_path / "broken.json").write_text("{not json")
    assert DeployRecord.load(tmp_path, "broken") is None
