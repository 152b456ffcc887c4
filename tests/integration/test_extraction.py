"""The bulk extraction example of docs/structured-output.md, as a user runs it: a JSONL
of texts becomes chat jobs constrained by a JSON schema, `genq run` answers them all,
and every answer parses and validates against the schema."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from tests.integration.helpers import REPO, genq_env
from tests.tiny_model import tiny_chat_model_dir

pytestmark = pytest.mark.integration

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "city": {"type": "string", "maxLength": 12},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
NAMES = ["Lily", "Tom", "Sue", "Ben", "Mia"]
CITIES = ["Paris", "Rome", "Oslo", "Lima"]


def test_a_jsonl_of_texts_becomes_a_jsonl_of_valid_objects(tmp_path: Path) -> None:
    texts = [
        {"id": f"t{i}", "text": f"{NAMES[i % 5]} is {i % 90} and lives in {CITIES[i % 4]}."}
        for i in range(100)
    ]
    requests = tmp_path / "requests.jsonl"
    with requests.open("w") as f:
        for text in texts:  # what the doc's jq line makes of each text
            line = {
                "custom_id": text["id"],
                "messages": [
                    {"role": "system", "content": "Extract the person as JSON."},
                    {"role": "user", "content": text["text"]},
                ],
                "max_new_tokens": 120,
                "do_sample": True,
                "seed": int(text["id"][1:]),
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "person", "schema": SCHEMA},
                },
            }
            f.write(json.dumps(line) + "\n")
    output = tmp_path / "results.jsonl"
    env = genq_env(
        GENQ_DATA_DIR=str(tmp_path / "data"),
        GENQ_MODEL=str(tiny_chat_model_dir(tmp_path / "model")),
        GENQ_MAX_BATCH_SIZE="32",
    )
    done = subprocess.run(
        [sys.executable, "-m", "cli", "run", str(requests), "-o", str(output)],
        cwd=REPO,
        env=env,
        capture_output=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()[-4000:]
    results = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["custom_id"] for r in results] == [t["id"] for t in texts]
    for result in results:
        assert result["error"] is None, result
        choice = result["response"]["body"]["choices"][0]
        assert result["response"]["body"]["object"] == "chat.completion"
        assert choice["finish_reason"] == "stop", choice
        jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMA)
