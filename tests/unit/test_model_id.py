"""One id per model: a local directory however it is spelt, or GENQ_MODEL_NAME."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from core.settings import Settings, model_id
from tests.conftest import RecordingQueue
from worker.engine import build_engine
from worker.runtime import WorkerRuntime


@pytest.fixture
def model_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A model directory, and a working directory from which ``../models/m`` names it."""
    (tmp_path / "models" / "m").mkdir(parents=True)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    return tmp_path / "models" / "m"


def test_a_local_directory_has_one_id_however_it_is_spelt(model_dir: Path) -> None:
    spellings = ["../models/m", "../models/m/", str(model_dir), "../work/../models/m"]
    assert {model_id(s) for s in spellings} == {str(model_dir.resolve())}
    assert model_id("gpt2") == "gpt2"
    assert model_id("openai-community/gpt2") == "openai-community/gpt2"
    assert model_id("fake:token_delay_s=0.1") == "fake:token_delay_s=0.1"


def test_model_name_is_the_served_name(model_dir: Path) -> None:
    assert Settings(model="../models/m").model_id == str(model_dir.resolve())
    assert Settings(model="../models/m", model_name="stories").model_id == "stories"


def test_jobs_naming_a_model_by_either_path_share_its_queue_and_its_models_entry(
    settings: Settings, model_dir: Path
) -> None:
    relative = settings.model_copy(update={"model": "../models/m"})
    queue = RecordingQueue()
    with TestClient(create_app(relative, queue=queue)) as client:
        by_default = client.post("/v1/jobs", json={"prompt": "a"})
        by_absolute = client.post("/v1/jobs", json={"prompt": "b", "model": str(model_dir)})
        by_relative = client.post("/v1/jobs", json={"prompt": "c", "model": "../models/m/"})
        assert {r.status_code for r in (by_default, by_absolute, by_relative)} == {202}
        ids = {r.json()["model"] for r in (by_default, by_absolute, by_relative)}
        assert ids == {str(model_dir.resolve())}
        assert {model for _, model, _ in queue.routes} == {str(model_dir.resolve())}
        listed = [m["id"] for m in client.get("/v1/models").json()["data"]]
        assert listed == [str(model_dir.resolve())]


def test_a_worker_registers_and_serves_its_model_under_the_served_name(
    settings: Settings,
) -> None:
    named = settings.model_copy(update={"model": "fake", "model_name": "stories"})
    runtime = WorkerRuntime(named, build_engine(named))
    try:
        runtime.heartbeat()
        with TestClient(create_app(named, queue=RecordingQueue())) as client:
            assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["stories"]
            job = client.post("/v1/jobs", json={"prompt": "one two"}).json()
            assert job["model"] == "stories"
            assert runtime.run_job(job["id"], worker="w") == "succeeded"
    finally:
        runtime.close()


def test_a_name_no_path_can_be_is_kept_as_given() -> None:
    """A hostile model name must not raise (it would be a 500 at every door)."""
    for spec in ["a" * 300, "/" + "b" * 5000, "~nosuchuser_genq/x", "./\x00x"]:
        assert model_id(spec) == spec


@pytest.mark.parametrize("spelt", ["/proc/self/cwd", ".", "../models", "~"])
def test_an_unknown_model_is_named_as_sent_never_where_its_path_leads(
    settings: Settings, model_dir: Path, spelt: str
) -> None:
    """A caller probing with paths learns nothing of the server's directories: every
    door answers 422 naming the model as it was sent, never the path it resolves to,
    and only a path to the served directory itself is that model."""
    local = settings.model_copy(update={"model": str(model_dir)})
    server_paths = [p for p in (str(model_dir.parent.parent), str(Path.home())) if p != "/"]
    with TestClient(create_app(local, queue=RecordingQueue())) as client:
        answers = {  # param: (answer, the door's status: OpenAI's doors say 404)
            "model": (client.post("/v1/jobs", json={"prompt": "a", "model": spelt}), 422),
            "jobs.1.model": (
                client.post(
                    "/v1/jobs/bulk",
                    json={"jobs": [{"prompt": "a"}, {"prompt": "b", "model": spelt}]},
                ),
                422,
            ),
            "model ": (client.post("/v1/completions", json={"prompt": "a", "model": spelt}), 404),
        }
        for param, (answer, status) in answers.items():
            assert answer.status_code == status, answer.text
            error = answer.json()["error"]
            assert error["code"] == "model_not_found" and error["param"] == param.strip()
            assert error["message"].startswith(f"model {spelt!r} is not served")
            # The served model's own id is listed (as /v1/models lists it): that
            # path aside, nothing of the server's file system is in the answer.
            rest = answer.text.replace(str(model_dir.resolve()), "")
            assert not any(path in rest for path in server_paths), answer.text
        via_cwd = client.post(
            "/v1/jobs", json={"prompt": "a", "model": "/proc/self/cwd/../models/m"}
        )
        assert via_cwd.status_code == 202 and via_cwd.json()["model"] == str(model_dir.resolve())
