"""Headless Chromium (Debian's chromium and chromium-driver) driven by Selenium, and a
real `genq api` process to point it at.

Selenium Manager never runs: the driver's path is given, so no browser or driver
is downloaded. Without /usr/bin/chromium the tests skip, except in CI (CI=true),
where `.ci/run` installs it first (`make install-browser`) and they must run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver

from core.settings import Settings
from tests.integration.helpers import free_port, genq_env, genq_process, wait_until

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture
def driver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[WebDriver]:
    """A fresh headless Chromium with its own profile, closed after the test."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        message = f"{CHROMIUM} or {CHROMEDRIVER} missing (make install-browser)"
        if _in_ci():
            pytest.fail(message)
        pytest.skip(message)
    monkeypatch.setenv("SE_OFFLINE", "true")  # belt and braces: Selenium Manager stays offline
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1400,900",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(arg)
    browser = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    browser.set_page_load_timeout(30)
    try:
        yield browser
    finally:
        browser.quit()


@dataclasses.dataclass(frozen=True)
class RunningAPI:
    """A `genq api` process on the embedded default, and settings for its database."""

    url: str
    settings: Settings


@pytest.fixture
def start_api(tmp_path: Path) -> Iterator[Callable[..., RunningAPI]]:
    """Start `genq api` (GENQ_MODEL=fake, a tmp data dir) on a free port; stopped after."""
    stack = contextlib.ExitStack()

    def start(*, require_auth: bool = False) -> RunningAPI:
        port = free_port()
        data = tmp_path / f"data-{port}"
        env = genq_env(
            GENQ_DATA_DIR=str(data),
            GENQ_MODEL="fake",
            GENQ_REQUIRE_AUTH=str(require_auth).lower(),
        )
        log = tmp_path / f"api-{port}.log"
        stack.enter_context(genq_process(["api", "--port", str(port)], env, log))
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            try:
                return httpx.get(f"{url}/readyz", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, 60, "genq api", log)
        settings = Settings(data_dir=data, model="fake", require_auth=require_auth)
        return RunningAPI(url=url, settings=settings)

    with stack:
        yield start


@pytest.fixture
def screenshots(tmp_path: Path) -> Callable[[WebDriver, str], Path]:
    """Save a screenshot under tmp_path (and GENQ_SCREENSHOT_DIR when set, to look at)."""

    def take(browser: WebDriver, name: str) -> Path:
        path = tmp_path / f"{name}.png"
        browser.save_screenshot(str(path))
        keep = os.environ.get("GENQ_SCREENSHOT_DIR")
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            (Path(keep) / path.name).write_bytes(path.read_bytes())
        return path

    return take
