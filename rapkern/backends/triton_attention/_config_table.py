"""The config table in use (kept for older imports): the per-Triton-version table that configs.py selected
from ``_config_tables/`` (see configs.describe_table())."""

from .configs import SELECTION, TABLE, VERIFIED  # noqa: F401
