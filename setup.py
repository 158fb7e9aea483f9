"""Packaging beyond setup.cfg: the embedded default pipelines ship inside the wheel.

They live in the repository's ``pipelines/`` folder (README, tests, scripts/build_embedded.py and the demo use that
path); ``package_dir`` maps that folder to the package ``diffusers_var.embedded`` so that ``pip install .`` puts them
at ``diffusers_var/embedded/`` and ``diffusers-var generate`` works from a wheel. The code finds them through
``diffusers_var.embedded_models.embedded_pipelines_dir()`` (the package copy first, else the repository's folder, which
is what a source checkout or an editable install uses).
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages("src"), "diffusers_var.embedded"],
    package_dir={"": "src", "diffusers_var.embedded": "pipelines"},
    package_data={
        "diffusers_var.data": ["*.json"],
        # every file of every pipeline folder (configs, safetensors, tokenizer files, model cards)
        "diffusers_var.embedded": ["*/*", "*/*/*", "*/*/*/*"],
    },
)
