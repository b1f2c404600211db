#!/usr/bin/env python3
"""End-to-end attention check: prefill, time to first token and decode, per ``attn_implementation``.

STANDALONE like bench.py (stdlib at module level; torch and transformers imported lazily; no fleet code).
A realistically sized model (Qwen2-1.5B dimensions by default, random weights, built on the GPU: no network)
or ``--model PATH`` (a local checkpoint).  Per implementation it reports, separately:

* prefill tokens/s: one forward over ``batch × prompt`` tokens (what serving a long prompt costs);
* time to first token: ``generate(max_new_tokens=1)`` (prefill + the first sampled token);
* decode tokens/s: ``(generate(1 + N) − generate(1))`` over ``N × batch`` new tokens (the KV-cache phase);
* peak memory above the weights, for each phase.

Then the decode investigation (docs/verification.md): the same decode through ``sdpa`` with
``sdpa_kernel`` forced to each backend, with and without an attention mask, and a profile of the CUDA
kernels of decode steps, so the slowest part can be named rather than guessed.

    python e2e_gen.py --out e2e.json [--model PATH] [--config qwen2-1.5b|qwen2-0.5b]
                      [--batch 8] [--prompt 4096] [--new-tokens 64] [--impls eager,sdpa,flash_attention_2]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import platform
import sys
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

CONFIGS: dict[str, dict[str, Any]] = {  # public model dimensions (qwen2-small: bench.py's E2E_QWEN2 before issue 16)
    "qwen2-small": {"vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8,
                    "num_attention_heads": 16, "num_key_value_heads": 4, "max_position_embeddings": 4096},
    # (config.json of Qwen/Qwen2-0.5B and Qwen/Qwen2-1.5B; weights random)
    "qwen2-0.5b": {"vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                   "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 32768,
                   "tie_word_embeddings": True, "rope_theta": 1000000.0},
    "qwen2-1.5b": {"vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                   "num_attention_heads": 12, "num_key_value_heads": 2, "max_position_embeddings": 32768,
                   "tie_word_embeddings": True, "rope_theta": 1000000.0},
}
IMPLS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flash_attention_4")
SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")


def _short(exc: BaseException, limit: int = 600) -> str:
    return f"{type(exc).__name__}: {exc}"[:limit]


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        # imported by name: the target Python has them, the controller's type checker need not
        self.torch: Any = importlib.import_module("torch")
        self.tf: Any = importlib.import_module("transformers")
        torch = self.torch
        self.device = torch.device(args.device)
        self.dtype = torch.bfloat16
        self.deadline = time.monotonic() + float(args.budget_s)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def sync(self) -> None:
        self.torch.cuda.synchronize(self.device)

    def model(self, impl: str) -> Any:
        tf, torch = self.tf, self.torch
        if self.args.model:
            m = tf.AutoModelForCausalLM.from_pretrained(self.args.model, dtype=self.dtype, attn_implementation=impl,
                                                        local_files_only=True)
            return m.to(self.device).eval()
        config = tf.Qwen2Config(**CONFIGS[self.args.config])
        torch.manual_seed(0)
        with torch.device(self.device):  # initialise on the GPU: a 1.5B model on the CPU takes tens of seconds
            m = tf.Qwen2ForCausalLM._from_config(config, attn_implementation=impl, dtype=self.dtype)
        return m.eval()

    def inputs(self, vocab: int) -> tuple[Any, Any]:
        g = self.torch.Generator(device=self.device)
        g.manual_seed(0)
        ids = self.torch.randint(3, vocab, (self.args.batch, self.args.prompt), generator=g, device=self.device)
        return ids, self.torch.ones_like(ids)

    def timed(self, fn: Callable[[], Any], reps: int = 2) -> tuple[float, float]:
        """(best seconds, peak MiB above the memory in use before)."""
        torch = self.torch
        best = float("inf")
        peak = 0.0
        for _ in range(reps):
            self.sync()
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            t0 = time.perf_counter()
            fn()
            self.sync()
            best = min(best, time.perf_counter() - t0)
            peak = max(peak, (torch.cuda.max_memory_allocated(self.device) - before) / 2**20)
        return best, peak

    def generate(self, model: Any, ids: Any, mask: Any, new: int) -> Any:
        kw: dict[str, Any] = {"do_sample": False, "pad_token_id": 0, "eos_token_id": None, "use_cache": True,
                              "max_new_tokens": new, "min_new_tokens": new}
        if mask is not None:
            kw["attention_mask"] = mask
        return model.generate(ids, **kw)

    def phases(self, model: Any, ids: Any, mask: Any, backend: str | None = None, reps: int = 2,
               prefill: bool = True) -> dict[str, Any]:
        torch = self.torch
        a = self.args
        ctx: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext
        if backend is not None:
            attn = importlib.import_module("torch.nn.attention")
            ctx = lambda: attn.sdpa_kernel(getattr(attn.SDPBackend, backend))  # noqa: E731 (one backend only)
        out: dict[str, Any] = {}
        with torch.no_grad(), ctx():
            self.generate(model, ids[:, :128], None if mask is None else mask[:, :128], 2)  # warm-up
            if prefill:
                s, mem = self.timed(lambda: model(input_ids=ids, attention_mask=mask, use_cache=False,
                                                  logits_to_keep=1), reps)
                out.update(prefill_tokens_per_s=round(ids.numel() / s, 1), prefill_s=round(s, 4),
                           prefill_peak_mem_mib=round(mem, 1))
            t1, _ = self.timed(lambda: self.generate(model, ids, mask, 1), reps)
            tn, memn = self.timed(lambda: self.generate(model, ids, mask, 1 + a.new_tokens), reps)
        decode_s = max(tn - t1, 1e-9)
        out.update(ttft_ms=round(t1 * 1000, 2), decode_tokens_per_s=round(a.new_tokens * a.batch / decode_s, 1),
                   decode_ms_per_step=round(decode_s * 1000 / a.new_tokens, 3), generate_peak_mem_mib=round(memn, 1))
        return out

    def kernels(self, model: Any, ids: Any, mask: Any, steps: int = 8, top: int = 8) -> list[dict[str, Any]]:
        """The CUDA kernels of ``steps`` decode steps (generate(1+steps) minus nothing: prefill is one of them;
        the per-call counts say which ran per step)."""
        torch = self.torch
        prof_mod = importlib.import_module("torch.profiler")

        short = ids[:, : min(ids.shape[1], 1024)]
        m = None if mask is None else mask[:, : short.shape[1]]
        with torch.no_grad():
            self.generate(model, short, m, 2)
            with prof_mod.profile(activities=[prof_mod.ProfilerActivity.CUDA]) as prof:
                self.generate(model, short, m, 1 + steps)
                self.sync()
        rows = []
        for e in prof.key_averages():
            t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
            if t:
                rows.append({"kernel": e.key[:160], "calls": e.count, "total_ms": round(t / 1000, 3)})
        rows.sort(key=lambda r: -r["total_ms"])
        return rows[:top]


def registered_attention(tf: Any) -> list[str] | None:
    """The attn_implementation names transformers' AttentionInterface registers ("eager" is built in and not
    listed); None when this transformers has no such registry."""
    with contextlib.suppress(Exception):
        return sorted(tf.AttentionInterface._global_mapping)
    return None


def measure(run: Run, impl: str, then: Callable[[Any, Any, Any], None] | None = None) -> dict[str, Any]:
    """One attn_implementation: its model built, prefill / TTFT / decode / peak memory (``Run.phases``), then
    ``then(model, ids, mask)`` while the model is loaded.  Never raises: a failure is the entry's status
    (``unsupported`` when transformers refuses the implementation).  bench.py's e2e rows call this too."""
    torch = run.torch
    entry: dict[str, Any] = {"impl": impl}
    model = None
    try:
        model = run.model(impl)
        entry["attn_implementation_used"] = getattr(model.config, "_attn_implementation", None)
        entry["weights_mib"] = round(torch.cuda.memory_allocated(run.device) / 2**20, 1)
        ids, mask = run.inputs(int(model.config.vocab_size))
        entry.update(status="ok", **run.phases(model, ids, mask))
        if then is not None:
            then(model, ids, mask)
    except Exception as exc:
        oom = "out of memory" in str(exc).lower()
        entry.update(status="oom" if oom else ("unsupported" if isinstance(exc, ImportError | ValueError)
                                               else "error"), reason=_short(exc))
        traceback.print_exc(file=sys.stderr)
    finally:
        del model
        torch.cuda.empty_cache()
    return entry


