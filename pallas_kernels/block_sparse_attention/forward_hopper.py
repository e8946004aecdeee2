"""Block-sparse causal attention forward for Hopper: Pallas Mosaic GPU (wgmma + TMA).

One CTA per (query head, 128-row query tile, batch), three warpgroups:
- warpgroups 0 and 1 compute: each owns 64 rows of the query tile (one wgmma M), both walk the
  same active-key list (they share head and tile, so any routing works);
- warpgroup 2 streams K/V: it reads the schedule from GMEM, and TMA-copies each listed key tile
  into a ring of `stages` shared-memory slots, refilling a slot once both compute warpgroups
  have released it. Skipped tiles are never fetched.
The two compute warpgroups alternate tensor-core and softmax phases through a shared barrier
(ping-pong), so one's exp2 work hides behind the other's wgmma. Lists ascend, so only the last
listed tile can be the diagonal: every other step runs without a mask.

Tile rule only (TILE): the token-rule variants (codes, bucket, local) run on the portable kernel.
With in-tile first rows the schedule lists the tiles that need no mask first (`plain` of them); the
rest (the diagonal, first row > 0) run one more compare per row: rows above the first row see nothing.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from .schedule import Schedule

LOG2E = math.log2(math.e)
TILE = 128  # key tile = mask tile; the query tile is 2 x 64 rows (one per compute warpgroup)
ROWS = 64


def _transposed(ref):
    if jax.__version_info__ >= (0, 11):
        return ref.transpose((1, 0))
    return plgpu.transpose_ref(ref, (1, 0))


def hopper_supported(q: jax.Array, tile: int) -> bool:
    """Whether this kernel applies: a CUDA device of compute capability 9.x, tile 128."""
    try:
        dev = jax.devices()[0]
        cc = getattr(dev, "compute_capability", "")
    except RuntimeError:
        return False
    return (
        dev.platform == "gpu"
        and str(cc).startswith("9")
        and tile == TILE
        and q.dtype in (jnp.bfloat16, jnp.float16)
        and q.shape[-1] in (64, 128)
    )


@functools.partial(jax.jit, static_argnames=("sm_scale", "stages"))
def hopper_attention_forward(
    q: jax.Array, k: jax.Array, v: jax.Array, schedule: Schedule, *, sm_scale: float | None = None, stages: int = 2
) -> tuple[jax.Array, jax.Array]:
    """Same contract as `sparse_attention_forward(..., tile=128, rule=Rule.TILE)`.

    q: [batch, tokens, q_heads, head_dim]; k, v: [batch, tokens, kv_heads, head_dim]; tokens a
    multiple of 128. schedule: counts [B', R', q_tiles], indices [B', R', q_tiles, k_tiles].
    With first rows (`build_schedule(tile_mask, first_rows)`: first_rows and plain in the schedule),
    the query rows of a tile above an entry's first row do not see its keys.
    Returns o: [batch, tokens, q_heads, head_dim] (q.dtype), lse: [batch, q_heads, tokens] f32.
    """
    b, n, hq, d = q.shape
    hkv = k.shape[2]
    group = hq // hkv
    nq = n // TILE
    if n % TILE:
        raise ValueError(f"tokens {n} must be a multiple of {TILE}")
    counts, indices, first_rows, plain = schedule
    has_first_rows = first_rows is not None
    sb, sr = counts.shape[:2]
    dtype = q.dtype
    scale = (d**-0.5 if sm_scale is None else sm_scale) * LOG2E

    cast = plgpu.layout_cast

    def iota(dim):
        return plgpu.broadcasted_iota(jnp.int32, (ROWS, TILE), dim, layout=plgpu.Layout.WGMMA)

    def body(counts_ref, idx_ref, first_ref, plain_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, scoped):
        (q_smem2, k_smem, v_smem, lse_smem2), (k_ready, v_ready, q_ready), (k_free, v_free), pingpong = scoped
        bi = lax.axis_index("batch")
        h = lax.axis_index("heads")
        qi = nq - 1 - lax.axis_index("q")  # heaviest tiles first
        wg = lax.axis_index("wg")
        sbi = 0 if sb == 1 else bi
        r = 0 if sr == 1 else (h if sr == hq else h // group)
        count = counts_ref[sbi, r, qi]

        def pingpong_round():
            plgpu.barrier_arrive(pingpong)
            plgpu.barrier_wait(pingpong)

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            q_smem, lse_smem = q_smem2.at[wg], lse_smem2.at[wg]
            row0 = qi * TILE + wg * ROWS
            plgpu.copy_gmem_to_smem(q_ref.at[bi, pl.ds(row0, ROWS), h], q_smem, q_ready.at[wg])
            plgpu.barrier_wait(q_ready.at[wg])
            carry = (
                cast(jnp.zeros((ROWS, d), jnp.float32), plgpu.Layout.WGMMA),
                cast(jnp.full((ROWS,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1)),
                cast(jnp.zeros((ROWS,), jnp.float32), plgpu.Layout.WGMMA.reduce(1)),
            )
            pl.when(wg == 1)(pingpong_round)  # offsets warpgroup 1 by one phase

            def step(s, carry, masked: bool):
                acc, m, denom = carry
                slot = lax.rem(s, stages)
                plgpu.barrier_wait(k_ready.at[slot])

                def qk(acc_ref):
                    plgpu.wgmma(acc_ref, q_smem, _transposed(k_smem.at[slot]))
                    pingpong_round()
                    return acc_ref[...]

                sc = pl.run_scoped(qk, plgpu.ACC((ROWS, TILE), jnp.float32))
                plgpu.barrier_arrive(k_free.at[slot])
                if masked:
                    kb = idx_ref[sbi, r, qi, s]
                    vis = iota(0) + row0 >= iota(1) + kb * TILE
                    if has_first_rows:  # rows above the entry's first row: offsets in the 128-row tile
                        vis = vis & (iota(0) + wg * ROWS >= first_ref[sbi, r, qi, s])
                    sc = jnp.where(vis, sc, -jnp.inf)
                # Without first rows every row keeps >= 1 visible key per step (the diagonal tile holds
                # key i), so m is finite after the first step and exp2 never sees -inf - -inf. With
                # them a row may see nothing yet: shift it by 0 (its p is 0 and its alpha 0 or 1).
                m_new = jnp.maximum(m, sc.max(axis=1) * scale)
                m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if has_first_rows and masked else m_new
                alpha = jnp.exp2(m - m_use)
                p = jnp.exp2(sc * scale - lax.broadcast_in_dim(m_use, sc.shape, [0]))
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                denom = denom * alpha + p.sum(axis=1)
                p16 = p.astype(dtype)
                plgpu.barrier_arrive(pingpong)  # softmax done: the other warpgroup may issue
                plgpu.barrier_wait(v_ready.at[slot])
                plgpu.barrier_wait(pingpong)

                def pv(acc_ref):
                    plgpu.wgmma(acc_ref, p16, v_smem.at[slot])

                acc = pl.run_state(pv)(plgpu.ACC.init(acc))
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m_new, denom

            last = plain_ref[sbi, r, qi] if has_first_rows else jnp.maximum(count - 1, 0)
            carry = lax.fori_loop(0, last, functools.partial(step, masked=False), carry)
            acc, m, denom = lax.fori_loop(last, count, functools.partial(step, masked=True), carry)
            pl.when(wg == 0)(pingpong_round)

            empty = denom == 0.0
            l_safe = jnp.where(empty, 1.0, denom)
            q_smem[...] = (acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])).astype(dtype)
            lse_smem[...] = jnp.where(empty, -jnp.inf, m * (1 / LOG2E) + jnp.log(l_safe))
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem, o_ref.at[bi, pl.ds(row0, ROWS), h])
            plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[bi, h, pl.ds(row0, ROWS)])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")
            kvh = h // group

            def fetch(s, slot):
                rows = (bi, pl.ds(idx_ref[sbi, r, qi, s] * TILE, TILE), kvh)
                plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_ready.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_ready.at[slot])

            for i in range(stages):
                pl.when(i < count)(functools.partial(fetch, i, i))

            def refill(s, _):
                slot = lax.rem(s, stages)
                rows = (bi, pl.ds(idx_ref[sbi, r, qi, s] * TILE, TILE), kvh)
                plgpu.barrier_wait(k_free.at[slot])
                plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_ready.at[slot])
                plgpu.barrier_wait(v_free.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_ready.at[slot])

            lax.fori_loop(stages, jnp.maximum(count, stages), refill, None)

    def entry(counts_ref, idx_ref, *refs):
        first_ref, plain_ref = (refs[0], refs[1]) if has_first_rows else (None, None)
        q_ref, k_ref, v_ref, o_ref, lse_ref = refs[-5:]
        swizzled = dict(transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))
        pl.run_scoped(
            lambda *scoped: body(counts_ref, idx_ref, first_ref, plain_ref, q_ref, k_ref, v_ref, o_ref, lse_ref,
                                 scoped),
            (
                plgpu.SMEM((2, ROWS, d), dtype, **swizzled),
                plgpu.SMEM((stages, TILE, d), dtype, **swizzled),
                plgpu.SMEM((stages, TILE, d), dtype, **swizzled),
                plgpu.SMEM((2, ROWS), jnp.float32),
            ),
            (plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=2)),
            (plgpu.Barrier(num_arrivals=2, num_barriers=stages),) * 2,
            plgpu.Barrier(num_arrivals=2),
            collective_axes="wg",
        )

    return plgpu.kernel(
        entry,
        out_type=(jax.ShapeDtypeStruct(q.shape, dtype), jax.ShapeDtypeStruct((b, hq, n), jnp.float32)),
        grid=(hq, nq, b),
        grid_names=("heads", "q", "batch"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(counts, indices, *((first_rows, plain) if has_first_rows else ()), q, k, v)
