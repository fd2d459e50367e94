"""The InfluxDB sink's settings and retry waits: the lab config's rules and words, and the project's one backoff."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from hotlab.backoff import Backoff
from hotlab.controller.config import parse_config
from hotlab.controller.config_table import ConfigError
from hotlab.controller.outbox import AsyncOutbox, Outbox
from hotlab.controller.sinks.influx import InfluxConfig, InfluxConfigError, InfluxSink

SETTINGS: dict[str, Any] = {"url": "http://db:8086", "token": "t", "org": "o", "bucket": "b"}


def test_defaults_are_the_projects_retry_policy() -> None:
    config = InfluxConfig.from_mapping(SETTINGS)
    assert (config.batch_size, config.flush_interval_s, config.timeout_s) == (1000, 1.0, 10.0)
    assert Backoff(config.retry_initial_s, config.retry_max_s) == Backoff()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"bucket": None}, "influx: needs bucket (InfluxDB 2.x/3.x) or database (InfluxDB 1.x)"),
        (
            {"batchsize": 5},
            "influx.batchsize: unknown key (did you mean 'batch_size'?); allowed here: batch_size, bucket, "
            "database, flush_interval_s, org, password, raw_bucket, retry_initial_s, retry_max_s, timeout_s, "
            "token, url, username",
        ),
        ({"database": "hotlab"}, "influx.database: give either bucket (2.x/3.x) or database (1.x), not both"),
        (
            {"raw_days": 30},
            "influx.raw_days: belongs to a 1.x database; a 2.x/3.x bucket has its retention set in InfluxDB",
        ),
        (
            {"url": "x:8086"},
            "influx.url: 'x:8086' is not an http(s) URL; allowed: http:// or https:// and a host, "
            "e.g. http://127.0.0.1:8086",
        ),
        ({"timeout_s": 0}, "influx.timeout_s: must be > 0, got 0"),
        ({"batch_size": "many"}, "influx.batch_size: must be an integer, got 'many' (string)"),
        ({"batch_size": 2.5}, "influx.batch_size: must be an integer, got 2.5 (number)"),
        ({"batch_size": 50_001}, "influx.batch_size: must be <= 50000, got 50001"),
        ({"token": 5}, "influx.token: must be a string, got 5 (integer)"),
        ({"org": ""}, "influx.org: must not be empty"),
        ({"retry_initial_s": 5, "retry_max_s": 1}, "influx.retry_max_s: must be >= 5, got 1"),
        ({"retry_initial_s": 0}, "influx.retry_initial_s: must be > 0, got 0"),
    ],
)
def test_bad_settings_name_the_key_the_problem_and_what_is_allowed(changes: dict[str, Any], message: str) -> None:
    settings = {key: value for key, value in (SETTINGS | changes).items() if value is not None}
    with pytest.raises(InfluxConfigError) as info:
        InfluxConfig.from_mapping(settings)
    assert str(info.value) == message
    assert info.value.exit_code == 2


V1_SETTINGS: dict[str, Any] = {"url": "http://db:8086", "username": "u", "password": "p", "database": "hotlab"}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"org": "o"}, "influx.org: belongs to a 2.x/3.x bucket; a 1.x database has retention policies instead"),
        (
            {"raw_bucket": "r"},
            "influx.raw_bucket: belongs to a 2.x/3.x bucket; a 1.x database has retention policies instead",
        ),
        (
            {"retention_policy": "raw"},
            "influx.retention_policy: 'raw' is the raw readings' policy; name the one for everything else",
        ),
        ({"raw_days": 0}, "influx.raw_days: must be >= 1, got 0"),
        ({"raw_days": 7.5}, "influx.raw_days: must be an integer, got 7.5 (number)"),
        ({"provision": "yes"}, "influx.provision: must be true or false, got 'yes' (string)"),
        (
            {"username": None, "password": None},
            "influx: needs token_env/token_file (InfluxDB 2.x/3.x) or username with "
            "password_env/password_file (InfluxDB 1.x)",
        ),
        (
            {"token": "t"},
            "influx.token_env: give either a token (InfluxDB 2.x/3.x, or 1.8+) or username + password "
            "(InfluxDB 1.x), not both",
        ),
    ],
)
def test_bad_1x_settings_name_the_key_the_problem_and_what_is_allowed(changes: dict[str, Any], message: str) -> None:
    settings = {key: value for key, value in (V1_SETTINGS | changes).items() if value is not None}
    with pytest.raises(InfluxConfigError) as info:
        InfluxConfig.from_mapping(settings)
    assert str(info.value) == message


def test_1x_defaults_keep_raw_readings_30_days_and_provision() -> None:
    config = InfluxConfig.from_mapping(V1_SETTINGS)
    target = config.target
    assert (target.database, target.retention_policy, target.raw_days, target.provision) == ("hotlab", None, 30, True)
    assert (target.bucket, target.org) == ("hotlab", "-")  # the same target in 1.8's v2 compatibility terms
    assert config.authorization() == "Basic dTpw"  # base64 of "u:p" (RFC 7617)
    assert "'p'" not in repr(config)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("url", "ftp://db"),
        ("batch_size", 0),
        ("batch_size", 50_001),
        ("flush_interval_s", 0),
        ("timeout_s", "slow"),
        ("timeout_s", float("inf")),
    ],
)
def test_the_lab_config_and_the_sink_refuse_the_same_values_in_the_same_words(
    key: str, value: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOTLAB_TEST_INFLUX_TOKEN", "t")
    section = {"url": "http://db:8086", "token_env": "HOTLAB_TEST_INFLUX_TOKEN", "org": "o", "bucket": "b"}
    with pytest.raises(ConfigError) as lab:
        parse_config({"site": {"name": "lab"}, "influx": section | {key: value}}, file="lab.toml")
    with pytest.raises(ConfigError) as sink:
        InfluxConfig.from_mapping(SETTINGS | {key: value})
    assert str(lab.value) == f"lab.toml: {sink.value}"


async def test_retry_waits_are_the_projects_backoff(tmp_path: Path) -> None:
    config = InfluxConfig.from_mapping(SETTINGS | {"retry_initial_s": 0.5, "retry_max_s": 8.0})
    outbox = AsyncOutbox(Outbox(tmp_path / "outbox.sqlite3", sinks=("influx",)))
    sink = InfluxSink(config, outbox, rng=random.Random(7))
    try:
        same_draws = random.Random(7)
        for attempt in range(10):
            assert sink._backoff(attempt, None) == Backoff(0.5, 8.0).delay(attempt, same_draws)
    finally:
        sink.stop()
        await sink.run()  # already stopped: only closes the client
        await outbox.close()


async def test_retry_after_is_a_floor_capped_at_retry_max_s(tmp_path: Path) -> None:
    config = InfluxConfig.from_mapping(SETTINGS | {"retry_initial_s": 0.5, "retry_max_s": 8.0})
    outbox = AsyncOutbox(Outbox(tmp_path / "outbox.sqlite3", sinks=("influx",)))
    sink = InfluxSink(config, outbox, rng=random.Random(3))
    try:
        assert all(sink._backoff(0, 3.0) == 3.0 for _ in range(50))  # the jittered wait is at most 0.5 s
        assert all(3.0 <= sink._backoff(3, 3.0) <= 4.0 for _ in range(50))  # a longer draw is kept
        assert sink._backoff(0, 3600.0) == 8.0  # a server asking for an hour waits retry_max_s
    finally:
        sink.stop()
        await sink.run()
        await outbox.close()
