# Experiment: the row router's logits plus W · each row's own q · the key block's mean key / sqrt(d) (MoBA's gate,
# mean over the query heads of a routing head): a product of the two experts' predicted masses.
import math, sys
import jax.numpy as jnp
from llama_surgery_jax.surgery import block_routing as br
from llama_surgery_jax.surgery import routed_attention as ra
W = float(sys.argv[1])
STASH = {}
original_block_attention = ra.RoutedAttention.block_attention
original_scores = ra.RoutedAttention.row_router_scores
def block_attention(self, q, k, v, **kw):
    STASH["qk"] = (q, k)
    return original_block_attention(self, q, k, v, **kw)
def row_router_scores(self, routing, t):
    s = original_scores(self, routing, t)
    q, k = STASH["qk"]
    heads, kv, d = q.shape[2], k.shape[2], q.shape[3]
    gate = br.row_moba_score(q, k, tile=self.config.block_size, routing_heads=self.router.routing_heads)
    return s + W * gate / (heads // kv) / math.sqrt(d)
ra.RoutedAttention.block_attention = block_attention
ra.RoutedAttention.row_router_scores = row_router_scores
from llama_surgery_jax.evaluate import main
sys.exit(main(sys.argv[2:]))
