"""thumbcli: batch thumbnailer, thumbnail-cache warmer and thumbnail server."""

__version__ = "0.1.0"
