"""edgeship SDK: build, quantize, evaluate, sign and publish model bundles."""

__version__ = "0.1.0"
