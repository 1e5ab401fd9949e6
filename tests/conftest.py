"""Test setup: 8 fake CPU devices for the sharding tests (set before JAX loads)."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# AOT compiles for TPU topologies through libtpu; parallel test processes share it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import pathlib  # noqa: E402

import pytest  # noqa: E402

FIXTURE_DIR = pathlib.Path(__file__).parent / "fixtures" / "llada_tiny"


@pytest.fixture(scope="session")
def fixture_dir() -> str:
  return str(FIXTURE_DIR)


@pytest.fixture(scope="session")
def reference():
  import numpy as np  # pylint: disable=g-import-not-at-top
  return dict(np.load(FIXTURE_DIR / "reference.npz"))


@pytest.fixture(scope="session")
def tiny_model(fixture_dir):
  import llada_jax  # pylint: disable=g-import-not-at-top
  return llada_jax.load(fixture_dir)
