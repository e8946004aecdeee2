import sys, time, numpy as np, jax, jax.numpy as jnp
from flax import nnx
from llama_surgery_jax.io import corpora
from llama_surgery_jax.model.checkpoint import load_model, load_tokenizer
from llama_surgery_jax.model.embedded import default_model_dir
from llama_surgery_jax.surgery.config import RouterConfig
from llama_surgery_jax.surgery.routed_attention import inject_routers
T, W, SEQ, NSEQ = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
QK = len(sys.argv) > 5 and sys.argv[5] == "qk"  # pooled q/k instead of the router input (see README)
md = default_model_dir()
model = load_model(md)
tok = load_tokenizer(md)
ids = corpora.tokenize(tok, corpora.load_text("valid", "/work/shared/data/wikitext-2", "tokens"))
seqs = corpora.windows(ids, SEQ, NSEQ)
rc = RouterConfig(mode="block", d_max=0, levels=6, window=W, block_size=T, routing_heads="kv")
inject_routers(model, rc, nnx.Rngs(0))
g, st = nnx.split(model)
@jax.jit
def f(st, b):
    _, aux, _ = nnx.merge(g, st).hidden_states(b, train=True, rng=None, return_mass=True)
    return [a["tile_mass"] for a in aux], [a["qk" if QK else "block_features"] for a in aux]
M, Q, K = [], [], []
t0 = time.time()
for i in range(0, NSEQ, 2):
    m, fe = f(st, jnp.asarray(seqs[i:i+2]))
    M.append(np.stack([np.asarray(x) for x in m])); Q.append(np.stack([np.asarray(x[0]) for x in fe])); K.append(np.stack([np.asarray(x[1]) for x in fe]))
np.savez(f"/tmp/exp/cache{'qk' if QK else ''}_{T}_{W}_{SEQ}.npz", mass=np.concatenate(M, 1), q=np.concatenate(Q, 1), k=np.concatenate(K, 1))
print("done", time.time() - t0)
