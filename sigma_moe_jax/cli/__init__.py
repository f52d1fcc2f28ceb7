"""The launchers: absl flags in, one library call, one line per error. Each runs as
`python -m sigma_moe_jax.cli.<name>` and as a console script (`sigma-moe-train`, ...)."""
