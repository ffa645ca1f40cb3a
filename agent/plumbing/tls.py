"""TLS client settings shared by the broker connection and bundle downloads.

:mod:`ssl` (several MiB resident, with OpenSSL) is imported only when a context is made:
an agent whose configuration uses no TLS never loads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import ssl

__all__ = ["TlsConfig"]


@dataclass(frozen=True)
class TlsConfig:
    """A TLS client. ``ca_file`` None trusts the system CAs; a client cert enables mTLS."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    def context(self) -> ssl.SSLContext:
        """Raises: OSError or ssl.SSLError when a file is missing or invalid."""
        import ssl  # noqa: PLC0415 - see the module docstring

        ctx = ssl.create_default_context(cafile=None if self.ca_file is None else str(self.ca_file))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert_file is not None:
            ctx.load_cert_chain(
                str(self.cert_file), None if self.key_file is None else str(self.key_file)
            )
        return ctx
