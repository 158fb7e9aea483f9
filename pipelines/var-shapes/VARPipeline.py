"""Loads this folder with diffusers' generic loader (needs ``pip install diffusers-var``):

    DiffusionPipeline.from_pretrained(folder, custom_pipeline="VARPipeline", trust_remote_code=True)
"""

from diffusers_var import VARPipeline  # noqa: F401
