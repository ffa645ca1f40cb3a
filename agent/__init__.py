"""edgeship device agent: verify, install, serve and watch models on the device.

This package never imports :mod:`sdk` or any build-only package.
"""

__version__ = "0.1.0"
