"""`python -m convert.orbax_to_hf`: alias of `python -m llada_jax.convert.orbax_to_hf`."""

import sys

from llada_jax.convert.orbax_to_hf import main

if __name__ == "__main__":
  sys.exit(main())
