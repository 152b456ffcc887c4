"""The /ui status page in headless Chromium, against a real `genq api` process.

Jobs are submitted over HTTP and run by an in-process worker runtime (fake
engine) on the API's embedded SQLite database.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

from core import keys
from core.db import session_scope
from tests.browser.conftest import RunningAPI
from worker.engine.fake import FakeEngine
from worker.runtime import WorkerRuntime

pytestmark = pytest.mark.browser

WAIT_S = 30  # an upper bound for the page to catch up, not a timing assertion
Screenshot = Callable[[WebDriver, str], Path]


@pytest.fixture
def runtime_for() -> Iterator[Callable[[RunningAPI], WorkerRuntime]]:
    made: list[WorkerRuntime] = []

    def make(api: RunningAPI) -> WorkerRuntime:
        rt = WorkerRuntime(api.settings, FakeEngine(max_prompt_words=20))
        made.append(rt)
        return rt

    yield make
    for rt in made:
        rt.close()


def submit(http: httpx.Client, prompt: str, **body: Any) -> str:
    response = http.post("/v1/jobs", json={"prompt": prompt, "max_new_tokens": 6, **body})
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


def make_batch(http: httpx.Client, n: int) -> str | None:
    """A batch of ``n`` requests, or None where this server has no batches API."""
    lines = [
        {
            "custom_id": f"r{i}",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": "fake", "prompt": f"batch item {i}", "max_tokens": 3},
        }
        for i in range(n)
    ]
    content = "".join(json.dumps(line) + "\n" for line in lines).encode()
    uploaded = http.post(
        "/v1/files", files={"file": ("in.jsonl", content)}, data={"purpose": "batch"}
    )
    if uploaded.status_code == 404:
        return None
    assert uploaded.status_code == 200, uploaded.text
    batch = http.post("/v1/batches", json={"input_file_id": uploaded.json()["id"]})
    assert batch.status_code == 200, batch.text
    batch_id: str = batch.json()["id"]
    return batch_id


def row(browser: WebDriver, job_id: str) -> Any:
    return WebDriverWait(browser, WAIT_S).until(
        ec.presence_of_element_located((By.CSS_SELECTOR, f'#jobs tr[data-job-id="{job_id}"]'))
    )


def row_status(browser: WebDriver, job_id: str) -> str:
    """The status badge of a job's row. The page re-renders its table as it refreshes,
    so a row found a moment ago may be gone (stale): then it is found again."""

    def badge(d: WebDriver) -> str:
        text: str = row(d, job_id).find_element(By.CSS_SELECTOR, ".badge").text
        return text

    return str(fresh_wait(browser).until(badge))


def click_row(browser: WebDriver, job_id: str) -> None:
    """Click a job's row, found again if the table re-rendered under the click."""

    def click(d: WebDriver) -> bool:
        row(d, job_id).click()
        return True

    fresh_wait(browser).until(click)


def fresh_wait(browser: WebDriver) -> WebDriverWait[WebDriver]:
    """A wait that tries again when an element went stale (the table re-rendered)."""
    return WebDriverWait(browser, WAIT_S, ignored_exceptions=(StaleElementReferenceException,))


