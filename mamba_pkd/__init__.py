"""mamba-pkd: Progressive Knowledge Distillation into Mamba students (JAX/Flax)."""
