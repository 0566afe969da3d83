"""Image generation for every family: the only place that turns prompts, seeds and sampler settings into images.

Forget/remain data, the validation grid, `salun-sd generate`, the attack and the toy world's scoring all draw
through `draw.py`, so one seeding rule holds everywhere: an image depends on its prompt, its noise key
(seed, draw) and the sampler settings, never on the batch it was drawn in, the process count or the device.
What differs between families (latent layout, size rules, sampling defaults) is asked of the family
(`salun_sd.families.loading.Family`).
"""

from salun_sd.generation.draw import ImageRequest, batches, draw_batches, draw_images, starting_noise, use_scheduler

__all__ = ["ImageRequest", "batches", "draw_batches", "draw_images", "starting_noise", "use_scheduler"]
