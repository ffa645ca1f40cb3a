"""Reading a bundle's payload files: plaintext as stored, or decrypted in memory.

Light on purpose: an unencrypted bundle's files are read without importing the
cryptography library; only an encrypted one loads :mod:`agent.bundle.crypto`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from agent.bundle.manifest import Manifest

if TYPE_CHECKING:
    from agent.bundle.crypto import DeviceKey

__all__ = ["read_payload"]


def read_payload(manifest: Manifest, model_dir: Path, path: str, key: DeviceKey | None) -> bytes:
    """A payload file's plaintext, decrypted in memory when the bundle is encrypted.

    Raises:
        OSError: the file cannot be read.
        NotForThisDeviceError, DecryptionError: as :func:`open_data_key`, :func:`decrypt_file`.
    """
    data = (Path(model_dir) / path).read_bytes()
    if manifest.encryption is None:
        return data
    from agent.bundle.crypto import decrypt_file, open_data_key  # noqa: PLC0415 - when encrypted

    return decrypt_file(manifest.encryption, open_data_key(manifest.encryption, key), path, data)
