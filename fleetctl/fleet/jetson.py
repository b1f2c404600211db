"""Jetson: which JetPack (and the CUDA it ships) a Jetson Linux (L4T) release belongs to.

One table for the agent (it reports ``os.jetpack`` next to ``os.l4t``) and the resolver (the CUDA a Jetson's driver
supports is its JetPack's). Rows are checked against these sources (each row names its own):

[archive] NVIDIA's JetPack archive table as quoted in https://github.com/edgehook/Jetson-AI-task (README: JetPack
          5.1.2 = Jetson Linux 35.4.1, CUDA 11.4.19; 5.1.1 = 35.3.1, CUDA 11.4.19; 4.6.1 = 32.7.1, CUDA 10.2)
[gist]    https://gist.github.com/Tiryoh/2b5dc1f86ab6bc3e6922e97a4c1ac2f2 (JetPack 4.6.x / 4.5.x / 4.4.1 ↔ L4T R32.x,
          all CUDA 10.2)
[torch]   https://gitcode.com/FL1768317420/pytorch-jetson-cn-mirror (NVIDIA's torch wheels by JetPack: "JetPack 6.0
          (L4T R36.2 / R36.3) + CUDA 12.2", "JetPack 6.0 DP (L4T R36.2.0)", "JetPack 5.1 (L4T R35.2.1)")
[jp61]    https://pytorch.org/TensorRT/getting_started/jetpack.html ("JetPack 6.1 … CUDA 12.6") and
          https://github.com/AustinSchuh/meta-tegra README ("Jetson Linux release: R36.4.0 JetPack release: 6.1")
[jp62]    https://github.com/pytorch/TensorRT/pull/3453 ("jetpack 6.2 has: cuda: 12.6"); that JetPack 6.2 is L4T 36.4.3
          was not found in a searched source: the row is the one unverified mapping (its CUDA is)
[jp5]     https://forums.developer.nvidia.com/t/jetson-agx-xavier-jetpack-5-upgraded-to-cuda-11-8-cant-use-torch/291658/2
          ("Jetpack 5 includes CUDA 11.4")

The old table keyed every 36.4.x to JetPack 6.1; 36.4.3 is 6.2 (same CUDA), hence exact releases first.
"""

from __future__ import annotations

import re

# exact L4T release → (JetPack, CUDA); looked up before the major.minor rows below
_BY_RELEASE: dict[tuple[int, ...], tuple[str, str]] = {
    (36, 4, 3): ("6.2", "12.6"),  # [jp62]
    (36, 2, 0): ("6.0 DP", "12.2"),  # [torch]
    (35, 4, 1): ("5.1.2", "11.4"),  # [archive]
    (35, 3, 1): ("5.1.1", "11.4"),  # [archive]
    (35, 2, 1): ("5.1", "11.4"),  # [torch] [jp5]
    (32, 7, 1): ("4.6.1", "10.2"),  # [archive] [gist] (also 4.6.2, same L4T)
    (32, 6, 1): ("4.6", "10.2"),  # [gist]
}
# L4T major.minor → (JetPack, CUDA) for the releases in between
_BY_MAJOR_MINOR: dict[tuple[int, int], tuple[str, str]] = {
    (36, 4): ("6.1", "12.6"),  # [jp61] 36.4.0
    (36, 3): ("6.0", "12.2"),  # [torch]
    (36, 2): ("6.0 DP", "12.2"),  # [torch]
    (35, 5): ("5.1.3", "11.4"),  # [jp5]: JetPack 5.x ships CUDA 11.4
    (35, 6): ("5.1.4", "11.4"),  # [jp5]
    (35, 4): ("5.1.2", "11.4"),  # [archive]
    (35, 3): ("5.1.1", "11.4"),  # [archive]
    (35, 2): ("5.1", "11.4"),  # [torch] [jp5]
    (32, 7): ("4.6.1", "10.2"),  # [gist]
    (32, 6): ("4.6", "10.2"),  # [gist]
    (32, 5): ("4.5", "10.2"),  # [gist]
}


def jetpack_for_l4t(l4t: str) -> tuple[str, str] | None:
    """``"36.4.0"`` → ``("6.1", "12.6")``; ``"36.4.3"`` → ``("6.2", "12.6")``; None for a release not in the table."""
    parts = tuple(int(p) for p in re.findall(r"\d+", l4t)[:3])
    if len(parts) < 2:
        return None
    exact = _BY_RELEASE.get(parts + (0,) * (3 - len(parts)))
    return exact or _BY_MAJOR_MINOR.get((parts[0], parts[1]))
