"""The tests' one small network, B4-like (ConvNet), and hosts by their CPU flags."""

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
    """The layer kinds B4 is made of (convolution, batch norm, SiLU, depthwise, pooling, linear)
    with kernels that are not mirror-symmetric, so a flip changes the logits."""

    def __init__(self, num_classes: int = 6, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.SiLU(),
            nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.SiLU(),
        )  # fmt: skip
        self.head = nn.Linear(16, num_classes)
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
            for module in self.features:
                if isinstance(module, nn.BatchNorm2d):  # non-trivial statistics to fold
                    module.running_mean.uniform_(-0.2, 0.2, generator=generator)
                    module.running_var.uniform_(0.5, 2.0, generator=generator)
        self.eval()  # served models are in eval mode: each image is computed on its own

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images).mean((2, 3))) * 4
