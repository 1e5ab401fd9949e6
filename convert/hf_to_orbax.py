"""`python -m convert.hf_to_orbax`: alias of `python -m llada_jax.convert.hf_to_orbax`."""

import sys

from llada_jax.convert.hf_to_orbax import main

if __name__ == "__main__":
  sys.exit(main())
