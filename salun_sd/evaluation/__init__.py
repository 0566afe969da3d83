"""Evaluation of concept erasure the way the field measures it.

`salun-sd generate` turns a prompt set (I2P, a class-prompt CSV, a text list) into a traceable
folder of images; `salun-sd evaluate` scores such folders (NudeNet nudity, CLIP score, FID,
unlearning accuracy) and writes a report that puts base and erased side by side.
"""
