"""Layers shared by the model families: attention, norms, RoPE, MLPs (and MoE)."""
