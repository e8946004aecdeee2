import sys, time, numpy as np, jax, jax.numpy as jnp, optax, argparse
from llama_surgery_jax.surgery import block_routing as br
from llama_surgery_jax.surgery.mask import band_tiles
from llama_surgery_jax.surgery.config import RouterConfig
from llama_surgery_jax.surgery.router import init_router_params, route_block_features
ap = argparse.ArgumentParser()
ap.add_argument("--cache"); ap.add_argument("--T", type=int); ap.add_argument("--W", type=int)
ap.add_argument("--levels", type=int, default=6); ap.add_argument("--lr", type=float, default=1e-3)
ap.add_argument("--steps", type=int, default=300); ap.add_argument("--tau", type=float, default=1.0)
ap.add_argument("--rho", type=float, default=0.2); ap.add_argument("--prior", type=float, default=0.0)
ap.add_argument("--scale", type=float, default=1.0); ap.add_argument("--noise", type=int, default=1); ap.add_argument("--seer", type=int, default=0)
a = ap.parse_args()
z = np.load(a.cache); mass, qf, kf = jnp.asarray(z["mass"]), jnp.asarray(z["q"]), jnp.asarray(z["k"])  # [L, S, h, n, n], [L, S, n, d]
L, S, H, n, _ = mass.shape
tr, te = slice(0, 8), slice(8, S)
rc = RouterConfig(mode="block", d_max=0, levels=a.levels, window=a.W, block_size=a.T, routing_heads="kv")
params = [init_router_params(jax.random.key(i), qf.shape[-1], H, rc, homotopy=False) for i in range(L)]
D = qf.shape[-1]
if a.seer:
    params = [{"wq": jax.random.normal(jax.random.key(100+i), (D, H, 64)) / np.sqrt(D), "wk": jax.random.normal(jax.random.key(200+i), (D, H, 64)) / np.sqrt(D)} for i in range(L)]
def seer_score(p, q, k):
    return jnp.einsum("bnhe,bmhe->bhnm", jnp.einsum("bnd,dhe->bnhe", q, p["wq"]), jnp.einsum("bnd,dhe->bnhe", k, p["wk"])) / 8.0
cand = br.candidate_tiles(n, tile=a.T, window=a.W, sink=True)
forced = band_tiles(n, tile=a.T, window=a.W, sink=True)
budgets = br.row_budgets(jnp.full((H,), a.rho), forced.sum(-1))
dist = (jnp.arange(n)[:, None] - jnp.arange(n)[None, :]).astype(jnp.float32)
def loss_fn(params, idx, key, tau):
    tot = 0.0
    for l in range(L):
        if a.seer:
            s = seer_score(params[l], qf[l][idx], kf[l][idx]) - a.prior * jnp.log1p(dist)
        else:
            r = route_block_features(params[l], qf[l][idx], kf[l][idx], config=rc, routing_heads=H, tau=tau, rng=jax.random.fold_in(key, l) if a.noise else None)
            s = a.scale * br.soft_shared_depth(r.q_routes, r.k_routes) - a.prior * jnp.log1p(dist)
        tot += br.distillation_loss(s, mass[l][idx], cand)
    return tot / L
opt = optax.adam(a.lr); st = opt.init(params)
@jax.jit
def step(params, st, idx, key, tau):
    l, g = jax.value_and_grad(loss_fn)(params, idx, key, tau)
    u, st = opt.update(g, st, params); return optax.apply_updates(params, u), st, l
@jax.jit
def recall(params):
    out = []
    for l in range(L):
        m = jnp.asarray(mass[l][te])
        if a.seer:
            sc = seer_score(params[l], qf[l][te], kf[l][te]); 
        else:
            r = route_block_features(params[l], qf[l][te], kf[l][te], config=rc, routing_heads=H)
            sc = br.router_score(r.q_codes, r.k_codes, p=2, levels=a.levels)
        sel = {"router": sc, "recent": jnp.broadcast_to(br.recent_score(n), m.shape), "oracle": m,
               "router+prior": a.scale * sc - a.prior * jnp.log1p(dist)}
        out.append(jnp.stack([br.attention_recall(br.select_tiles(v, budgets, tile=a.T, window=a.W, sink=True), m).mean() for v in sel.values()]))
    return jnp.stack(out)
names = ["router", "recent", "oracle", "router+prior"]
rng = np.random.default_rng(0)
t0 = time.time()
for s in range(a.steps + 1):
    if s % 100 == 0:
        rec = np.asarray(recall(params)).mean(0)
        print(s, {k: round(float(v), 4) for k, v in zip(names, rec)}, round(time.time()-t0, 1), flush=True)
    idx = rng.choice(8, 2, replace=False)
    tau = a.tau + (0.1 - a.tau) * min(1, s / (0.7 * a.steps)) if a.tau > 0.1 else a.tau
    params, st, l = step(params, st, jnp.asarray(idx), jax.random.key(s), tau)
    if s % 100 == 0: print("  loss", float(l))
