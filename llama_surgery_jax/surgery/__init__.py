"""The method: the visibility rule (mask), the router, routed attention on the reference or the kernels, baselines."""
