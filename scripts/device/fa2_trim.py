#!/usr/bin/env python3
"""Make a trimmed flash-attn 2.8.3 sdist: FA2's own kernels for the head dims the verification measures
(64 and 128), without the dropout/ALiBi/softcap/sliding-window template variants, so that a source build
on one H200 takes minutes instead of the full build's 1390-1531 s (docs/gpu-e2e.md, "FA2 in the same run").

    python3 scripts/device/fa2_trim.py UPSTREAM_SDIST OUTDIR      # prints the path of the trimmed sdist

What changes (and is written into the sdist as TRIMMED.txt, so whoever unpacks it can tell):
- setup.py compiles only csrc/flash_attn/src/flash_{fwd,fwd_split,bwd}_hdim{64,128}_* (24 of 72 .cu files);
  the other .cu files are left out of the sdist;
- setup.py's own commented-out switches -DFLASHATTENTION_DISABLE_{DROPOUT,ALIBI,SOFTCAP,LOCAL} are turned on,
  for nvcc and for the host compiler (flash_api.cpp, where upstream's checks are: with the nvcc flags alone they
  are compiled out and such calls silently run without the feature): dropout > 0, alibi slopes, softcap > 0 and
  a sliding window are refused with "This flash attention build does not support ...";
- static_switch.h's HEADDIM_SWITCH dispatches head dims 33-64 to the hdim64 kernels and 97-128 to the hdim128
  kernels (exactly as upstream does) and refuses every other head dim with a TORCH_CHECK error;
- the version is 2.8.3+trim.hd64.hd128 (flash_attn.__version__, PKG-INFO, so the built wheel's name says it).
Kept as upstream: every kernel source, backward, uneven head dims (UNEVEN_K), causal, fp16 and bf16,
paged KV and the split-KV decode kernels, the Python package. FLASH_ATTN_CUDA_ARCHS is the build's (the
playbook sets it). The file is reproducible: same input, same bytes (members sorted, fixed owner and times).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import sys
import tarfile
from pathlib import Path

UPSTREAM_VERSION = "2.8.3"
UPSTREAM_SHA256 = "1e71dd64a9e0280e0447b8a0c2541bad4bf6ac65bdeaa2f90e51a9e57de0370d"  # PyPI flash_attn-2.8.3.tar.gz
LOCAL = "trim.hd64.hd128"
VERSION = f"{UPSTREAM_VERSION}+{LOCAL}"
KEPT_HEADDIMS = (64, 128)
DISABLED = ("DROPOUT", "ALIBI", "SOFTCAP", "LOCAL")
KERNEL_RE = re.compile(r"csrc/flash_attn/src/flash_(fwd|fwd_split|bwd)_hdim(\d+)_(fp16|bf16)(_causal)?_sm80\.cu")

UPSTREAM_SWITCH = """#define HEADDIM_SWITCH(HEADDIM, ...)   \\
  [&] {                                    \\
    if (HEADDIM <= 32) {                   \\
      constexpr static int kHeadDim = 32;  \\
      return __VA_ARGS__();                \\
    } else if (HEADDIM <= 64) {            \\
      constexpr static int kHeadDim = 64;  \\
      return __VA_ARGS__();                \\
    } else if (HEADDIM <= 96) {            \\
      constexpr static int kHeadDim = 96;  \\
      return __VA_ARGS__();                \\
    } else if (HEADDIM <= 128) {           \\
      constexpr static int kHeadDim = 128; \\
      return __VA_ARGS__();                \\
    } else if (HEADDIM <= 192) {           \\
      constexpr static int kHeadDim = 192; \\
      return __VA_ARGS__();                \\
    } else if (HEADDIM <= 256) {           \\
      constexpr static int kHeadDim = 256; \\
      return __VA_ARGS__();                \\
    }                                      \\
  }()"""

TRIMMED_SWITCH = f"""// fleetctl scripts/device/fa2_trim.py: the hdim64 and hdim128 kernels only (TRIMMED.txt).
// Head dims 33-64 and 97-128 run the kernels upstream runs for them; any other is refused. The message streams
// no number: on the H200 (2026-12-03) formatting an int into it crashed the process (segfault in libstdc++'s
// ostream) where flash_attn.cute was loaded too.
#define HEADDIM_SWITCH(HEADDIM, ...)   \\
  [&] {{                                    \\
    if (HEADDIM > 32 && HEADDIM <= 64) {{   \\
      constexpr static int kHeadDim = 64;  \\
      return __VA_ARGS__();                \\
    }} else if (HEADDIM > 96 && HEADDIM <= 128) {{ \\
      constexpr static int kHeadDim = 128; \\
      return __VA_ARGS__();                \\
    }} else {{                               \\
      TORCH_CHECK(false, "flash-attn {VERSION} is a trimmed build with the kernels of head dims 33-64 and " \\
                  "97-128 only: install an untrimmed flash-attn for other head dims"); \\
    }}                                      \\
  }}()"""


def _kept(path: str) -> bool:
    """Is this sdist member kept? Every file but the .cu kernels of the head dims that are dropped."""
    m = KERNEL_RE.search(path)
    return m is None or int(m.group(2)) in KEPT_HEADDIMS


def _once(text: str, old: str, new: str, what: str) -> str:
    if text.count(old) != 1:
        raise SystemExit(f"fa2_trim: {what}: expected exactly one {old[:80]!r} in the upstream file, found "
                         f"{text.count(old)}: is this flash_attn-{UPSTREAM_VERSION}?")
    return text.replace(old, new)


def patch_setup(text: str) -> tuple[str, list[str], list[str]]:
    """setup.py with only the kept kernel sources and the four DISABLE switches on; (text, kept, dropped)."""
    kept: list[str] = []
    dropped: list[str] = []
    lines = []
    for line in text.splitlines(keepends=True):
        m = KERNEL_RE.search(line)
        if m and line.strip().startswith('"'):
            (kept if int(m.group(2)) in KEPT_HEADDIMS else dropped).append(m.group(0))
            if int(m.group(2)) not in KEPT_HEADDIMS:
                continue
        lines.append(line)
    if len(kept) != 24 or len(dropped) != 48:
        raise SystemExit(f"fa2_trim: setup.py lists {len(kept)} kept and {len(dropped)} dropped kernel sources, "
                         f"expected 24 and 48: is this flash_attn-{UPSTREAM_VERSION}?")
    out = "".join(lines)
    for flag in DISABLED:
        out = _once(out, f'# "-DFLASHATTENTION_DISABLE_{flag}",', f'"-DFLASHATTENTION_DISABLE_{flag}",  # fa2_trim',
                    "setup.py")
    # The refusals live in flash_api.cpp, which the host compiler builds with these flags, not nvcc's: without
    # the defines there it runs dropout/alibi/softcap/window calls on kernels built without them, silently
    # ignoring them (seen on the H200, 2026-12-03)
    defines = "".join(f', "-DFLASHATTENTION_DISABLE_{flag}"' for flag in DISABLED)
    out = _once(out, 'compiler_c17_flag=["-O3", "-std=c++17"]', f'compiler_c17_flag=["-O3", "-std=c++17"{defines}]',
                "setup.py")
    return out, kept, dropped


def describe(kept: list[str], dropped: list[str], source_sha: str) -> str:
    return f"""flash-attn {VERSION}: a TRIMMED source distribution of flash-attn {UPSTREAM_VERSION}