def test_the_page_lists_jobs_and_batches_and_shows_a_job(
    start_api: Callable[..., RunningAPI],
    runtime_for: Callable[[RunningAPI], WorkerRuntime],
    driver: WebDriver,
    screenshots: Screenshot,
) -> None:
    api = start_api()
    runtime = runtime_for(api)
    with httpx.Client(base_url=api.url, timeout=30) as http:
        batch_id = make_batch(http, 4)
        if batch_id is not None:  # two of its four requests done
            batch_jobs = http.get("/v1/jobs", params={"batch_id": batch_id}).json()["data"]
            for job in batch_jobs[:2]:
                assert runtime.run_job(job["id"], worker="browser-test") == "succeeded"
        done = submit(http, "the quick brown fox jumps")
        failed = submit(http, " ".join(["word"] * 30))  # over the fake model's limit
        waiting = submit(http, "still in the queue", max_new_tokens=4)
        assert runtime.run_job(done, worker="browser-test") == "succeeded"
        assert runtime.run_job(failed, worker="browser-test") == "failed"
        output = http.get(f"/v1/jobs/{done}").json()["output"]

    driver.get(f"{api.url}/ui")
    for job_id in (done, failed, waiting):
        row(driver, job_id)
    assert row_status(driver, done) == "succeeded"
    assert row_status(driver, failed) == "failed"
    assert row_status(driver, waiting) == "queued"
    assert driver.find_element(By.ID, "key-form").is_displayed() is False

    if batch_id is not None:
        bar = WebDriverWait(driver, WAIT_S).until(
            ec.visibility_of_element_located(
                (By.CSS_SELECTOR, f'#batches tr[data-batch-id="{batch_id}"] .progress')
            )
        )
        assert bar.get_attribute("aria-valuenow") == "2"
        assert bar.get_attribute("aria-valuemax") == "4"
    else:
        assert not driver.find_element(By.ID, "batches-section").is_displayed()

    click_row(driver, done)
    detail = WebDriverWait(driver, WAIT_S).until(
        ec.visibility_of_element_located((By.ID, "detail"))
    )
    WebDriverWait(driver, WAIT_S).until(
        ec.text_to_be_present_in_element((By.ID, "detail-id"), done)
    )
    assert detail.find_element(By.ID, "detail-output").text == output
    assert detail.find_element(By.ID, "detail-prompt").text == "the quick brown fox jumps"
    assert detail.find_element(By.ID, "detail-status").text == "succeeded"
    assert '"max_new_tokens": 6' in detail.find_element(By.ID, "detail-params").text
    screenshots(driver, "status-page")

    # The page refreshes by itself: the queued job, run now, shows as succeeded.
    assert runtime.run_job(waiting, worker="browser-test") == "succeeded"
    WebDriverWait(driver, WAIT_S).until(lambda d: row_status(d, waiting) == "succeeded")

    click_row(driver, failed)
    WebDriverWait(driver, WAIT_S).until(ec.visibility_of_element_located((By.ID, "detail-error")))
    assert "prompt_too_long" in driver.find_element(By.ID, "detail-error").text
    screenshots(driver, "status-page-failed-job")


def test_with_auth_on_the_page_asks_for_a_key_and_keeps_it(
    start_api: Callable[..., RunningAPI],
    runtime_for: Callable[[RunningAPI], WorkerRuntime],
    driver: WebDriver,
    screenshots: Screenshot,
) -> None:
    api = start_api(require_auth=True)
    with session_scope(api.settings.resolved_database_url) as session:
        _, secret = keys.create_key(session, name="browser", owner="alice")
    headers = {"Authorization": f"Bearer {secret}"}
    with httpx.Client(base_url=api.url, timeout=30, headers=headers) as http:
        job_id = submit(http, "a key protects this")
    assert runtime_for(api).run_job(job_id, worker="browser-test") == "succeeded"

    driver.get(f"{api.url}/ui")
    form = WebDriverWait(driver, WAIT_S).until(
        ec.visibility_of_element_located((By.ID, "key-form"))
    )
    screenshots(driver, "status-page-key-form")
    form.find_element(By.ID, "key-input").send_keys("genq_wrong")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    WebDriverWait(driver, WAIT_S).until(ec.visibility_of_element_located((By.ID, "key-error")))

    form.find_element(By.ID, "key-input").send_keys(secret)
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    assert row_status(driver, job_id) == "succeeded"
    assert driver.execute_script("return localStorage.getItem('genq.apiKey')") == secret

    driver.refresh()  # the key is remembered
    assert row_status(driver, job_id) == "succeeded"
    assert not driver.find_element(By.ID, "key-form").is_displayed()
