"""`make lab-down` removes what the lab made and nothing else, against the real Docker engine.

Each test plays a lab under a name of its own (HOMEIOT_LAB_NAME=homeiot-labtest-<random>), so a
user's running lab (homeiot-lab-*) and the Molecule scenarios (homeiot-molecule-*) are never
touched: the containers and networks here are created and removed by their exact names.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.services import require_binary

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[3]
# Built by `make images` (part of `make setup`); any image with `sleep` would do.
IMAGE = "homeiot/client:bookworm"
LAB_LABEL = "homeiot.molecule=lab"
DOCKER = shutil.which("docker") or "/usr/bin/docker"
MAKE = shutil.which("make") or "/usr/bin/make"


def _docker(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([DOCKER, *args], capture_output=True, text=True, check=check, timeout=120)


def _exists(kind: str, name: str) -> bool:
    return _docker(kind, "inspect", name, check=False).returncode == 0


def _running(name: str) -> bool:
    result = _docker("inspect", "--format", "{{.State.Running}}", name, check=False)
    return result.stdout.strip() == "true"


def _container(name: str, *, label: bool, network: str | None = None) -> None:
    args = ["run", "--detach", "--name", name]
    if label:
        args += ["--label", LAB_LABEL]
    if network:
        args += ["--network", network]
    _docker(*args, IMAGE, "sleep", "infinity")


def _lab_down(lab: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOMEIOT_LAB_NAME": lab}
    return subprocess.run([MAKE, "-s", "lab-down"], cwd=REPO, env=env, capture_output=True,
                          text=True, check=False, timeout=120)


@pytest.fixture
def lab() -> Iterator[tuple[str, list[str], list[str], list[Path]]]:
    """A lab name plus lists the test fills with what it made; all removed by name afterwards."""
    require_binary("docker")
    if _docker("info", check=False).returncode != 0:
        message = "dockerd is not running (run `make setup`)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    if _docker("image", "inspect", IMAGE, check=False).returncode != 0:
        message = f"{IMAGE} is missing (run `make images`)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    name = f"homeiot-labtest-{uuid.uuid4().hex[:8]}"
    containers: list[str] = []
    networks: list[str] = []
    dirs: list[Path] = []
    yield name, containers, networks, dirs
    for container in containers:
        _docker("rm", "--force", container, check=False)
    for network in networks:
        _docker("network", "rm", network, check=False)
    for directory in dirs:
        shutil.rmtree(directory, ignore_errors=True)


def test_lab_down_removes_the_labs_containers_network_and_state_only(
    lab: tuple[str, list[str], list[str], list[Path]],
) -> None:
    name, containers, networks, dirs = lab
    server, pi = f"{name}-server", f"{name}-pi"
    # Decoys: a name that only starts like the lab's, another lab-labelled container that is not
    # one of its two, an unlabelled neighbour, a look-alike network and state directory.
    decoys = [f"{name}x-server", f"{name}-server2", f"{name}-db"]
    containers += [server, pi, *decoys]
    networks += [name, f"{name}x"]
    state, other_state = REPO / ".cache" / name, REPO / ".cache" / f"{name}x"
    dirs += [state, other_state]

    _docker("network", "create", "--label", LAB_LABEL, name)
    _docker("network", "create", "--label", LAB_LABEL, f"{name}x")
    _container(server, label=True, network=name)
    _container(pi, label=True, network=name)
    _container(decoys[0], label=True)
    _container(decoys[1], label=True)
    _container(decoys[2], label=False)
    for directory in (state / "secrets", other_state / "secrets"):
        directory.mkdir(parents=True)
        (directory / "api_token").write_text("x" * 32)

    result = _lab_down(name)

    assert result.returncode == 0, result.stdout + result.stderr
    assert f"removed container {server}" in result.stdout
    assert f"removed container {pi}" in result.stdout
    assert not _exists("container", server)
    assert not _exists("container", pi)
    assert not _exists("network", name)
    assert not state.exists()
    for decoy in decoys:
        assert _running(decoy), f"{decoy} did not survive make lab-down"
    assert _exists("network", f"{name}x")
    assert (other_state / "secrets" / "api_token").is_file()

    again = _lab_down(name)  # nothing left: a no-op, not an error
    assert again.returncode == 0, again.stdout + again.stderr
    assert "removed" not in again.stdout


def test_lab_down_leaves_a_container_the_lab_did_not_make(
    lab: tuple[str, list[str], list[str], list[Path]],
) -> None:
    name, containers, _, _ = lab
    server = f"{name}-server"
    containers.append(server)
    _container(server, label=False)  # the lab's name, but not the lab's label

    result = _lab_down(name)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "was not made by the lab" in result.stderr
    assert _running(server)


@pytest.mark.parametrize("name", ["homeiot-molecule-site", "../etc", "Homeiot-Lab", "a b", "facts", "images"])
def test_lab_down_refuses_a_name_that_is_not_a_lab(name: str) -> None:
    # (Never the empty name: that is the default lab, a user's.)
    result = _lab_down(name)
    assert result.returncode == 2
    assert "is not a lab name" in result.stderr


# --- Which service images a lab runs (molecule/lab/lab.sh images: the first thing `up` does) ---
# Played offline with names that cannot be pulled anywhere (.invalid never resolves, RFC 6761)
# or that are present here; nothing is started. What the upstream images do once running is not
# tested here: that needs a machine that can pull them.
UNPULLABLE = "registry.invalid/homeiot-test/mosquitto:0"


def _lab_images(lab: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("HOMEIOT_LAB_")}
    environ.update(HOMEIOT_LAB_NAME=lab, **env)
    return subprocess.run([str(REPO / "molecule" / "lab" / "lab.sh"), "images"], cwd=REPO, env=environ,
                          capture_output=True, text=True, check=False, timeout=300)


def _images_env(state: Path) -> dict[str, str]:
    lines = (state / "images.env").read_text(encoding="utf-8").splitlines()
    return dict(line.split("=", 1) for line in lines)


def _lab_state(lab: tuple[str, list[str], list[str], list[Path]]) -> tuple[str, Path]:
    """The lab's name and its state directory under .cache, removed by the fixture afterwards."""
    name, _, _, dirs = lab
    state = REPO / ".cache" / name
    dirs.append(state)
    return name, state


