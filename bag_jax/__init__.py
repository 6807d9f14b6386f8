"""bag-jax: generative data-free quantization (GDFQ, AdaDFQ, BAG) in JAX/Flax."""
