"""`python -m llada_jax.sample`: alias of `llada_jax.frontends.cli`."""

import sys

from llada_jax.frontends import cli as _impl

main = _impl.main


def __getattr__(name: str):
  """Old import path: `from llada_jax import sample` still reaches the module's names."""
  return getattr(_impl, name)


if __name__ == "__main__":
  sys.exit(main())
