"""`python -m pallas_kernels.bench`: see pallas_kernels.block_sparse_attention.bench."""

import sys

from pallas_kernels.block_sparse_attention.bench import main

if __name__ == "__main__":
    sys.exit(main())
