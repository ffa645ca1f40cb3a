"""What the agent's dependencies resolve to on ARM devices, per Python, from PyPI.

Most devices are ARM: aarch64 (Raspberry Pi OS 64-bit, Jetson, i.MX 8) and armv7l
(Raspberry Pi OS 32-bit). pip resolves for another platform and Python without them
(``pip install --dry-run --platform ... --python-version ... --only-binary=:all:``), so a
dependency without ARM wheels shows here, on any machine.

Wheels are taken for a glibc 2.31 device (Debian 11, Raspberry Pi OS bullseye, Ubuntu
20.04: the oldest OSes the agent supports) except tflite-runtime, whose ARM wheels need
glibc 2.34 (Ubuntu 22.04, JetPack 6, Debian 12). pip evaluates markers against the Python
it runs on, not the target, so the markers of the agent's own requirements are evaluated
here for each target; those of their dependencies stay pip's.

Usage: python -m tests.compat.arm_wheels    prints the table of resolved versions
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement

__all__ = ["ARCHS", "PYTHONS", "Resolution", "agent_requirements", "resolve_all"]

ROOT = Path(__file__).resolve().parents[2]
PYTHONS = ("3.9", "3.10", "3.11", "3.12", "3.13")
ARCHS = ("aarch64", "armv7l")
GLIBC_MINOR = 31
# tflite-runtime 2.14 publishes manylinux_2_34 ARM wheels only.
TFLITE_GLIBC_MINOR = 35
# The agent's own parts, as pyproject.toml names them: its core and the runtime extras.
GROUPS = ("core", "onnx", "litert", "tflite")


@dataclass(frozen=True)
class Resolution:
    """One requirement of the agent on one Python and architecture.

    ``versions`` maps what pip would install for it to versions (with its dependencies on
    aarch64; the package alone on armv7l); ``error`` says why nothing fits.
    """

    python: str
    arch: str
    group: str
    requirement: str
    versions: Mapping[str, str]
    error: str = ""

    @property
    def version(self) -> str:
        """The requirement's own version, or "" without a wheel."""
        return self.versions.get(Requirement(self.requirement).name, "")


def agent_requirements(python: str) -> dict[str, list[str]]:
    """The core's and each runtime extra's requirements that apply on ``python``."""
    with (ROOT / "pyproject.toml").open("rb") as f:
        project = tomllib.load(f)["project"]
    groups = {"core": project["dependencies"], **project["optional-dependencies"]}
    env = {"python_version": python, "python_full_version": f"{python}.0"}
    out: dict[str, list[str]] = {}
    for group in GROUPS:
        reqs = [Requirement(r) for r in groups[group]]
        out[group] = [
            f"{r.name}{r.specifier}" for r in reqs if r.marker is None or r.marker.evaluate(env)
        ]
    return out


def _platforms(arch: str, glibc_minor: int) -> list[str]:
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(17, glibc_minor + 1)]
    return [*tags, f"manylinux2014_{arch}", f"linux_{arch}"]


@dataclass(frozen=True)
class _Job:
    python: str
    arch: str
    group: str
    reqs: tuple[str, ...]
    deps: bool


def _pip(job: _Job) -> tuple[dict[str, str], set[str]]:
    """(name -> version, names whose wheel is pure Python) of what pip would install.

    Raises:
        RuntimeError: nothing fits; the message is pip's first error line.
    """
    glibc = TFLITE_GLIBC_MINOR if job.group == "tflite" else GLIBC_MINOR
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed"]
        cmd += ["--quiet", "--disable-pip-version-check", "--report", str(report)]
        cmd += ["--python-version", job.python, "--only-binary=:all:", "--target", tmp]
        for platform in _platforms(job.arch, glibc):
            cmd += ["--platform", platform]
        cmd += [] if job.deps else ["--no-deps"]
        done = subprocess.run(
            [*cmd, *job.reqs], capture_output=True, text=True, timeout=120, check=False
        )
        if done.returncode != 0:
            errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR")]
            raise RuntimeError(errors[0] if errors else done.stderr.strip()[-300:])
        installs = json.loads(report.read_text())["install"]
    versions = {i["metadata"]["name"]: i["metadata"]["version"] for i in installs}
    pure = {
        i["metadata"]["name"]
        for i in installs
        if i["download_info"]["url"].endswith("-none-any.whl")
    }
    return versions, pure


def _run(job: _Job) -> tuple[_Job, dict[str, str], set[str], str]:
    try:
        versions, pure = _pip(job)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        return job, {}, set(), str(exc)
    return job, versions, pure, ""


def resolve_all(workers: int = 4) -> list[Resolution]:
    """Every requirement of the core and the runtime extras on each Python and ARM arch.

    aarch64 resolves each group whole, with dependencies (a transitive dependency without
    wheels counts), and per requirement only when the group fails. armv7l resolves each
    compiled package alone: numpy, which nearly everything needs, has no armv7l wheels on
    PyPI. A pure-Python wheel fits every architecture, so aarch64's answer stands for it.
    """
    groups = {p: agent_requirements(p) for p in PYTHONS}
    whole = [_Job(p, "aarch64", g, tuple(r), True) for p in PYTHONS for g, r in groups[p].items()]
    results: list[Resolution] = []
    pure: set[tuple[str, str]] = set()  # (python, requirement)
    retry: list[_Job] = []
    with ThreadPoolExecutor(workers) as pool:
        for job, versions, pure_names, error in pool.map(_run, whole):
            if error and len(job.reqs) > 1:
                retry += [_Job(job.python, job.arch, job.group, (r,), True) for r in job.reqs]
                continue
            for req in job.reqs:
                results.append(Resolution(job.python, job.arch, job.group, req, versions, error))
                if Requirement(req).name in pure_names:
                    pure.add((job.python, req))
        armv7l = [
            _Job(p, "armv7l", g, (r,), False)
            for p in PYTHONS
            for g, r in _first_of_each_package(groups[p])
            if (p, r) not in pure
        ]
        for job, versions, _, error in pool.map(_run, [*retry, *armv7l]):
            req = job.reqs[0]
            results.append(Resolution(job.python, job.arch, job.group, req, versions, error))
    for r in list(results):
        if r.arch == "aarch64" and (r.python, r.requirement) in pure:
            versions = {Requirement(r.requirement).name: r.version}
            results.append(Resolution(r.python, "armv7l", r.group, r.requirement, versions))
    return results


def _first_of_each_package(groups: Mapping[str, list[str]]) -> list[tuple[str, str]]:
    """(group, requirement), a package once: the tflite extra's numpy<2 is the core's numpy."""
    seen: set[str] = set()
    out = []
    for group, reqs in groups.items():
        for req in reqs:
            name = Requirement(req).name
            if name not in seen:
                seen.add(name)
                out.append((group, req))
    return out


def table(results: list[Resolution]) -> str:
    """A Markdown table: one row per requirement and architecture, one column per Python."""
    cells: dict[tuple[str, str, str], dict[str, str]] = {}
    for r in results:
        row = cells.setdefault((r.group, r.requirement, r.arch), {})
        row[r.python] = r.version or "no wheel"
    lines = ["| extra | requirement | arch | " + " | ".join(PYTHONS) + " |"]
    lines.append("|---|---|---|" + "---|" * len(PYTHONS))
    for (group, req, arch), row in sorted(cells.items(), key=lambda kv: GROUPS.index(kv[0][0])):
        versions = " | ".join(row.get(p, "—") for p in PYTHONS)
        lines.append(f"| {group} | `{req}` | {arch} | {versions} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(table(resolve_all()) + "\n")
