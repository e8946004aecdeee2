"""Registers, spills and shared memory of the Triton kernels on sm_90, estimated without a GPU.

    pip install triton==3.9.0     # compiles Triton IR for a GPU target on any machine; ships ptxas
    python -m pallas_kernels.resources [--head-dim 128] [--tile 128] [--levels 13] [--tokens 4096] [--first-rows]

Pallas lowers every kernel of one training step's attention (the code-sorted forward, the dq and dk/dv
backward, and the router-gradient kernels) to Triton IR on this machine: jax's GPU probe is told
"compute capability 9.0", and the lowering hook keeps each module's text with its num_warps and
num_stages (with --first-rows: the tile-mask forward and backward, without and with in-tile first rows,
instead). pip's triton compiles each for GPUTarget("cuda", 90, 32) and its bundled ptxas assembles the
PTX with -v. jaxlib compiles with its own Triton build, so these are estimates of what an H100 runs,
good for finding spills and shared-memory overflows before a device call (docs/KERNEL_NOTES.md).
Written for the jax of the device (0.11.2); other versions may name the hooked internals differently.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

H100_SHARED_BYTES = 227 * 1024


def capture_triton_modules(fn, *args) -> list[dict]:
    """Lower `fn(*args)` for CUDA on this machine → [{name, ir, num_warps, num_stages}] per Pallas kernel."""
    import jax
    import jax._src.pallas.triton.gpu_info as gpu_info
    import jax._src.pallas.triton.pallas_call_registration as registration

    gpu_info.get_gpu_info = lambda: gpu_info.GpuInfo(gpu_version=None, arch_name="9.0", compute_capability=90)
    modules = []
    lower = registration.lowering.lower_jaxpr_to_triton_module

    def keep(*a, **k):
        result = lower(*a, **k)
        caller = sys._getframe(1).f_locals  # num_warps / num_stages are resolved before the lowering
        text = result.module.operation.get_asm()
        name = re.search(r"tt\.func public @(\w+)", text).group(1)
        modules.append(dict(name=name, ir=text, num_warps=caller["num_warps"], num_stages=caller["num_stages"]))
        return result

    registration.lowering.lower_jaxpr_to_triton_module = keep
    try:
        jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    finally:
        registration.lowering.lower_jaxpr_to_triton_module = lower
    return modules


def compile_for_sm90(module: dict, workdir: str) -> dict:
    """Triton IR text → {shared bytes, registers, spill bytes} from pip triton and ptxas -v."""
    import triton
    from triton.backends.compiler import GPUTarget

    path = os.path.join(workdir, module["name"] + ".ttir")
    with open(path, "w") as f:
        f.write(module["ir"])
    kernel = triton.compile(path, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": module["num_warps"], "num_stages": module["num_stages"]})
    ptx = path + ".ptx"
    with open(ptx, "w") as f:
        f.write(kernel.asm["ptx"])
    # The bundled plain `ptxas` predates PTX 9.4; the Blackwell one assembles sm_90a as well.
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas-blackwell")
    report = subprocess.run([ptxas, "-arch=sm_90a", "-v", ptx, "-o", os.devnull], capture_output=True,
                            text=True, check=True).stderr

    def number(pattern):
        match = re.search(pattern, report)
        return int(match.group(1)) if match else 0

    return dict(shared=kernel.metadata.shared, registers=number(r"Used (\d+) registers"),
                spill_stores=number(r"(\d+) bytes spill stores"), spill_loads=number(r"(\d+) bytes spill loads"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--levels", type=int, default=13, help="router tree levels L (p = 2)")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--first-rows", action="store_true",
                        help="the tile-mask kernels (forward, dq, dk/dv) without and with in-tile first rows")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

    import jax
    import jax.numpy as jnp

    from pallas_kernels.block_sparse_attention import SoftMask, block_sparse_attention, token_routed_attention

    b, n, hq, hkv, d = 1, args.tokens, 32, 8, args.head_dim
    soft = SoftMask(6.0, 0.5, args.levels, 2)
    q = jax.ShapeDtypeStruct((b, n, hq, d), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((b, n, hkv, d), jnp.bfloat16)
    codes = jax.ShapeDtypeStruct((b, hkv, n), jnp.int32)
    routes = jax.ShapeDtypeStruct((b, hkv, n, args.levels, 2), jnp.float32)

    def loss(q, k, v, codes, routes):
        out = token_routed_attention(q, k, v, codes, tile=args.tile, window=128, interpret=False, routes=routes,
                                     soft_mask=soft)
        return out.astype(jnp.float32).sum()

    if args.first_rows:
        nt = n // args.tile
        tiles = jax.ShapeDtypeStruct((b, hkv, nt, nt), jnp.bool_)
        first = jax.ShapeDtypeStruct((b, hkv, nt, nt), jnp.int32)
        modules = []
        for label, with_first in (("", False), (" (first rows)", True)):
            def tile_loss(q, k, v, tiles, first, with_first=with_first):
                out = block_sparse_attention(q, k, v, tiles, tile=args.tile, interpret=False, backend="triton",
                                             first_rows=first if with_first else None)
                return out.astype(jnp.float32).sum()

            found = capture_triton_modules(jax.grad(tile_loss, argnums=(0, 1, 2)), q, kv, kv, tiles, first)
            modules += [dict(m, label=m["name"] + label) for m in found]
        what = "tile-mask forward and backward, without and with first rows"
    else:
        modules = capture_triton_modules(jax.grad(loss, argnums=(0, 1, 2, 4)), q, kv, kv, codes, routes)
        what = f"one training step's attention kernels, router L = {args.levels}, p = 2"
    print(f"sm_90 estimate (pip triton, ptxas -v): {what}, Hq {hq}, Hkv {hkv}, head dim {d}, tile {args.tile}, "
          "routing per KV head")
    print("| kernel | warps | stages | registers | spill stores B | spill loads B | shared KB | fits 227 KB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    seen = set()
    with tempfile.TemporaryDirectory() as workdir:
        for module in modules:
            label = module.get("label", module["name"])
            if label in seen:
                continue
            seen.add(label)
            r = compile_for_sm90(module, workdir)
            print(f"| {label} | {module['num_warps']} | {module['num_stages']} | {r['registers']} | "
                  f"{r['spill_stores']} | {r['spill_loads']} | {r['shared'] / 1024:.0f} | "
                  f"{'yes' if r['shared'] <= H100_SHARED_BYTES else 'NO'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