====================================================================

Made by fleetctl's scripts/device/fa2_trim.py from PyPI's flash_attn-{UPSTREAM_VERSION}.tar.gz
(sha256 {source_sha}), to build FA2 on one H200 in minutes for the verification run of issue 16.
It is not a release of flash-attn. Its kernels are upstream's, unchanged; fewer of them are compiled:

- kernels: csrc/flash_attn/src/flash_{{fwd,fwd_split,bwd}}_hdim{{64,128}}_{{fp16,bf16}}[_causal]_sm80.cu
  ({len(kept)} files) are built; the {len(dropped)} files of head dims 32, 96, 192 and 256 are not in this sdist.
- csrc/flash_attn/src/static_switch.h HEADDIM_SWITCH: head dims 33-64 -> hdim64 kernels, 97-128 -> hdim128
  kernels (the ones upstream picks for them); any other head dim fails with a TORCH_CHECK error naming this
  build.
- setup.py: -DFLASHATTENTION_DISABLE_{{DROPOUT,ALIBI,SOFTCAP,LOCAL}} on (upstream ships them commented out), for
  nvcc and the host compiler. flash_api.cpp then refuses dropout_p > 0, alibi_slopes, softcap > 0 and
  window_size (local attention) with "This flash attention build does not support ..." instead of computing them.
