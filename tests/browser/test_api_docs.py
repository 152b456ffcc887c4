"""/docs (Swagger UI) in headless Chromium: rendered from files the API serves itself."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

from tests.browser.conftest import RunningAPI

pytestmark = pytest.mark.browser

WAIT_S = 30  # an upper bound for the page to render, not a timing assertion


def test_swagger_ui_renders_the_operations_from_the_api_alone(
    driver: WebDriver,
    start_api: Callable[..., RunningAPI],
    screenshots: Callable[[WebDriver, str], Path],
) -> None:
    api = start_api()
    driver.get(f"{api.url}/docs")
    WebDriverWait(driver, WAIT_S).until(
        ec.presence_of_element_located((By.CSS_SELECTOR, ".opblock-summary-path"))
    )
    paths = {
        e.text.replace("\u200b", "")
        for e in driver.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")
    }
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/models"} <= paths, paths
    assert driver.find_elements(By.CSS_SELECTOR, ".opblock-post")
    assert "genq" in driver.find_element(By.CSS_SELECTOR, ".info .title").text
    shot = screenshots(driver, "api-docs")
    assert shot.stat().st_size > 10_000
    # Everything the page loaded (scripts, styles, the schema) came from the API itself.
    loaded = driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
    )
    origin = urlsplit(api.url).netloc
    assert loaded and all(urlsplit(url).netloc == origin for url in loaded), loaded
