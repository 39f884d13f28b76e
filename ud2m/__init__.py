"""ud2m: fast Bayesian image and video restoration with diffusion and consistency-model priors."""

__version__ = "0.1.0"
