"""The roles' wheelhouse check: which wheels a target's CPython and CPU cannot install.

homeiot_image (the server image) and homeiot_publisher (the Pi) each carry the same filter plugin
(a role cannot load another role's plugin); these tests hold the copies together and check the
tag rules against wheel names of the kind ``make wheelhouse`` downloads.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
from ansible.errors import AnsibleFilterError

_ROOT = Path(__file__).resolve().parents[3]
_COPIES = [_ROOT / "roles/homeiot_publisher/filter_plugins/wheel_tags.py",
           _ROOT / "roles/homeiot_image/filter_plugins/wheel_tags.py"]


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"wheel_tags_{path.parts[-3]}", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mismatches = _load(_COPIES[0]).wheel_mismatches

PYARROW_X86 = "pyarrow-26.0.1-cp311-cp311-manylinux_2_28_x86_64.whl"
PYARROW_ARM = "pyarrow-26.0.1-cp311-cp311-manylinux_2_28_aarch64.whl"
ORJSON = "orjson-3.13.0-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"
PURE = ["paho_mqtt-2.2.0-py3-none-any.whl", "pyserial-3.5-py2.py3-none-any.whl",
        "homeiot-0.1.0-py3-none-any.whl"]


def test_the_roles_carry_the_same_plugin() -> None:
    assert _COPIES[0].read_bytes() == _COPIES[1].read_bytes()


def test_a_wheelhouse_built_for_the_target_fits() -> None:
    assert mismatches([PYARROW_X86, ORJSON, *PURE], "3.11", "x86_64") == []
    assert mismatches([f"/some/dir/{PYARROW_ARM}", *PURE], "3.11.2", "aarch64") == []


def test_pure_wheels_fit_any_cpu_and_python_3() -> None:
    assert mismatches(PURE, "3.13", "armv7l") == []


def test_another_cpu_is_named_with_the_target() -> None:
    (problem,) = mismatches([PYARROW_X86, *PURE], "3.11", "aarch64")
    assert problem == f"{PYARROW_X86}: built for manylinux_2_28_x86_64, the target is aarch64"
    assert mismatches([PYARROW_ARM], "3.11", "arm64") == []  # macOS/Docker spelling of aarch64


def test_another_python_is_named_with_the_target() -> None:
    wheel = "duckdb-2.0.1-cp312-cp312-manylinux_2_28_x86_64.whl"
    assert mismatches([wheel], "3.11", "x86_64") == [
        f"{wheel}: built for cp312-cp312, the target runs CPython 3.11"]
    assert mismatches([PYARROW_X86], "3.13", "x86_64") != []


def test_stable_abi_wheels_fit_newer_not_older_pythons() -> None:
    wheel = "cryptography-46.0.0-cp311-abi3-manylinux_2_34_x86_64.whl"
    assert mismatches([wheel], "3.13", "x86_64") == []
    assert mismatches([wheel], "3.10", "x86_64") != []


def test_macos_and_musl_wheels_do_not_fit_debian() -> None:
    mac = "orjson-3.13.0-cp311-cp311-macosx_15_0_arm64.whl"
    musl = "orjson-3.13.0-cp311-cp311-musllinux_1_2_x86_64.whl"
    assert len(mismatches([mac], "3.11", "aarch64")) == 1
    assert len(mismatches([musl], "3.11", "x86_64")) == 1


def test_bad_input_is_named() -> None:
    assert mismatches(["README.txt"], "3.11", "x86_64") == ["README.txt: not a wheel file name"]
    with pytest.raises(AnsibleFilterError, match="python_version"):
        mismatches(PURE, "three", "x86_64")
