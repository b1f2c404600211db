"""Stand-in FlashAttention installs for bench.py's detection and dispatch tests: FA2 (``flash_attn`` with
its CUDA extension module), FA3 (top-level ``flash_attn_interface``) and FA4 (``flash_attn.cute`` in a
``flash_attn`` namespace package, as the flash-attn-4 wheel lays it out), each with a dist-info so
``importlib.metadata`` finds its distribution and version.

Their ``flash_attn_func`` records the call and, given torch tensors, computes attention with torch's math
(so a CPU-torch run of bench.py measures and checks them); given anything else it returns a marker.
FA4's returns ``(out, lse)`` like the real one, FA3's returns ``out``.
"""

from __future__ import annotations

from pathlib import Path

_ATTN = '''
CALLS = []


def _attn(q, k, v, causal):
    import torch

    qf, kf, vf = (t.transpose(1, 2) for t in (q, k, v))
    return torch.nn.functional.scaled_dot_product_attention(qf, kf, vf, is_causal=causal).transpose(1, 2)


def _run(name, q, k, v, causal):
    CALLS.append((name, bool(causal)))
    if type(q).__module__.split(".")[0] != "torch":
        return f"{name}-out causal={bool(causal)}"
    return _attn(q, k, v, causal)
'''

FA2 = _ATTN + '''
__version__ = "2.8.3"


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
    return _run("fa2", q, k, v, causal)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           causal=False):
    import torch

    outs = []
    for i in range(len(cu_seqlens_q) - 1):
        s, e = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1])
        outs.append(_attn(q[s:e][None], k[s:e][None], v[s:e][None], causal)[0])
    return torch.cat(outs)
'''

FA3 = _ATTN + '''

def flash_attn_func(q, k, v, softmax_scale=None, causal=False, qv=None, q_descale=None):
    return _run("fa3", q, k, v, causal)
'''

FA4 = _ATTN + '''
__version__ = "0.0.0"  # the real one reads a distribution named "fa4"
HEADDIMS = (64, 128)


def flash_attn_func(q, k, v, qv=None, gather_kv_indices=None, softmax_scale=None, causal=False, **kw):
    if type(q).__module__.split(".")[0] == "torch" and q.shape[-1] not in HEADDIMS:
        raise AssertionError(f"(head_dim, head_dim_v)=({q.shape[-1]}, {q.shape[-1]}) is not supported on SM90.")
    return _run("fa4", q, k, v, causal), "lse"


def flash_attn_varlen_func(q, k, v, qv=None, cu_seqlens_q=None, cu_seqlens_k=None, **kw):
    raise NotImplementedError
'''


def _dist_info(root: Path, dist: str, version: str) -> None:
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")


def install(root: Path, *, fa2: bool = False, fa3: bool = False, fa4: bool = False,
            fa2_broken: str | None = None) -> Path:
    """Write the chosen stand-ins under ``root`` (a directory to put on PYTHONPATH / sys.path)."""
    root.mkdir(parents=True, exist_ok=True)
    if fa2 or fa2_broken:
        pkg = root / "flash_attn"
        pkg.mkdir(exist_ok=True)
        body = f"raise ImportError({fa2_broken!r})\n" if fa2_broken else FA2
        (pkg / "__init__.py").write_text(body)
        (root / "flash_attn_2_cuda.py").write_text("")
        _dist_info(root, "flash-attn", "2.8.3")
    if fa3:
        (root / "flash_attn_interface.py").write_text(FA3)
        _dist_info(root, "flash_attn_3", "3.0.0b1")
    if fa4:
        cute = root / "flash_attn" / "cute"
        cute.mkdir(parents=True, exist_ok=True)
        (cute / "__init__.py").write_text(FA4)
        _dist_info(root, "flash-attn-4", "4.0.0b36")
    return root
