"""MoE layer: routers vs the official code's outputs, grouped = dense experts, expert parallelism."""

import json
import logging
import pathlib

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (numpy bfloat16, for the LLaDA2 fixture's safetensors)
import numpy as np
import pytest
from safetensors.numpy import load_file

from llada_jax import sharding
from llada_jax.layers import moe

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
EP_RULES = sharding.DEFAULT_RULES + (("experts", "expert"),)
EP_AXES = ("data", "fsdp", "expert", "tensor")
# One compiled program per call instead of one per operation.
route_softmax_biased = jax.jit(moe.route_softmax_biased, static_argnums=2)
route_sigmoid_grouped = jax.jit(moe.route_sigmoid_grouped, static_argnums=(2, 3, 4, 5, 6))


def _fixture(name: str, tensor: str) -> tuple[dict, np.ndarray]:
  """(reference.npz arrays, one checkpoint tensor as float32) of a fixture dir."""
  d = FIXTURES / name
  weight_map = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
  return dict(np.load(d / "reference.npz")), load_file(d / weight_map[tensor])[tensor].astype(
      np.float32)


def _np_softmax_biased(logits, bias, k):
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p = p / p.sum(-1, keepdims=True) + bias
  ids = np.argsort(-p, axis=-1, kind="stable")[:, :k]
  return np.take_along_axis(p, ids, 1), ids


def _np_sigmoid_grouped(logits, bias, k, n_group, topk_group, scale):
  s = 1 / (1 + np.exp(-logits.astype(np.float64)))
  b = s + bias
  per_group = b.shape[1] // n_group
  weights, ids = [], []
  for b_E, s_E in zip(b, s):
    group_score = np.sort(b_E.reshape(n_group, per_group), axis=1)[:, -2:].sum(1)
    kept = np.argsort(-group_score, kind="stable")[:topk_group]
    candidates = [e for e in range(len(b_E)) if e // per_group in kept]
    chosen = sorted(candidates, key=lambda e: -b_E[e])[:k]
    ids.append(chosen)
    weights.append(s_E[chosen] / (s_E[chosen].sum() + 1e-20) * scale)
  return np.array(weights), np.array(ids)


def test_softmax_router_matches_lladamoe_fixture():
  ref, bias = _fixture("lladamoe_tiny", "model.layers.0.mlp.expert_bias")
  logits = ref["router_logits_first_moe"]
  w, ids = route_softmax_biased(logits, bias, 2)
  np.testing.assert_array_equal(ids, ref["router_topk_ids_first_moe"])
  np.testing.assert_allclose(w, ref["router_topk_weights_first_moe"], rtol=0, atol=1e-6)
  w_np, ids_np = _np_softmax_biased(logits, bias, 2)
  np.testing.assert_array_equal(ids, ids_np)
  np.testing.assert_allclose(w, w_np, atol=1e-6)


def test_sigmoid_grouped_router_matches_llada2_fixture():
  ref, bias = _fixture("llada2_tiny", "model.layers.1.mlp.gate.expert_bias")
  logits = ref["router_logits_first_moe"]  # 16 experts, 4 groups, best 2 groups, top-4
  w, ids = route_sigmoid_grouped(logits, bias, 4, 4, 2, 2.5, True)
  np.testing.assert_array_equal(ids, ref["router_topk_ids_first_moe"])
  np.testing.assert_allclose(w, ref["router_topk_weights_first_moe"], rtol=0, atol=1e-6)
  _, ungrouped = route_sigmoid_grouped(logits, bias, 4, 1, 1, 2.5, True)
  assert (np.asarray(ungrouped) != ids).any()  # the group limit decides some tokens here


def test_sigmoid_grouped_router_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(64, 32)).astype(np.float32)
  bias = (0.3 * rng.normal(size=32)).astype(np.float32)  # large enough to change choices
  w, ids = route_sigmoid_grouped(logits, bias, 6, 8, 3, 1.5, True)
  w_np, ids_np = _np_sigmoid_grouped(logits, bias, 6, 8, 3, 1.5)
  np.testing.assert_array_equal(ids, ids_np)
  np.testing.assert_allclose(w, w_np, rtol=1e-6)


def test_bad_router_settings_raise():
  with pytest.raises(ValueError, match="k=9"):
    moe.MoEConfig(num_experts=8, k=9)
  with pytest.raises(ValueError, match="n_group=3 must divide"):
    moe.MoEConfig(num_experts=16, k=2, router="sigmoid_grouped", n_group=3)
  with pytest.raises(ValueError, match="exceeds"):
    moe.route_sigmoid_grouped(jnp.zeros((2, 16)), None, 9, 4, 2, 1.0)
  with pytest.raises(ValueError, match="impl"):
    moe.MoEConfig(num_experts=8, k=2, impl="megablox")


def _experts(E, D=16, F=8, seed=0):
  rng = np.random.default_rng(seed)
  return tuple((0.3 * rng.normal(size=shape)).astype(np.float32)
               for shape in ((E, D, F), (E, D, F), (E, F, D)))


def _tokens(T, E, K, D=16, seed=1, used=None):
  """x [T, D], combine weights and distinct expert ids [T, K] (from the first `used`)."""
  rng = np.random.default_rng(seed)
  ids = np.argsort(rng.uniform(size=(T, used or E)), axis=1)[:, :K].astype(np.int32)
  return (rng.normal(size=(T, D)).astype(np.float32),
          rng.uniform(0.1, 1.0, size=(T, K)).astype(np.float32), ids)


def _value_and_grads(ffn):
  """jitted (x, w, ids, experts) -> (y, grads of a y-dependent loss w.r.t. x, w, experts)."""
  def loss(x, w, ids, *experts):
    y = ffn(x, w, ids, *experts)
    return jnp.sum(jnp.sin(y) * jnp.arange(y.size).reshape(y.shape) / y.size), y
  grad = jax.value_and_grad(loss, argnums=(0, 1, 3, 4, 5), has_aux=True)
  return jax.jit(lambda x, w, ids, experts: (lambda r: (r[0][1], r[1]))(grad(x, w, ids, *experts)))


_dense_value_and_grads = _value_and_grads(moe.expert_ffn_dense)


def _assert_close(got, want):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("E,K,used,impl,tiling", [
    (8, 2, None, "tiled", (None, None)),
    (16, 4, 11, "tiled", (3, 2)),  # steps of 2 tiles of 3 rows; experts 11..15 get no token
    (16, 4, 11, "ragged_dot", (None, None)),
])
def test_grouped_experts_match_dense_reference(E, K, used, impl, tiling):
  """Values and gradients w.r.t. inputs, combine weights and expert weights."""
  x, w, ids = _tokens(40, E, K, used=used)
  experts = _experts(E)
  tile, per_step = tiling
  grouped = _value_and_grads(
      lambda *a: moe.expert_ffn(*a, impl=impl, tile=tile, tiles_per_step=per_step))
  got = grouped(x, w, ids, experts)
  _assert_close(got, _dense_value_and_grads(x, w, ids, experts))
  dgate = got[1][2]
  assert np.any(dgate[:used or E]) and not np.any(dgate[used or E:])


def test_aux_losses_match_numpy():
  rng = np.random.default_rng(3)
  T, E, K = 30, 8, 2
  logits = rng.normal(size=(T, E)).astype(np.float32)
  mask = (rng.uniform(size=T) > 0.3).astype(np.float32)
  ids = np.argsort(-logits, axis=1)[:, :K]
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  balanced = np.arange(24 * K).reshape(24, K) % E  # every expert 6 slots, flat probabilities
  lb, z, counts, lb_balanced = jax.jit(lambda: (
      moe.load_balancing_loss(probs, ids, mask), moe.router_z_loss(logits, mask),
      moe.tokens_per_expert(ids, E, mask),
      moe.load_balancing_loss(np.full((24, E), 1 / E), balanced)))()
  m = mask.astype(bool)
  f = np.bincount(ids[m].ravel(), minlength=E) / (m.sum() * K)
  np.testing.assert_allclose(lb, E * np.sum(f * probs[m].mean(0)), rtol=1e-6)
  np.testing.assert_allclose(z, np.mean(np.log(np.exp(logits[m]).sum(-1)) ** 2), rtol=1e-6)
  np.testing.assert_allclose(counts, f * m.sum() * K)
  np.testing.assert_allclose(lb_balanced, 1.0, rtol=1e-6)


def _np_experts(x, w, ids, gate, up, down):
  y = np.zeros_like(x, dtype=np.float64)
  for t, k in np.ndindex(ids.shape):
    e = ids[t, k]
    g, u = x[t] @ gate[e], x[t] @ up[e]
    y[t] += w[t, k] * ((g / (1 + np.exp(-g)) * u) @ down[e])
  return y


def test_moe_layer_on_a_mesh_matches_numpy():
  """Router (LLaDA2 style) + experts on an expert-parallel mesh, and the losses."""
  B, L, D, E, K = 2, 8, 16, 8, 2
  rng = np.random.default_rng(4)
  x = rng.normal(size=(B, L, D)).astype(np.float32)
  gate, up, down = _experts(E, D)
  p = {"router": rng.normal(size=(D, E)).astype(np.float32),
       "expert_bias": np.linspace(-0.1, 0.1, E, dtype=np.float32),
       "gate_proj": gate, "up_proj": up, "down_proj": down}
  cfg = moe.MoEConfig(num_experts=E, k=K, router="sigmoid_grouped", n_group=4, topk_group=2,
                      routed_scaling_factor=2.0, impl="tiled")
  mesh = sharding.make_mesh((1, 2, 4, 1), EP_AXES)
  y, aux = jax.jit(lambda x, p: moe.moe_layer(x, p, cfg, mesh=mesh, rules=EP_RULES))(x, p)
  logits = x.reshape(-1, D) @ p["router"]
  w, ids = _np_sigmoid_grouped(logits, p["expert_bias"], K, 4, 2, 2.0)
  np.testing.assert_allclose(y.reshape(-1, D), _np_experts(x.reshape(-1, D), w, ids, gate, up,
                                                            down), rtol=1e-5, atol=1e-5)
  s = 1 / (1 + np.exp(-logits))
  f = np.bincount(ids.ravel(), minlength=E) / ids.size
  np.testing.assert_allclose(aux.load_balancing_loss,
                             E * np.sum(f * (s / s.sum(-1, keepdims=True)).mean(0)), rtol=1e-5)
  np.testing.assert_allclose(aux.router_z_loss,
                             np.mean(np.log(np.exp(logits).sum(-1)) ** 2), rtol=1e-5)
  np.testing.assert_array_equal(aux.tokens_per_expert_E, f * ids.size)
  with pytest.raises(ValueError, match="router weight has shape"):
    moe.moe_layer(x, {**p, "router": p["router"][:, :4]}, cfg)


@pytest.mark.parametrize("mesh_shape,T,impl,grads,collective", [
    ((1, 2, 4, 1), 64, "tiled", True, "all_to_all"),   # tokens over fsdp x expert
    ((1, 2, 4, 1), 64, "ragged_dot", False, "all_to_all"),
    ((1, 2, 2, 2), 10, "tiled", True, "all_reduce"),   # 10 tokens: not over expert too;
])                                                      # expert hidden over tensor
def test_expert_parallel_matches_single_device(mesh_shape, T, impl, grads, collective):
  mesh = sharding.make_mesh(mesh_shape, EP_AXES)
  x, w, ids = _tokens(T, 8, 2, seed=7)
  experts = _experts(8)
  sharded = lambda *a: moe.expert_ffn_sharded(*a, mesh, EP_RULES, impl=impl)  # noqa: E731
  if grads:
    step, want = _value_and_grads(sharded), _dense_value_and_grads(x, w, ids, experts)
  else:
    step = jax.jit(lambda x, w, ids, experts: sharded(x, w, ids, *experts))
    want = moe.expert_ffn_dense(x, w, ids, *experts)
  lowered = step.lower(x, w, ids, experts)
  assert collective in lowered.as_text().replace("all-", "all_")
  _assert_close(lowered.compile()(x, w, ids, experts), want)


def test_experts_not_dividing_the_expert_axis_are_replicated(caplog):
  mesh = sharding.make_mesh((1, 2, 4, 1), EP_AXES)
  x, w, ids = _tokens(16, 6, 2)
  experts = _experts(6)
  with caplog.at_level(logging.WARNING):
    y = jax.jit(lambda *a: moe.expert_ffn_sharded(*a, mesh, EP_RULES))(x, w, ids, *experts)
  assert "6 experts do not divide mesh axes ('expert',)" in caplog.text
  np.testing.assert_allclose(y, moe.expert_ffn_dense(x, w, ids, *experts), rtol=1e-5, atol=1e-5)


def test_moe_benchmark_runs():
  from benchmarks import moe as moe_benchmark  # pylint: disable=g-import-not-at-top
  result = moe_benchmark.run(tokens=32, d_model=8, hidden=4, experts=[4], ks=[2],
                             impls=["tiled"], repeats=1)
  assert [(r["impl"], r["tile"]) for r in result["results"]] == [("tiled", 8)]
  assert all(r["tokens_per_s"] > 0 for r in result["results"])
