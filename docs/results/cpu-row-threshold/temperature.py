# Experiment: the router's predicted mass at temperature T (softmax(s / T)) before per-row thresholds.
import json, sys
from llama_surgery_jax.surgery import block_routing as br
T = float(sys.argv[1])
original = br.predicted_mass
def tempered(row_scores, candidate, share_of=None):
    return original(row_scores / T, candidate, share_of)
br.predicted_mass = tempered
from llama_surgery_jax.evaluate import main
sys.exit(main(sys.argv[2:]))
