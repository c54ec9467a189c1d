"""Which wheels of a wheelhouse a target cannot install, by their file names' tags (PEP 427/425).

``wheel_mismatches(names, python_version, machine)`` returns one line per wheel that the target's
CPython (``"3.11"``) on its CPU (``uname -m``: ``x86_64``, ``aarch64``, ``armv7l``) cannot install,
naming the wheel's tags and the target; an empty list means every wheel fits. Pure wheels
(``py3-none-any``) fit everywhere. The same file serves the homeiot_image and homeiot_publisher
roles (a role cannot import another's plugin); a unit test holds the copies together.
"""

from __future__ import annotations

import re

from ansible.errors import AnsibleFilterError

# name-version(-build)?-python-abi-platform.whl
_WHEEL = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)(-\d[^-]*)?-(?P<py>[^-]+)-(?P<abi>[^-]+)"
                    r"-(?P<plat>[^-]+)\.whl$")
_MACHINE_ALIASES = {"amd64": "x86_64", "arm64": "aarch64", "armv8l": "armv7l"}


def _python_fits(py_tags: list[str], abi_tags: list[str], major: int, minor: int) -> bool:
    for tag in py_tags:
        if tag in (f"py{major}", f"py{major}{minor}", f"cp{major}{minor}"):
            return True
        # A stable-ABI wheel built for an older CPython 3 also fits a newer one.
        found = re.fullmatch(rf"cp{major}(\d+)", tag)
        if found and "abi3" in abi_tags and int(found.group(1)) <= minor:
            return True
    return False


def _platform_fits(plat_tags: list[str], machine: str) -> bool:
    for tag in plat_tags:
        if tag == "any":
            return True
        # manylinux_2_28_x86_64, manylinux2014_aarch64, musllinux_1_2_x86_64 (musl is not Debian)
        if tag.startswith(("manylinux", "linux_")) and tag.endswith("_" + machine):
            return True
    return False


def wheel_mismatches(names: list[str], python_version: str, machine: str) -> list[str]:
    """The wheels in ``names`` the target cannot install, each with the reason."""
    found = re.fullmatch(r"(\d+)\.(\d+)(\.\d+)?", str(python_version))
    if not found:
        raise AnsibleFilterError(f"wheel_mismatches: python_version must look like 3.11, got {python_version!r}")
    major, minor = int(found.group(1)), int(found.group(2))
    machine = _MACHINE_ALIASES.get(str(machine), str(machine))
    problems = []
    for name in names:
        base = str(name).rsplit("/", 1)[-1]
        parts = _WHEEL.match(base)
        if parts is None:
            problems.append(f"{base}: not a wheel file name")
            continue
        py_tags, abi_tags = parts["py"].split("."), parts["abi"].split(".")
        plat_tags = parts["plat"].split(".")
        if not _python_fits(py_tags, abi_tags, major, minor):
            problems.append(f"{base}: built for {parts['py']}-{parts['abi']}, the target runs "
                            f"CPython {major}.{minor}")
        elif not _platform_fits(plat_tags, machine):
            problems.append(f"{base}: built for {parts['plat']}, the target is {machine}")
    return problems


class FilterModule:
    """Ansible's entry point."""

    def filters(self) -> dict[str, object]:
        return {"wheel_mismatches": wheel_mismatches}
