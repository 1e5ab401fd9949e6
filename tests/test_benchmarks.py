"""The benchmark scripts run end to end (tiny sizes; their numbers are not asserted)."""

from benchmarks import forward
from configs import tiny
from llada_jax.config import ModelConfig


def test_forward_benchmark_reports_throughput():
  cfg = ModelConfig.from_dict(tiny.model_config())
  result = forward.run(cfg, batch=2, seq_len=32, repeats=1)
  assert result["tokens_per_s"] > 0 and result["matmul_flops_per_s_float32"] > 0
  assert result["model_flops_per_s"] == cfg.forward_flops_per_token(32) * 64 / result[
      "seconds_per_forward"]
