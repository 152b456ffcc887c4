"""Celery's root warning is silenced only where the worker accepts JSON alone."""

from __future__ import annotations

import warnings

import pytest
from celery.exceptions import SecurityWarning
from celery.platforms import _warn_or_raise_security_error

from core.queue import celery_config
from core.settings import Settings
from worker.celery_app import quiet_root_warning


def _root_check(accept_content: list[str]) -> list[warnings.WarningMessage]:
    """What Celery's privilege check warns, as root, after quiet_root_warning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_root_warning(accept_content)
        _warn_or_raise_security_error(0, 0, 0, 0, pickle_or_serialize=False)
    return [w for w in caught if issubclass(w.category, SecurityWarning)]


def test_genq_accepts_json_only_so_the_root_warning_is_silenced() -> None:
    accept = celery_config(Settings())["accept_content"]
    assert accept == ["json"]
    assert _root_check(accept) == []


@pytest.mark.parametrize("unsafe", ["pickle", "yaml"])
def test_with_an_unsafe_serializer_accepted_the_warning_stays(unsafe: str) -> None:
    assert len(_root_check(["json", unsafe])) == 1
