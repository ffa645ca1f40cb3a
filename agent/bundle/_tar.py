"""The canonical ustar encoding used by bundles: one header layout, nothing optional.

A bundle's tar is written and read with exactly this encoding. The reader rebuilds each
header from the values it parsed and requires the bytes to match, so no byte of a header
can change without the bundle being refused (there is no "equivalent" spelling).
"""

from __future__ import annotations

from dataclasses import dataclass

BLOCK = 512
END_OF_ARCHIVE = b"\0" * (2 * BLOCK)
MAX_MEMBER_SIZE = 8**11 - 1  # 11 octal digits in the size field
_MODE = b"0000644\0"
_ZERO8 = b"0000000\0"


@dataclass(frozen=True)
class Header:
    name: str
    size: int


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def encode_header(name: str, size: int) -> bytes:
    """The one valid header for a regular file ``name`` of ``size`` bytes.

    Every field but name, size and checksum is fixed, mtime included (0): nothing in a
    header varies that the signed manifest does not cover, and builds are reproducible.
    """
    raw_name = name.encode("ascii")
    if not raw_name or len(raw_name) > 100:
        raise ValueError(f"member name {name!r} must be 1-100 ASCII bytes")
    if not 0 <= size <= MAX_MEMBER_SIZE:
        raise ValueError(f"member size {size} does not fit a ustar header")
    header = bytearray(BLOCK)
    header[0:100] = raw_name.ljust(100, b"\0")
    header[100:108] = _MODE
    header[108:116] = _ZERO8  # uid
    header[116:124] = _ZERO8  # gid
    header[124:136] = _octal(size, 12)
    header[136:148] = _octal(0, 12)  # mtime
    header[148:156] = b" " * 8  # checksum placeholder
    header[156:157] = b"0"  # regular file
    header[257:263] = b"ustar\0"
    header[263:265] = b"00"
    header[329:337] = _ZERO8  # devmajor
    header[337:345] = _ZERO8  # devminor
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def padding(size: int) -> int:
    """Zero bytes after ``size`` bytes of data, to the next block boundary."""
    return -size % BLOCK


# Type flags a hostile archive may use, named for error messages.
TYPE_NAMES = {
    b"1": "hard link",
    b"2": "symbolic link",
    b"3": "character device",
    b"4": "block device",
    b"5": "directory",
    b"6": "FIFO",
    b"7": "contiguous file",
    b"x": "pax extended header",
    b"g": "pax global header",
    b"L": "GNU long name",
    b"K": "GNU long link name",
}


def _parse_octal(field: bytes) -> int | None:
    digits = field.rstrip(b"\0 ").lstrip(b" ")
    if not digits or any(c not in b"01234567" for c in digits):
        return None
    return int(digits, 8)


def decode_header(block: bytes) -> Header | str:
    """Parse a header block: a :class:`Header`, or a reason it is not a canonical one.

    The reason names the member and what is wrong with it so the caller can raise the
    right typed error (type flag, path or encoding).
    """
    if block[257:263] != b"ustar\0" or block[263:265] != b"00":
        return "not a POSIX ustar header"
    stored = _parse_octal(block[148:156])
    if stored is None or stored != sum(block[:148]) + 8 * 32 + sum(block[156:]):
        return "header checksum mismatch"
    name = block[0:100].split(b"\0", 1)[0]
    if block[345:500].strip(b"\0"):
        return "ustar prefix field is not used by bundles"
    typeflag = block[156:157]
    if typeflag not in (b"0", b"\0"):
        kind = TYPE_NAMES.get(typeflag, f"type {typeflag!r}")
        return f"type:{kind}:{name.decode('ascii', errors='replace')}"
    size = _parse_octal(block[124:136])
    if size is None:
        return "header size is not octal"
    try:
        text = name.decode("ascii")
    except UnicodeDecodeError:
        return "member name is not ASCII"
    try:
        canonical = encode_header(text, size)
    except ValueError as exc:
        return str(exc)
    if canonical != block:
        return f"header of {text!r} is not in the canonical bundle encoding"
    return Header(name=text, size=size)
