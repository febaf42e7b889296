"""The hospital process: config, lifecycle, HTTP API and the `murmur` command."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("murmur-fl")  # one definition: pyproject.toml's
except PackageNotFoundError:  # run from a checkout that was never installed
    __version__ = "0+unknown"
