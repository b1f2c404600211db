"""Stand-in flash_attn wheels and sdists, written by the tests.

``build_wheel`` writes a PEP 427 wheel directly (zip + METADATA/WHEEL/RECORD). ``build_sdist``
writes an sdist whose in-tree build backend (no setuptools needed, works with
``--no-build-isolation``) "builds" in well under a second and records the build
environment (FLASH_ATTENTION_FORCE_BUILD, FLASH_ATTN_CUDA_ARCHS, MAX_JOBS, NVCC_THREADS,
CUDA_HOME, the ROCm ones — BUILD_TARGET, GPU_ARCHS, ROCM_HOME, FLASH_ATTENTION_TRITON_AMD_ENABLE —, nvcc and
ninja on PATH, and the importable torch's ``version.cuda``/``version.hip``) into ``<package>/_build_env.json``
inside the wheel.
"""

from __future__ import annotations

import base64
import hashlib
import io
import tarfile
import zipfile
from pathlib import Path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def wheel_bytes(dist: str, version: str, files: dict[str, str], requires: tuple[str, ...] = (),
                tag: str = "py3-none-any") -> bytes:
    norm = dist.replace("-", "_")
    distinfo = f"{norm}-{version}.dist-info"
    meta = f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires)
    wheel = f"Wheel-Version: 1.0\nGenerator: fleetctl-tests\nRoot-Is-Purelib: true\nTag: {tag}\n"
    entries = {**files, f"{distinfo}/METADATA": meta, f"{distinfo}/WHEEL": wheel}
    buf = io.BytesIO()
    record: list[str] = []
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, text in sorted(entries.items()):
            data = text.encode()
            info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, data, zipfile.ZIP_DEFLATED)
            record.append(f"{name},{_record_hash(data)},{len(data)}")
        record.append(f"{distinfo}/RECORD,,")
        info = zipfile.ZipInfo(f"{distinfo}/RECORD", date_time=(2024, 1, 1, 0, 0, 0))
        zf.writestr(info, "\n".join(record) + "\n")
    return buf.getvalue()


def build_wheel(outdir: Path, dist: str = "flash_attn", version: str = "2.8.3", *, package: str = "flash_attn",
                requires: tuple[str, ...] = ("torch",), local: str = "", extra: str = "") -> Path:
    """A stand-in flash_attn wheel; ``local`` is put in the file name only (as upstream release wheels do)."""
    files = {f"{package}/__init__.py": f'__version__ = "{version}"\nSTAND_IN = True\n{extra}'}
    outdir.mkdir(parents=True, exist_ok=True)
    fname_version = f"{version}+{local}" if local else version
    path = outdir / f"{dist.replace('-', '_')}-{fname_version}-py3-none-any.whl"
    path.write_bytes(wheel_bytes(dist, version, files, requires))
    return path


_BACKEND = r'''
"""In-tree PEP 517 backend of the fleetctl stand-in flash_attn sdist."""
import base64, hashlib, io, json, os, shutil, zipfile

NAME = {name!r}
PACKAGE = {package!r}
VERSION = {version!r}


def _h(data):
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def get_requires_for_build_wheel(config_settings=None):
    return []


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    env = {{k: os.environ.get(k) for k in ("FLASH_ATTENTION_FORCE_BUILD", "FLASH_ATTN_CUDA_ARCHS", "MAX_JOBS",
                                          "NVCC_THREADS", "CUDA_HOME", "BUILD_TARGET", "GPU_ARCHS", "ROCM_HOME",
                                          "FLASH_ATTENTION_TRITON_AMD_ENABLE")}}
    try:  # the torch the build ran against (upstream's setup.py picks CUDA or ROCm from torch.version)
        import torch.version
        env["torch_cuda"], env["torch_hip"] = torch.version.cuda, getattr(torch.version, "hip", None)
    except ImportError:
        env["torch_cuda"] = env["torch_hip"] = None
    env["nvcc"] = shutil.which("nvcc")
    env["ninja"] = shutil.which("ninja")
    env["cwd"] = os.path.basename(os.getcwd())
    norm = NAME.replace("-", "_")
    di = f"{{norm}}-{{VERSION}}.dist-info"
    files = {{
        f"{{PACKAGE}}/__init__.py": f"__version__ = {{VERSION!r}}\nBUILT_FROM_SOURCE = True\n",
        f"{{PACKAGE}}/_build_env.json": json.dumps(env, sort_keys=True),
        f"{{di}}/METADATA": f"Metadata-Version: 2.1\nName: {{NAME}}\nVersion: {{VERSION}}\nRequires-Dist: torch\n",
        f"{{di}}/WHEEL": ("Wheel-Version: 1.0\nGenerator: fleet-standin\nRoot-Is-Purelib: false\n"
                         "Tag: cp311-cp311-linux_x86_64\n"),
    }}
    fname = f"{{norm}}-{{VERSION}}-cp311-cp311-linux_x86_64.whl"
    rec = []
    with zipfile.ZipFile(os.path.join(wheel_directory, fname), "w") as zf:
        for n, t in sorted(files.items()):
            d = t.encode()
            zi = zipfile.ZipInfo(n, date_time=(2024, 1, 1, 0, 0, 0))
            zf.writestr(zi, d)
            rec.append(f"{{n}},{{_h(d)}},{{len(d)}}")
        rec.append(f"{{di}}/RECORD,,")
        zf.writestr(zipfile.ZipInfo(f"{{di}}/RECORD", date_time=(2024, 1, 1, 0, 0, 0)), "\n".join(rec) + "\n")
    return fname
'''


def build_sdist(outdir: Path, dist: str = "flash_attn", version: str = "2.8.3", *, package: str = "flash_attn",
                subdir: str = "") -> Path:
    """A stand-in sdist ``{dist}-{version}.tar.gz``; with ``subdir`` the buildable project sits there (FA3: hopper/)."""
    top = f"{dist.replace('-', '_')}-{version}"
    proj = f"{top}/{subdir}" if subdir else top
    members = {
        f"{top}/PKG-INFO": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n",
        f"{proj}/pyproject.toml": ('[build-system]\nrequires = []\nbuild-backend = "fleet_standin_backend"\n'
                                   'backend-path = ["."]\n'),
        f"{proj}/fleet_standin_backend.py": _BACKEND.format(name=dist, package=package, version=version),
    }
    if subdir:
        members[f"{top}/README"] = "the buildable project is in " + subdir + "\n"
    outdir.mkdir(parents=True, exist_ok=True)
    path = outdir / f"{top}.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        for name, text in sorted(members.items()):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 1704067200
            tf.addfile(info, io.BytesIO(data))
    return path
