"""A procedural captioned world (coloured shapes) in which erasing a concept can be measured on a CPU.

`world` draws the images and captions, `classifier` judges shape and colour, `pipeline` builds and
loads the toy Stable Diffusion trained on the world (weights shipped under `salun_sd/assets/toyworld`).
"""

from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "toyworld"
