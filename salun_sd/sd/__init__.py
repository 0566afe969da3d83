"""Stable Diffusion adapter: text conditions, VAE latents, data sets, pipeline export."""
