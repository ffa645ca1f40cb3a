"""Whether a bundle can run on this device: architecture, device class, runtime versions."""

from __future__ import annotations

import platform
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from agent.bundle.manifest import FORMAT_RUNTIMES, Compatibility, Manifest
from agent.errors import CompatibilityError

__all__ = ["DeviceInfo", "check_compatibility", "version_tuple"]


@dataclass(frozen=True)
class DeviceInfo:
    """What only the device knows: the runtimes it has, its architecture and class."""

    runtimes: Mapping[str, str] = field(default_factory=dict)  # runtime name -> version
    arch: str = field(default_factory=platform.machine)
    device_class: str | None = None


def version_tuple(version: str) -> tuple[int, ...]:
    """Leading numeric components of a version string: ``"2.14.0rc1"`` -> ``(2, 14, 0)``."""
    parts = []
    for piece in version.split("."):
        m = re.match(r"\d+", piece)
        if not m:
            break
        parts.append(int(m.group()))
        if m.end() != len(piece):
            break
    return tuple(parts)


def check_compatibility(manifest: Manifest, device: DeviceInfo) -> str:
    """The first runtime in the manifest's preference order that this device can use.

    Raises:
        CompatibilityError: wrong architecture or device class, or no usable runtime.
    """
    compat: Compatibility = manifest.compatibility
    if compat.arch and device.arch not in compat.arch:
        raise CompatibilityError(
            f"bundle is built for {', '.join(compat.arch)}; this device is {device.arch}"
        )
    if compat.device_classes and device.device_class not in compat.device_classes:
        raise CompatibilityError(
            f"bundle targets device classes {', '.join(compat.device_classes)}; this device is"
            f" {device.device_class or 'unclassified'}"
        )
    wanted = []
    for req in compat.runtimes:
        if req.name not in FORMAT_RUNTIMES[manifest.model.format]:
            continue
        wanted.append(
            f"{req.name}{' >=' + req.min_version if req.min_version else ''}"
            f"{' <' + req.max_version if req.max_version else ''}"
        )
        installed = device.runtimes.get(req.name)
        if installed is None:
            continue
        have = version_tuple(installed)
        if req.min_version and have < version_tuple(req.min_version):
            continue
        if req.max_version and have >= version_tuple(req.max_version):
            continue
        return req.name
    present = ", ".join(f"{k} {v}" for k, v in sorted(device.runtimes.items())) or "none"
    raise CompatibilityError(
        f"no usable runtime: the bundle needs one of {'; '.join(wanted)}; installed: {present}."
        " Install a matching runtime extra (edgeship[onnx], edgeship[litert], edgeship[tflite])"
    )
