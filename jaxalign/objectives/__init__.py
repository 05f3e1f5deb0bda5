"""Training objectives: pure `loss_fn(params, batch, rng) -> (loss_sum, aux)` builders, one module per algorithm."""