def repro(run: Run, out: list[dict[str, Any]]) -> None:
    """The earlier e2e check's method (bench.py before issue 16): warm up on a 64-token prompt, then time
    whole ``generate`` calls (prefill included) at the full prompt, three in a row, so a first-call cost at a
    new shape shows as the first figure against the two after it."""
    torch, a = run.torch, run.args
    for impl in ("eager", "sdpa"):
        model = run.model(impl)
        ids, mask = run.inputs(int(model.config.vocab_size))
        with torch.no_grad():
            run.generate(model, ids[:, :64], mask[:, :64], 2)
            for i in range(3):
                run.sync()
                t0 = time.perf_counter()
                run.generate(model, ids, mask, a.new_tokens)
                run.sync()
                s = time.perf_counter() - t0
                out.append({"impl": impl, "call": i + 1, "seconds": round(s, 4),
                            "tokens_per_s": round(a.new_tokens * a.batch / s, 1)})
        del model
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--model")
    p.add_argument("--config", default="qwen2-1.5b", choices=sorted(CONFIGS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=4096)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--budget-s", type=float, default=300.0)
    p.add_argument("--no-investigation", action="store_true")
    p.add_argument("--repro", action="store_true", help="only the earlier check's method (see repro())")
    a = p.parse_args(argv)
    run = Run(a)
    torch, tf = run.torch, run.tf
    registered = registered_attention(tf)  # what attn_implementation accepts
    set_priority = None
    with contextlib.suppress(Exception):
        import inspect

        sdpa_kernel = importlib.import_module("torch.nn.attention").sdpa_kernel
        set_priority = "set_priority" in inspect.signature(sdpa_kernel).parameters
    result: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"gpu": torch.cuda.get_device_name(run.device), "torch": torch.__version__,
                    "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                    "transformers": tf.__version__, "python": platform.python_version()},
        "model": a.model or f"{a.config} dimensions, random weights",
        "random_weights": not a.model, "batch": a.batch, "prompt_len": a.prompt, "new_tokens": a.new_tokens,
        "dtype": "bfloat16", "attention_interface": registered,
        "sdpa_kernel_set_priority": set_priority, "e2e": [], "decode_investigation": [],
        "kernels": {},
    }

    def save() -> None:
        with open(a.out, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1)

    if a.repro:
        result["repro"] = []
        repro(run, result["repro"])
        save()
        for r in result["repro"]:
            print(f"repro {a.config} b{a.batch} p{a.prompt} n{a.new_tokens} {r['impl']:<6} call {r['call']}: "
                  f"{r['tokens_per_s']} tok/s ({r['seconds']} s)")
        return 0

    def investigate(impl: str, model: Any, ids: Any, mask: Any) -> None:
        """Why decode through sdpa is slow: the kernels of decode steps, and sdpa per forced backend."""
        if a.no_investigation or impl not in ("sdpa", "eager"):
            return
        with contextlib.suppress(Exception):
            result["kernels"][f"{impl}/mask"] = run.kernels(model, ids, mask)
        with contextlib.suppress(Exception):
            result["kernels"][f"{impl}/no-mask"] = run.kernels(model, ids, None)
        if impl != "sdpa":
            return
        for with_mask in (True, False):
            for backend in (None, *SDPA_BACKENDS):
                row: dict[str, Any] = {"impl": "sdpa", "backend": backend or "default", "mask": with_mask}
                result["decode_investigation"].append(row)
                if run.left() < 20:
                    row.update(status="skipped", reason="time budget spent")
                    continue
                try:
                    d = run.phases(model, ids, mask if with_mask else None, backend, reps=1, prefill=False)
                    row.update(status="ok", **d)
                except Exception as exc:  # a backend refusing a mask/shape is a finding, not a crash
                    row.update(status="error", reason=_short(exc))
                save()

    for impl in a.impls.split(","):
        if run.left() < 30:
            result["e2e"].append({"impl": impl, "status": "skipped", "reason": "time budget spent"})
            continue
        result["e2e"].append(measure(run, impl, functools.partial(investigate, impl)))
        save()
    result["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    save()
    for e in result["e2e"]:
        print(f"{e['impl']:<20} {e.get('status'):<11} prefill {e.get('prefill_tokens_per_s')} tok/s  "
              f"ttft {e.get('ttft_ms')} ms  decode {e.get('decode_tokens_per_s')} tok/s  "
              f"mem prefill {e.get('prefill_peak_mem_mib')} / gen {e.get('generate_peak_mem_mib')} MiB  "
              f"{e.get('reason') or ''}")
    for r in result["decode_investigation"]:
        print(f"  decode sdpa backend={r['backend']:<20} mask={r['mask']!s:<5} {r.get('status'):<7} "
              f"{r.get('decode_tokens_per_s')} tok/s  {r.get('decode_ms_per_step')} ms/step {r.get('reason') or ''}")
    for k, rows in result["kernels"].items():
        print(f"  kernels {k}:")
        for r in rows[:5]:
            print(f"     {r['total_ms']:>9} ms  {r['calls']:>5}x  {r['kernel'][:110]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