- Kept: backward, causal and non-causal, fp16 and bf16, uneven head dims, variable length, paged KV cache and
  the split-KV decode kernels (flash_attn_with_kvcache), every Python file.
- version {VERSION} in flash_attn/__init__.py and PKG-INFO, so the wheel it builds says so in its name.

Kernels kept:
{chr(10).join('  ' + k for k in kept)}
"""


def _tarinfo(name: str, size: int, template: tarfile.TarInfo | None) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = template.mode if template is not None else 0o644
    info.mtime = int(template.mtime) if template is not None else 1755246484  # upstream's PKG-INFO time
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def trim(src: Path, outdir: Path) -> Path:
    data = src.read_bytes()
    source_sha = hashlib.sha256(data).hexdigest()
    top_in = f"flash_attn-{UPSTREAM_VERSION}"
    top_out = f"flash_attn-{VERSION}"
    members: dict[str, tuple[tarfile.TarInfo, bytes | None]] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tf:
        for m in tf.getmembers():
            if not (m.isfile() or m.isdir()) or not (m.name == top_in or m.name.startswith(top_in + "/")):
                continue  # links and anything outside the project directory are not part of a build
            content = tf.extractfile(m).read() if m.isfile() else None  # type: ignore[union-attr]
            members[m.name[len(top_in):]] = (m, content)
    text = {rel: members[rel][1].decode() for rel in ("/setup.py", "/csrc/flash_attn/src/static_switch.h",  # type: ignore[union-attr]
                                                       "/flash_attn/__init__.py", "/PKG-INFO")}
    setup, kept, dropped = patch_setup(text["/setup.py"])
    patched = {
        "/setup.py": setup,
        "/csrc/flash_attn/src/static_switch.h": _once(text["/csrc/flash_attn/src/static_switch.h"],
                                                      UPSTREAM_SWITCH, TRIMMED_SWITCH, "static_switch.h"),
        "/flash_attn/__init__.py": _once(text["/flash_attn/__init__.py"], f'__version__ = "{UPSTREAM_VERSION}"',
                                         f'__version__ = "{VERSION}"', "flash_attn/__init__.py"),
        "/PKG-INFO": _once(text["/PKG-INFO"], f"\nVersion: {UPSTREAM_VERSION}\n", f"\nVersion: {VERSION}\n",
                           "PKG-INFO"),
        "/TRIMMED.txt": describe(kept, dropped, source_sha),
    }
    outdir.mkdir(parents=True, exist_ok=True)
    out = outdir / f"{top_out}.tar.gz"
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for rel in sorted(set(members) | set(patched)):
            if not _kept(rel):
                continue
            template, content = members.get(rel, (None, b""))
            if rel in patched:
                content = patched[rel].encode()
            if template is not None and template.isdir():
                info = _tarinfo(top_out + rel, 0, template)
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
                continue
            assert content is not None
            tf.addfile(_tarinfo(top_out + rel, len(content), template), io.BytesIO(content))
    out.write_bytes(buf.getvalue())
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    src, outdir = Path(argv[0]), Path(argv[1])
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    if sha != UPSTREAM_SHA256:
        print(f"fa2_trim: {src} has sha256 {sha}, not PyPI's flash_attn-{UPSTREAM_VERSION}.tar.gz "
              f"({UPSTREAM_SHA256}); set FA2_TRIM_ANY_SOURCE=1 to trim it anyway", file=sys.stderr)
        if os.environ.get("FA2_TRIM_ANY_SOURCE") != "1":
            return 1
    out = trim(src, outdir)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
