"""The Llama model: configs, the Flax NNX modules, converted-model folders, the embedded default, sharding."""
