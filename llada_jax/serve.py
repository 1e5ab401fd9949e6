"""`python -m llada_jax.serve`: alias of `llada_jax.frontends.serve`."""

import sys

from llada_jax.frontends import serve as _impl

main = _impl.main


def __getattr__(name: str):
  """`from llada_jax import serve` reaches the module's names."""
  return getattr(_impl, name)


if __name__ == "__main__":
  sys.exit(main())
