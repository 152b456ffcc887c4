"""docker-compose.yml: valid for Compose v1 and v2, and nothing published on every
interface by default."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

COMPOSE = Path(__file__).resolve().parents[2] / "docker-compose.yml"


def test_every_published_port_names_its_host_interface_loopback_by_default() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    published = {name: s["ports"] for name, s in services.items() if s.get("ports")}
    assert "api" in published
    for name, ports in published.items():
        for port in ports:
            assert re.match(r"(127\.0\.0\.1|\$\{GENQ_API_BIND:-127\.0\.0\.1\}):", str(port)), (
                name,
                port,
            )


@pytest.mark.parametrize("command", [["docker-compose"], ["docker", "compose"]])
def test_the_file_is_valid_for_compose(command: list[str]) -> None:
    if shutil.which(command[0]) is None:
        pytest.skip(f"{command[0]} not installed")
    if command == ["docker", "compose"]:
        probe = subprocess.run([*command, "version"], capture_output=True, check=False)
        if probe.returncode != 0:
            pytest.skip("docker compose (v2) not installed")
    result = subprocess.run(
        [*command, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
