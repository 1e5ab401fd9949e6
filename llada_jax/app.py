"""`python -m llada_jax.app`: alias of `llada_jax.frontends.app`."""

import sys

from llada_jax.frontends import app as _impl

main = _impl.main


def __getattr__(name: str):
  """Old import path: `from llada_jax import app` still reaches the module's names."""
  return getattr(_impl, name)


if __name__ == "__main__":
  sys.exit(main())
