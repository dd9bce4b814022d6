"""Small stand-ins the runtime tests share: a B4-like ConvNet, and hosts by their CPU flags."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from b4serve.serving.runtime import HostCaps

__all__ = ["AVX2_ONLY", "AVX512_BF16", "SAPPHIRE_RAPIDS", "ConvNet", "simulated"]


def simulated(cpuinfo: str) -> HostCaps:
    """A host from its /proc/cpuinfo, whose OpenVINO plugin reports BF16 where the CPU has bf16
    instructions (as OpenVINO's does): nothing about it is asked of the real CPU."""
    host = HostCaps.from_cpuinfo(cpuinfo)
    return dataclasses.replace(host, openvino_bf16=host.bf16)


# /proc/cpuinfo model and flags of three kinds of host (abridged)
AVX512_BF16 = simulated("processor\t: 0\nmodel name\t: AMD EPYC 9B14\nflags\t\t: fpu sse2 avx "
                        "avx2 avx512f avx512_vnni avx512_bf16\n")  # fmt: skip
AVX2_ONLY = simulated("model name\t: AMD EPYC 7B12\nflags\t: fpu sse2 avx avx2 fma\n")
SAPPHIRE_RAPIDS = simulated("model name: Intel(R) Xeon(R) Platinum 8481C\n"
                            "flags: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n")  # fmt: skip


class ConvNet(nn.Module):
    """The layer kinds B4 is made of: convolution, batch norm, SiLU, pooling, linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.SiLU(),
            nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.SiLU(),
        )  # fmt: skip
        self.head = nn.Linear(16, 6)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images).mean((2, 3)))
