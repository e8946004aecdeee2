import numpy as np, jax, jax.numpy as jnp
from llama_surgery_jax.surgery import block_routing as br
from llama_surgery_jax.surgery.mask import band_tiles
from llama_surgery_jax.training import calibration as cal
z = np.load("/tmp/exp/cache_32_32_2048.npz"); mass = z["mass"]  # [L,S,h,n,n]
L, S, H, n, _ = mass.shape; T = W = 32
forced = band_tiles(n, tile=T, window=W, sink=True); fpr = jnp.sum(forced, -1, dtype=jnp.int32)
table = cal.calibrate(mass[:, :8], tile=T, window=W, sink=True)
c = {"grid": list(cal.GRID), "densities": table.tolist()}
te = mass[:, 8:]
for rho in (0.2, 0.3):
    ad = cal.densities_at(c, rho)
    res = {}
    for name, sel in (("recent", "recent"), ("oracle", "oracle")):
        for bname, dens in (("uniform", np.full((L, H), rho)), ("adaptive", ad)):
            rec, exe = [], []
            for l in range(L):
                m = jnp.asarray(te[l]); b = br.row_budgets(jnp.asarray(dens[l], jnp.float32), fpr)
                score = m if sel == "oracle" else jnp.broadcast_to(br.recent_score(n), m.shape)
                t = br.select_tiles(score, b, tile=T, window=W, sink=True)
                rec.append(float(br.attention_recall(t, m).mean())); exe.append(float(br.executed_density(t).mean()))
            res[f"{sel}/{bname}"] = (round(np.mean(rec), 4), round(np.mean(exe), 4))
    rec, exe = [], []
    for l in range(L):
        m = jnp.asarray(te[l]); b = br.row_budgets(jnp.full((H,), rho, jnp.float32), fpr)
        t = br.global_oracle_tiles(m, b, tile=T, window=W, sink=True)
        rec.append(float(br.attention_recall(t, m).mean())); exe.append(float(br.executed_density(t).mean()))
    res["global"] = (round(np.mean(rec), 4), round(np.mean(exe), 4))
    print(rho, res)
