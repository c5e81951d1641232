"""florist's version, read from the installed package's metadata: pyproject.toml is where it is written."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("florist")
except PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"
