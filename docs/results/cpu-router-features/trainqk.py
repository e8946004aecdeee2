import time, numpy as np, jax, jax.numpy as jnp, optax, argparse
from llama_surgery_jax.surgery import block_routing as br
from llama_surgery_jax.surgery.mask import band_tiles
from llama_surgery_jax.surgery.router import sample_routes
ap = argparse.ArgumentParser(); ap.add_argument("--mode", default="tree"); ap.add_argument("--lr", type=float, default=3e-3)
ap.add_argument("--steps", type=int, default=300); ap.add_argument("--levels", type=int, default=6); ap.add_argument("--prior", type=float, default=1.0)
a = ap.parse_args()
z = np.load("/tmp/exp/cacheqk_32_32_2048.npz"); mass = jnp.asarray(z["mass"]); qf = jnp.asarray(z["q"]); kf = jnp.asarray(z["k"])
L, S, H, n, _ = mass.shape; G = qf.shape[3] // H; D = qf.shape[-1]; T = W = 32
qf = qf.reshape(L, S, n, H, G * D)  # group's pooled queries, concatenated
te = slice(8, S)
cand = br.candidate_tiles(n, tile=T, window=W, sink=True); forced = band_tiles(n, tile=T, window=W, sink=True)
budgets = br.row_budgets(jnp.full((H,), 0.2), forced.sum(-1))
dist = (jnp.arange(n)[:, None] - jnp.arange(n)[None, :]).astype(jnp.float32)
prior = -a.prior * jnp.log1p(jnp.maximum(dist, 0))
P, Lv = 2, a.levels
def init(i):
    k1, k2 = jax.random.split(jax.random.key(i))
    if a.mode == "seer":
        return {"wq": jax.random.normal(k1, (H, G * D, 64)) / np.sqrt(G * D), "wk": jax.random.normal(k2, (H, D, 64)) / np.sqrt(D)}
    return {"wq": jax.random.normal(k1, (H, G * D, Lv * P)) / np.sqrt(G * D), "wk": jax.random.normal(k2, (H, D, Lv * P)) / np.sqrt(D),
            "bq": jnp.zeros((H, Lv * P)), "bk": jnp.zeros((H, Lv * P))}
params = [init(i) for i in range(L)]
def scores(p, q, k, key=None, tau=1.0, hard=False):
    if a.mode == "seer":
        return jnp.einsum("bnhe,bmhe->bhnm", jnp.einsum("bnhf,hfe->bnhe", q, p["wq"]), jnp.einsum("bnhf,hfe->bnhe", k, p["wk"])) / 8.0, None
    lq = (jnp.einsum("bnhf,hfe->bhne", q, p["wq"]) + p["bq"][None, :, None]).reshape(*q.shape[:1], H, n, Lv, P)
    lk = (jnp.einsum("bnhf,hfe->bhne", k, p["wk"]) + p["bk"][None, :, None]).reshape(*q.shape[:1], H, n, Lv, P)
    kq, kk = (None, None) if key is None else jax.random.split(key)
    rq, cq = sample_routes(lq, tau=tau, rng=kq, hard=False); rk, ck = sample_routes(lk, tau=tau, rng=kk, hard=False)
    place = P ** jnp.arange(Lv)
    return br.soft_shared_depth(rq, rk), ((cq * place).sum(-1), (ck * place).sum(-1))
def loss_fn(params, idx, key, tau):
    tot = 0.0
    for l in range(L):
        s, _ = scores(params[l], qf[l][idx], kf[l][idx], jax.random.fold_in(key, l), tau)
        tot += br.distillation_loss(s + prior, mass[l][idx], cand)
    return tot / L
opt = optax.adam(a.lr); st = opt.init(params)
@jax.jit
def step(params, st, idx, key, tau):
    l, g = jax.value_and_grad(loss_fn)(params, idx, key, tau); u, st = opt.update(g, st, params); return optax.apply_updates(params, u), st, l
@jax.jit
def recall(params):
    out = []
    for l in range(L):
        m = mass[l][te]
        s, codes = scores(params[l], qf[l][te], kf[l][te])
        hard = s if codes is None else br.router_score(codes[0], codes[1], p=P, levels=Lv)
        moba = jnp.einsum("bnhf,bmhf->bhnm", qf[l][te].reshape(*qf.shape[2:3][:0], 4, n, H, G, D).sum(3), kf[l][te])
        sel = [hard, (s + prior) if codes is None else hard, jnp.broadcast_to(br.recent_score(n), m.shape), m, moba]
        out.append(jnp.stack([br.attention_recall(br.select_tiles(v, budgets, tile=T, window=W, sink=True), m).mean() for v in sel]))
    return jnp.stack(out).mean(0)
rng = np.random.default_rng(0); t0 = time.time()
for s in range(a.steps + 1):
    if s % 100 == 0:
        print(s, dict(zip(["router", "router+prior", "recent", "oracle", "moba"], np.round(np.asarray(recall(params)), 4))), round(time.time() - t0), flush=True)
    tau = 1.0 + (0.1 - 1.0) * min(1, s / (0.7 * a.steps))
    params, st, l = step(params, st, jnp.asarray(rng.choice(8, 2, replace=False)), jax.random.key(s), tau)