def test_lab_images_real_stops_when_the_upstream_images_cannot_be_pulled(
    lab: tuple[str, list[str], list[str], list[Path]],
) -> None:
    name, state = _lab_state(lab)

    result = _lab_images(name, HOMEIOT_LAB_IMAGES="real", HOMEIOT_LAB_UPSTREAM_MOSQUITTO=UNPULLABLE)

    assert result.returncode == 1, result.stdout + result.stderr
    assert f"cannot pull {UNPULLABLE}" in result.stdout
    assert "HOMEIOT_LAB_IMAGES=real but the upstream images cannot be pulled" in result.stderr
    # No choice is kept: the next run tries again.
    assert not (state / "images.env").exists()


def test_lab_images_auto_falls_back_to_the_standins_and_says_what_it_skipped(
    lab: tuple[str, list[str], list[str], list[Path]],
) -> None:
    name, state = _lab_state(lab)

    first = _lab_images(name, HOMEIOT_LAB_UPSTREAM_MOSQUITTO=UNPULLABLE)
    again = _lab_images(name, HOMEIOT_LAB_UPSTREAM_MOSQUITTO=UNPULLABLE)

    assert first.returncode == 0, first.stdout + first.stderr
    assert f"cannot pull {UNPULLABLE}" in first.stdout
    standins = "offline stand-ins (homeiot-standin/mosquitto:2.0.11, homeiot-standin/influxdb:1.6.7)"
    assert standins in first.stdout
    assert "Skipped: Grafana" in first.stdout
    assert "the tunnel" in first.stdout
    assert _images_env(state) == {"HOMEIOT_LAB_MOSQUITTO_IMAGE": "homeiot-standin/mosquitto:2.0.11",
                                  "HOMEIOT_LAB_INFLUXDB_IMAGE": "homeiot-standin/influxdb:1.6.7",
                                  "HOMEIOT_LAB_GRAFANA_IMAGE": "none"}
    # The choice is kept until lab-down: the second run neither pulls nor chooses otherwise.
    assert again.returncode == 0, again.stdout + again.stderr
    assert "pulling" not in again.stdout
    assert "kept from this lab's first run" in again.stdout
    assert "offline stand-ins" in again.stdout


def test_lab_images_auto_takes_upstream_images_already_here_and_skips_only_the_tunnel(
    lab: tuple[str, list[str], list[str], list[Path]],
) -> None:
    name, state = _lab_state(lab)
    # Stand-ins for "upstream images this machine has": present, so nothing is pulled.
    present = {"HOMEIOT_LAB_UPSTREAM_MOSQUITTO": IMAGE, "HOMEIOT_LAB_UPSTREAM_INFLUXDB": IMAGE,
               "HOMEIOT_LAB_UPSTREAM_GRAFANA": IMAGE}

    result = _lab_images(name, **present)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "pulling" not in result.stdout
    assert f"upstream image {IMAGE}: already on this machine" in result.stdout
    assert f"images: upstream {IMAGE}, {IMAGE}, {IMAGE}. Skipped: the tunnel" in result.stdout
    assert "Grafana" not in result.stdout.split("images: upstream", 1)[1]
    assert _images_env(state)["HOMEIOT_LAB_GRAFANA_IMAGE"] == IMAGE


def test_lab_images_standin_never_pulls(lab: tuple[str, list[str], list[str], list[Path]]) -> None:
    name, _ = _lab_state(lab)

    result = _lab_images(name, HOMEIOT_LAB_IMAGES="standin", HOMEIOT_LAB_UPSTREAM_MOSQUITTO=UNPULLABLE)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "pulling" not in result.stdout
    assert "cannot pull" not in result.stdout
    assert "offline stand-ins" in result.stdout


def test_lab_images_refuses_an_unknown_mode(lab: tuple[str, list[str], list[str], list[Path]]) -> None:
    name, _ = _lab_state(lab)

    result = _lab_images(name, HOMEIOT_LAB_IMAGES="upstream")

    assert result.returncode == 2
    assert "HOMEIOT_LAB_IMAGES=auto|real|standin" in result.stderr
