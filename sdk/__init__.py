"""edgeship SDK: build, quantize, evaluate, sign and publish model bundles."""

import sys

__version__ = "0.1.0"

if sys.version_info < (3, 11):
    # The agent runs on Python 3.9 and later, the SDK (its code and its dependencies) on
    # 3.11 and later. The `edgeship` command imports this first: it then ends with this
    # one line, not with an error from deep inside on an older Python.
    raise SystemExit(
        f"edgeship: the SDK needs Python 3.11 or later, not {sys.version.split()[0]}; "
        "on a device, use edgeship-agent (Python 3.9 or later)"
    )
