"""`python -m megatron_entcov ...` is the `megatron-entcov` command."""

import sys

from megatron_entcov.cli import main

if __name__ == "__main__":
    sys.exit(main())
