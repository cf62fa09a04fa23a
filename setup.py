# Package metadata lives in pyproject.toml. The CUDA extension (csrc/) will be added here by its own issue.
from setuptools import setup

setup()
