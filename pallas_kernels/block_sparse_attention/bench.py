"""Correctness check + timing table: block-sparse kernel vs the best dense kernels, one run.

    python -m pallas_kernels.bench [--json FILE] [--lengths 8192 32768 131072] [--quick] [--first-rows]

Shapes are Llama 3.1 8B attention (32 query heads, 8 KV heads, head dim 128, causal, batch 1),
bf16, 128 x 128 tiles, random tile masks routed per KV head with the sink column and the diagonal
always on. Effective TFLOP/s counts block density x 2 N^2 D Hq (the causal FLOPs of the tiles that
run, PERFORMANCE.md's convention); speedup is over dense cuDNN in the same run.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp

from .api import block_sparse_attention, token_routed_attention
from .backward import sparse_attention_backward, transpose_schedule
from .forward import sparse_attention_forward
from .forward_hopper import hopper_attention_forward, hopper_supported
from .masks import block_density, causal_tiles, tile_mask
from .reference import chunked_reference_attention
from .route_gradient import SoftMask
from .schedule import build_schedule

# Relative Frobenius error bounds (the issue's): bf16 keeps 8 mantissa bits, fp16 11; with float32
# accumulation the error is dominated by rounding P and O to the input type.
TOLERANCE = {jnp.bfloat16: 1e-2, jnp.float16: 2e-3}
# Two bf16 outputs, each within TOLERANCE of the float32 result.
SORTED_VS_TILE_OR_BOUND = 2 * TOLERANCE[jnp.bfloat16]


def _size(n):
    """Shapes of the checks: as given on GPU, cut to 512 tokens on CPU (interpret mode)."""
    return n if jax.default_backend() == "gpu" else min(n, 512)


def random_tile_mask(key, batch, heads, n_tiles, density):
    """Bernoulli tiles below the diagonal, plus the sink column and the diagonal."""
    on = jax.random.bernoulli(key, density, (batch, heads, n_tiles, n_tiles))
    eye = jnp.eye(n_tiles, dtype=bool)
    return (on | eye | (jnp.arange(n_tiles) == 0)[None, :]) & causal_tiles(n_tiles, n_tiles)


def random_qkv(key, b, n, hq, hkv, d, dtype):
    kq, kk, kv = jax.random.split(key, 3)
    return (
        jax.random.normal(kq, (b, n, hq, d), dtype),
        jax.random.normal(kk, (b, n, hkv, d), dtype),
        jax.random.normal(kv, (b, n, hkv, d), dtype),
    )


def rel_err(out, ref):
    out = jnp.asarray(out, jnp.float32)
    return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))


def time_jax(fn, *args, min_round_s=0.05, rounds=5):
    """Median seconds per call: back-to-back asynchronous dispatches, one sync per round."""
    jax.block_until_ready(fn(*args))
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    reps = max(1, int(min_round_s / max(time.perf_counter() - t, 1e-6)))
    samples = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(reps):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t) / reps)
    return statistics.median(samples)


def correctness(log, result):
    rows = result["correctness"]
    """Kernel vs float32 reference on fresh inputs, poisoned (NaN) outputs checked for writes."""
    cases = [
        # name, n, hq, hkv, d, dtype, routing, density, codes, window
        ("bf16 8k GQA4 d128 p=0.25", 8192, 32, 8, 128, jnp.bfloat16, "kv", 0.25, False, 0),
        ("fp16 8k GQA4 d128 dense", 8192, 32, 8, 128, jnp.float16, "kv", 1.0, False, 0),
        ("bf16 ragged 3000 GQA8 d64 per-q", 3000, 16, 2, 64, jnp.bfloat16, "q", 0.3, False, 0),
        ("bf16 2k codes window 200", 2048, 8, 2, 128, jnp.bfloat16, "kv", 0.5, True, 200),
        ("fp16 sink+window only 4k", 4096, 8, 2, 128, jnp.float16, "kv", 0.0, False, 0),
    ]
    for name, n, hq, hkv, d, dtype, routing, dens, use_codes, window in cases:
        n = _size(n)
        key = jax.random.PRNGKey(len(rows) + 17)
        kq, km, kc = jax.random.split(key, 3)
        q, k, v = random_qkv(kq, 1, n, hq, hkv, d, dtype)
        r = hkv if routing == "kv" else hq
        nt = -(-n // 128)
        tm = random_tile_mask(km, 1, r, nt, dens)
        codes = jax.random.randint(kc, (1, r, n), 0, 4) if use_codes else None
        o = block_sparse_attention(q, k, v, tm, codes=codes, window=window, poison=True)
        npad = -(-n // 512) * 512
        pad = npad - n
        ref = chunked_reference_attention(
            *(jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v)),
            jnp.pad(tm, ((0, 0), (0, 0), (0, -(-npad // 128) - nt), (0, -(-npad // 128) - nt))),
            tile=128,
            codes=None if codes is None else jnp.pad(codes, ((0, 0), (0, 0), (0, pad))),
            window=window,
        )[:, :n]
        err = rel_err(o, ref)
        ok = err <= TOLERANCE[dtype] and bool(jnp.isfinite(o).all())
        rows.append(dict(case=name, rel_err=err, ok=ok))
        log(f"  {'ok ' if ok else 'BAD'} {name}: rel err {err:.2e}")
    # Token-level routing through sorting equals the tile-OR codes path, exactly per token.
    n, hq, hkv = _size(4096), 8, 2
    q, k, v = random_qkv(jax.random.PRNGKey(5), 1, n, hq, hkv, 128, jnp.bfloat16)
    codes = jax.random.randint(jax.random.PRNGKey(6), (1, hkv, n), 0, 8)
    o = token_routed_attention(q, k, v, codes, window=128)
    ref = chunked_reference_attention(
        q, k, v, jnp.ones((1, hkv, n // 128, n // 128), bool), tile=128, codes=codes, window=128
    )
    err = rel_err(o, ref)
    rows.append(
        dict(case="token-routed (sorted) 4k, 8 codes, window 128", rel_err=err, ok=err <= TOLERANCE[jnp.bfloat16])
    )
    log(f"  {'ok ' if rows[-1]['ok'] else 'BAD'} {rows[-1]['case']}: rel err {err:.2e}")


def tune(log, n=8192, hq=32, hkv=8, d=128):
    """Pick (num_warps, num_stages) on the dense schedule at one length."""
    n = _size(n)
    q, k, v = random_qkv(jax.random.PRNGKey(1), 1, n, hq, hkv, d, jnp.bfloat16)
    nt = n // 128
    sched = build_schedule(jnp.ones((1, hkv, nt, nt), bool))
    best, results = None, {}
    for warps, stages in ((8, 2), (8, 3), (4, 2), (4, 3), (8, 4)):
        try:
            fn = jax.jit(
                lambda q, k, v, s, w=warps, st=stages: sparse_attention_forward(
                    q, k, v, s, tile=128, num_warps=w, num_stages=st, interpret=jax.default_backend() != "gpu"
                )[0]
            )
            t = time_jax(fn, q, k, v, sched)
        except Exception as e:  # a config that does not compile is skipped, not fatal
            log(f"  warps={warps} stages={stages}: failed {type(e).__name__}: {str(e)[:200]}")
            continue
        results[f"{warps},{stages}"] = t
        log(f"  warps={warps} stages={stages}: {t * 1e3:.3f} ms ({2 * n * n * d * hq / t / 1e12:.0f} TFLOP/s)")
        if best is None or t < results[best]:
            best = f"{warps},{stages}"
    warps, stages = map(int, best.split(","))
    return warps, stages, results


def hopper_check(log, result):
    """Mosaic GPU kernel: correctness on fresh inputs, then time against the Triton kernel."""
    cases = [
        (2, 1024, 8, 2, 64, jnp.bfloat16, 0.5),
        (1, 2048, 8, 1, 128, jnp.float16, 0.3),
        (1, 8192, 32, 8, 128, jnp.bfloat16, 0.25),
        (1, 4096, 32, 8, 128, jnp.bfloat16, 1.0),
    ]
    for b, n, hq, hkv, d, dtype, dens in cases:
        q, k, v = random_qkv(jax.random.PRNGKey(n + d), b, n, hq, hkv, d, dtype)
        tm = random_tile_mask(jax.random.PRNGKey(3), b, hkv, n // 128, dens)
        o, lse = hopper_attention_forward(q, k, v, build_schedule(tm))
        ref, ref_lse = chunked_reference_attention(q, k, v, tm, tile=128, return_lse=True)
        err = rel_err(o, ref)
        lse_err = float(jnp.abs(lse - ref_lse).max())
        ok = err <= TOLERANCE[dtype] and bool(jnp.isfinite(o).all()) and lse_err < 1e-2
        result["correctness"].append(
            dict(case=f"hopper b{b} n{n} {hq}:{hkv} d{d} {jnp.dtype(dtype).name} p{dens}", rel_err=err, ok=ok)
        )
        log(
            f"  {'ok ' if ok else 'BAD'} hopper b={b} n={n} {hq}:{hkv} d={d} {jnp.dtype(dtype).name} "
            f"p={dens}: rel err {err:.2e}, lse max abs err {lse_err:.1e}"
        )


def torch_baselines(q, k, v, tm, densities_masks, log):
    """torch SDPA (dense) and FlexAttention (same tile masks) on the same data via DLPack."""
    try:
        import torch
        from torch.nn.attention.flex_attention import BlockMask, flex_attention
        from triton.testing import do_bench
    except Exception as e:  # torch is optional
        log(f"  torch unavailable: {e}")
        return None, {}
    tq, tk, tv = (torch.from_dlpack(x).transpose(1, 2).contiguous() for x in (q, k, v))
    hq = tq.shape[1]
    group = hq // tk.shape[1]
    sdpa = (
        do_bench(
            lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True, enable_gqa=True),
            return_mode="median",
        )
        / 1e3
    )
    flex = torch.compile(flex_attention)
    out = {}
    for dens, mask in densities_masks.items():
        m = torch.from_dlpack(mask.astype(jnp.int32)).bool().repeat_interleave(group, dim=1)
        nt = m.shape[-1]
        eye = torch.eye(nt, dtype=torch.bool, device=m.device)
        full, partial = m & ~eye, m & eye

        # Active tiles first (stable), so the first `count` indices are the list.
        def lists(x):
            return x.sum(-1).int(), torch.argsort((~x).int(), dim=-1, stable=True).int()

        pc, pi = lists(partial)
        fc, fi = lists(full)
        bm = BlockMask.from_kv_blocks(pc, pi, fc, fi, BLOCK_SIZE=128, mask_mod=lambda b, h, qi, ki: qi >= ki)
        try:
            out[dens] = (
                do_bench(lambda bm=bm: flex(tq, tk, tv, block_mask=bm, enable_gqa=True), return_mode="median") / 1e3
            )
        except Exception as e:
            log(f"  flex failed at density {dens}: {type(e).__name__}: {str(e)[:200]}")
    return sdpa, out


def main(argv=None):
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave room for torch
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write all results to this file")
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--densities", type=float, nargs="+", default=[0.05, 0.1, 0.25, 0.5, 1.0])
    ap.add_argument("--backward-max-n", type=int, default=32768, help="time forward+backward up to this length")
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip remaining rows after this")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--first-rows", action="store_true",
                    help="also time the forward with random in-tile first rows beside first_rows=None, same tiles")
    ap.add_argument("--backward-slices", action="store_true",
                    help="also time the backward kernels with dk/dv programs of 64 keys and 32- or 64-row query steps")
    args = ap.parse_args(argv)
    t_start = time.time()

    def log(s):
        print(s, flush=True)

    failures = []  # a crashed section or an out-of-tolerance check: the run exits non-zero

    def failed(section):
        failures.append(section)
        log(f"FAILED {section}:\n{traceback.format_exc()}")

    dev = jax.devices()[0]
    log(f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    result = dict(device=dev.device_kind, jax=jax.__version__, correctness=[], table=[], token=[], backward_slices=[],
                  first_rows=[])
    on_gpu = jax.default_backend() == "gpu"
    log("correctness (relative Frobenius error vs float32 reference):")
    for check in (correctness, grad_check) + ((hopper_check,) if on_gpu else ()):
        try:
            check(log, result)
        except Exception:
            failed(check.__name__)
    log("tuning the Triton kernel's num_warps / num_stages at 8k dense:")
    warps, stages = 8, 3
    try:
        warps, stages, result["tuning"] = tune(log)
    except Exception:
        failed("tuning")
    log(f"  using num_warps={warps} num_stages={stages}")

    hq, hkv, d = 32, 8, 128
    dense_impl = "cudnn" if on_gpu else "xla"
    hopper = hopper_supported(jnp.zeros((1, 1, 1, d), jnp.bfloat16), 128)
    for n in args.lengths:
        if time.time() - t_start > args.budget_s:
            log(f"budget spent: skipping N={n}")
            continue
        try:
            q, k, v = random_qkv(jax.random.PRNGKey(n), 1, n, hq, hkv, d, jnp.bfloat16)
            ct = jax.random.normal(jax.random.PRNGKey(n + 2), q.shape, jnp.bfloat16)
            nt = n // 128
            flops = 2 * n * n * d * hq
            dense = jax.jit(
                lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=dense_impl)
            )
            t_dense = time_jax(dense, q, k, v)
            with_bwd = n <= args.backward_max_n
            if with_bwd:
                dense_fb = jax.jit(
                    jax.grad(
                        lambda q, k, v, ct, dense=dense: jnp.vdot(dense(q, k, v), ct).astype(jnp.float32),
                        argnums=(0, 1, 2),
                    )
                )
                t_dense_fb = time_jax(dense_fb, q, k, v, ct)
            masks = {
                dn: random_tile_mask(jax.random.PRNGKey(int(dn * 1000) + n), 1, hkv, nt, dn) for dn in args.densities
            }
            sdpa, flex = (None, {}) if args.no_torch else torch_baselines(q, k, v, None, masks, log)
            triton = jax.jit(
                lambda q, k, v, s: sparse_attention_forward(
                    q, k, v, s, tile=128, num_warps=warps, num_stages=stages, interpret=not on_gpu
                )[0]
            )
            mgpu = jax.jit(lambda q, k, v, s: hopper_attention_forward(q, k, v, s)[0])
            full = jax.jit(lambda q, k, v, m: block_sparse_attention(q, k, v, m, num_warps=warps, num_stages=stages))
            full_fb = jax.jit(
                jax.grad(
                    lambda q, k, v, m, ct: jnp.vdot(
                        block_sparse_attention(q, k, v, m, num_warps=warps, num_stages=stages), ct
                    ).astype(jnp.float32),
                    argnums=(0, 1, 2),
                )
            )
            for dn, mask in masks.items():
                bd = float(block_density(mask))
                sched = build_schedule(mask)
                t_api = time_jax(full, q, k, v, mask)
                row = dict(
                    N=n,
                    target_density=dn,
                    block_density=bd,
                    dense_ms=t_dense * 1e3,
                    dense_tflops=flops / t_dense / 1e12,
                    api_ms=t_api * 1e3,
                    eff_tflops=bd * flops / t_api / 1e12,
                    speedup_vs_dense=t_dense / t_api,
                    triton_ms=time_jax(triton, q, k, v, sched) * 1e3,
                    hopper_ms=time_jax(mgpu, q, k, v, sched) * 1e3 if hopper else None,
                    sdpa_ms=None if sdpa is None else sdpa * 1e3,
                    flex_ms=None if dn not in flex else flex[dn] * 1e3,
                    fwdbwd_ms=time_jax(full_fb, q, k, v, mask, ct) * 1e3 if with_bwd else None,
                    dense_fwdbwd_ms=t_dense_fb * 1e3 if with_bwd else None,
                )
                result["table"].append(row)
                log("  " + ", ".join(f"{key} {val:.4g}" for key, val in row.items() if val is not None))
            del q, k, v
        except Exception:
            failed(f"timing table at N={n}")

    log("token-level routing: code-sorted passes vs tile-OR schedule on the same codes")
    for n in [x for x in args.lengths if x <= 32768]:
        if time.time() - t_start > args.budget_s:
            continue
        try:
            q, k, v = random_qkv(jax.random.PRNGKey(n + 1), 1, n, hq, hkv, d, jnp.bfloat16)
            for num_codes in (4, 16):
                codes = jax.random.randint(jax.random.PRNGKey(num_codes), (1, hkv, n), 0, num_codes)
                tile_or = tile_mask(codes, tile=128, window=128, sink=True)
                f_or = jax.jit(
                    lambda q, k, v, c, m: block_sparse_attention(
                        q, k, v, m, codes=c, window=128, num_warps=warps, num_stages=stages
                    )
                )
                f_sort = jax.jit(
                    lambda q, k, v, c: token_routed_attention(
                        q, k, v, c, window=128, num_warps=warps, num_stages=stages
                    )
                )
                t_or = time_jax(f_or, q, k, v, codes, tile_or)
                t_sort = time_jax(f_sort, q, k, v, codes)
                # Training: fwd + bwd (dq, dk, dv), and with the router's gradient kernels in the backward
                # (routes of the paper preset: L = 13 levels of p = 2, one-hot as the straight-through
                # forward gives them).
                soft = SoftMask(6.0, 0.5, 13, 2)
                routes = jax.nn.one_hot(jax.random.randint(jax.random.PRNGKey(7), (1, hkv, n, 13), 0, 2), 2)
                ct = jax.random.normal(jax.random.PRNGKey(n + 3), q.shape, jnp.bfloat16)

                def sorted_loss(q, k, v, r, c, ct, routed, soft=soft):
                    o = token_routed_attention(q, k, v, c, window=128, num_warps=warps, num_stages=stages,
                                               routes=r if routed else None, soft_mask=soft if routed else None)
                    return jnp.vdot(o, ct).astype(jnp.float32)

                t_fb, t_fb_routes = (
                    time_jax(jax.jit(jax.grad(functools.partial(sorted_loss, routed=routed), argnums=(0, 1, 2, 3))),
                             q, k, v, routes, codes, ct)
                    for routed in (False, True))
                err = rel_err(f_sort(q, k, v, codes), f_or(q, k, v, codes, tile_or).astype(jnp.float32))
                row = dict(
                    N=n,
                    num_codes=num_codes,
                    tile_or_density=float(block_density(tile_or)),
                    tile_or_ms=t_or * 1e3,
                    sorted_ms=t_sort * 1e3,
                    sorted_vs_tile_or_err=err,
                    sorted_fwdbwd_ms=t_fb * 1e3,
                    sorted_fwdbwd_router_ms=t_fb_routes * 1e3,
                )
                result["token"].append(row)
                # Two bf16 kernels over the same exact mask, summing in different orders: each output is
                # within a bf16 rounding or two of the float32 result (TOLERANCE of the correctness checks).
                if not err <= SORTED_VS_TILE_OR_BOUND:
                    failures.append(f"sorted vs tile-OR at N={n}, {num_codes} codes: {err:.2e}")
                log(
                    f"  N={n} codes={num_codes}: tile-OR density {row['tile_or_density']:.3f} "
                    f"{t_or * 1e3:.3f} ms; sorted {t_sort * 1e3:.3f} ms; diff {err:.1e}; sorted fwd+bwd "
                    f"{t_fb * 1e3:.3f} ms, with the router-gradient kernels {t_fb_routes * 1e3:.3f} ms"
                )
        except Exception:
            failed(f"token routing at N={n}")

    if args.first_rows:
        log("in-tile first rows: forward with random first rows vs first_rows=None, same tiles:")
        try:
            first_rows_rows(log, result, args.lengths, args.densities, warps, stages)
        except Exception:
            failed("first rows")
    if args.backward_slices:
        log("backward kernels (dq + dk/dv, raw) with dk/dv in slices:")
        try:
            backward_slices(log, result, [x for x in args.lengths if x <= args.backward_max_n])
        except Exception:
            failed("backward slices")
    print_table(result, log)
    log(f"total {time.time() - t_start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    failures += [f"correctness: {r}" for r in result["correctness"] if not r["ok"]]
    for failure in failures:
        log(f"FAILED: {failure}")
    return 1 if failures else 0


def random_first_rows(key, tiles, tile=128, zero_share=0.5):
    """int32 first rows of tiles' shape: 0 on about `zero_share` of the tiles, else uniform in [1, tile)."""
    k1, k2 = jax.random.split(key)
    first = jax.random.randint(k1, tiles.shape, 1, tile, jnp.int32)
    return jnp.where(jax.random.bernoulli(k2, zero_share, tiles.shape), 0, first)


def first_rows_rows(log, result, lengths, densities, warps, stages):
    """The masking's overhead: each kernel's forward over the same tiles with random first rows (half of
    the tiles at 0) and with first_rows=None; the API row adds building the schedule. One correctness check
    per length against the chunked float32 reference."""
    hq, hkv, d, tile = 32, 8, 128, 128
    interpret = jax.default_backend() != "gpu"
    hopper = hopper_supported(jnp.zeros((1, 1, 1, d), jnp.bfloat16), tile)
    triton = jax.jit(lambda q, k, v, s: sparse_attention_forward(
        q, k, v, s, tile=tile, num_warps=warps, num_stages=stages, interpret=interpret)[0])
    mgpu = jax.jit(lambda q, k, v, s: hopper_attention_forward(q, k, v, s)[0])
    api = jax.jit(lambda q, k, v, m, f: block_sparse_attention(q, k, v, m, first_rows=f, num_warps=warps,
                                                               num_stages=stages))
    for n in lengths:
        n = _size(n)
        q, k, v = random_qkv(jax.random.PRNGKey(n + 5), 1, n, hq, hkv, d, jnp.bfloat16)
        for dn in densities:
            mask = random_tile_mask(jax.random.PRNGKey(int(dn * 1000) + n), 1, hkv, n // tile, dn)
            first = random_first_rows(jax.random.PRNGKey(n + int(dn * 1000) + 1), mask, tile)
            plain, rows = build_schedule(mask), build_schedule(mask, first)
            row = dict(N=n, block_density=float(block_density(mask)),
                       triton_ms=time_jax(triton, q, k, v, plain) * 1e3,
                       triton_first_rows_ms=time_jax(triton, q, k, v, rows) * 1e3,
                       api_ms=time_jax(api, q, k, v, mask, None) * 1e3,
                       api_first_rows_ms=time_jax(api, q, k, v, mask, first) * 1e3)
            if hopper:
                row.update(hopper_ms=time_jax(mgpu, q, k, v, plain) * 1e3,
                           hopper_first_rows_ms=time_jax(mgpu, q, k, v, rows) * 1e3)
            if dn == densities[0] and n <= 32768:  # the float32 reference grows as N²
                ref = chunked_reference_attention(q, k, v, mask, tile=tile, first_rows=first,
                                                  chunk=min(512, n))
                row["rel_err"] = rel_err(api(q, k, v, mask, first), ref)
                result["correctness"].append(dict(case=f"first rows N={n} p={dn}", rel_err=row["rel_err"],
                                                  ok=row["rel_err"] <= TOLERANCE[jnp.bfloat16]))
            result["first_rows"].append(row)
            log("  " + ", ".join(f"{key} {val:.4g}" for key, val in row.items()))


def backward_slices(log, result, lengths, densities=(0.1, 0.5, 1.0)):
    """The raw backward kernels at several dk/dv slice sizes (`sparse_attention_backward`'s dkv_key_rows and
    dkv_query_rows), same inputs: time, and the largest relative difference from the whole-tile default."""
    hq, hkv, d, tile = 32, 8, 128, 128
    variants = ((None, None), (64, None), (64, 32), (64, 64))
    interpret = jax.default_backend() != "gpu"
    for n in lengths:
        q, k, v = random_qkv(jax.random.PRNGKey(n + 5), 1, n, hq, hkv, d, jnp.bfloat16)
        do = jax.random.normal(jax.random.PRNGKey(n + 6), q.shape, jnp.bfloat16)
        for dn in densities:
            mask = random_tile_mask(jax.random.PRNGKey(int(dn * 1000) + n), 1, hkv, n // tile, dn)
            schedules = build_schedule(mask), transpose_schedule(mask)
            o, lse = sparse_attention_forward(q, k, v, schedules[0], tile=tile, interpret=interpret)
            whole = None
            for key_rows, query_rows in variants:
                backward = jax.jit(functools.partial(sparse_attention_backward, tile=tile, interpret=interpret,
                                                     dkv_key_rows=key_rows, dkv_query_rows=query_rows))
                args = (q, k, v, o, lse, do, None, *schedules)
                grads = backward(*args)
                whole = grads if whole is None else whole
                diff = max(rel_err(a, b.astype(jnp.float32)) for a, b in zip(grads, whole, strict=True))
                row = dict(N=n, block_density=float(block_density(mask)), dkv_key_rows=key_rows or tile,
                           dkv_query_rows=query_rows or tile, backward_ms=time_jax(backward, *args) * 1e3,
                           rel_diff_vs_whole_tile=diff)
                result["backward_slices"].append(row)
                log("  " + ", ".join(f"{key} {val:.4g}" for key, val in row.items()))


def grad_check(log, result):
    """Kernel gradients vs jax.grad of the float32 chunked reference, fresh inputs."""
    n, hq, hkv, d = _size(4096), 16, 4, 128
    for routing, use_codes in (("kv", False), ("q", False), ("kv", True)):
        q, k, v = random_qkv(jax.random.PRNGKey(len(result["correctness"])), 1, n, hq, hkv, d, jnp.bfloat16)
        r = hkv if routing == "kv" else hq
        tm = random_tile_mask(jax.random.PRNGKey(9), 1, r, n // 128, 0.3)
        codes = jax.random.randint(jax.random.PRNGKey(4), (1, r, n), 0, 4) if use_codes else None
        ct = jax.random.normal(jax.random.PRNGKey(8), q.shape, jnp.float32)

        def loss(q, k, v, ct, tm=tm, codes=codes):
            o = block_sparse_attention(q, k, v, tm, codes=codes, window=64)
            return jnp.sum(o.astype(jnp.float32) * ct)

        def ref_loss(q, k, v, ct, tm=tm, codes=codes):
            return jnp.sum(chunked_reference_attention(q, k, v, tm, tile=128, codes=codes, window=64) * ct)

        g = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v, ct)
        gr = jax.jit(jax.grad(ref_loss, argnums=(0, 1, 2)))(*(x.astype(jnp.float32) for x in (q, k, v)), ct)
        errs = [rel_err(a, b) for a, b in zip(g, gr, strict=True)]
        ok = max(errs) <= TOLERANCE[jnp.bfloat16] and all(bool(jnp.isfinite(a).all()) for a in g)
        name = f"grad 4k 16:4 per-{routing} codes={use_codes}"
        result["correctness"].append(dict(case=name, rel_err=max(errs), ok=ok))
        log(f"  {'ok ' if ok else 'BAD'} {name}: dq {errs[0]:.2e} dk {errs[1]:.2e} dv {errs[2]:.2e}")


def print_table(result, log):
    f = lambda x, p=3: "—" if x is None else f"{x:.{p}f}"  # noqa: E731
    log("")
    log(
        "Forward, bf16, Hq 32, Hkv 8, D 128, batch 1, causal; ours = block_sparse_attention (auto "
        "backend, schedule build included); dense = jax cuDNN"
    )
    log(
        "| N | block density | ours ms | eff. TFLOP/s | speedup vs dense | Hopper kernel ms | "
        "Triton kernel ms | cuDNN ms | SDPA ms | Flex ms | ours fwd+bwd ms | cuDNN fwd+bwd ms |"
    )
    log("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in result["table"]:
        log(
            f"| {r['N']} | {r['block_density']:.3f} | {r['api_ms']:.3f} | {r['eff_tflops']:.0f} | "
            f"{r['speedup_vs_dense']:.2f}x | {f(r['hopper_ms'])} | {f(r['triton_ms'])} | "
            f"{r['dense_ms']:.3f} | {f(r['sdpa_ms'])} | {f(r['flex_ms'])} | {f(r['fwdbwd_ms'], 2)} | "
            f"{f(r['dense_fwdbwd_ms'], 2)} |"
        )
    for n in sorted({r["N"] for r in result["table"]}):
        rows = sorted((r for r in result["table"] if r["N"] == n), key=lambda r: r["block_density"])
        beat = [r["block_density"] for r in rows if r["speedup_vs_dense"] > 1]
        log(
            f"crossover N={n}: ours beats dense cuDNN up to block density "
            f"{max(beat) if beat else 0:.3f} (largest measured density where it wins)"
        )
    if result["backward_slices"]:
        log("")
        log("Backward kernels (dq + dk/dv), bf16, same shapes: dk/dv programs of `key rows` keys, walking query "
            "tiles `query rows` at a time (128 / 128 = the default)")
        log("| N | block density | key rows | query rows | ms | max rel. diff vs default |")
        log("| --- | --- | --- | --- | --- | --- |")
        for r in result["backward_slices"]:
            log(f"| {r['N']} | {r['block_density']:.3f} | {r['dkv_key_rows']} | {r['dkv_query_rows']} | "
                f"{r['backward_ms']:.3f} | {r['rel_diff_vs_whole_tile']:.1e} |")
    if result["token"]:
        log("")
        log("Token-level routing, exact codes, window 128 (same shapes): the tile-OR schedule of the codes vs the "
            "code-sorted passes; training fwd+bwd of the sorted passes, without and with the router's gradient "
            "kernels in the backward (L 13, p 2)")
        log("| N | codes | tile-OR density | tile-OR ms | sorted ms | sorted fwd+bwd ms | + router gradient ms |")
        log("| --- | --- | --- | --- | --- | --- | --- |")
        for r in result["token"]:
            log(f"| {r['N']} | {r['num_codes']} | {r['tile_or_density']:.3f} | {r['tile_or_ms']:.3f} | "
                f"{r['sorted_ms']:.3f} | {r['sorted_fwdbwd_ms']:.3f} | {r['sorted_fwdbwd_router_ms']:.3f} |")


if __name__ == "__main__":
    sys.exit(main())
