"""Fuzzing the config loader: whatever a technician (or a broken editor) writes, the answer is a ConfigError.

`hotlab run` turns ConfigError into exit code 2 and one precise line; any other exception
would be a traceback on the operator's screen and, worse, could mean a bad value was
accepted. Three generators:

* TOML-ish text assembled from the real keys, sections and plausible/implausible values
  (most of it parses as TOML, so validation is exercised, not just the TOML parser);
* arbitrary bytes (encoding and syntax errors);
* a complete valid document (the example plus every optional section) with one value
  replaced by a random TOML value, one key deleted or one unknown key added.
"""

from __future__ import annotations

import copy
import datetime as dt
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hotlab.controller.config import ConfigError, LabConfig, load_config, parse_config

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "lab.toml"
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

SECTIONS = [
    "site",
    "service",
    "outbox",
    "history",
    "mqtt",
    "mqtt.tls",
    "influx",
    "qc.sources.s1",
    "qc.devices.d1",
    "qc.generators.g1",
    "commands",
    "web",
    "nonsense",
]
KEYS = [
    "name",
    "station",
    "family",
    "transport",
    "poll_interval_s",
    "timeout_s",
    "nuclide",
    "options",
    "url",
    "host",
    "port",
    "device_id",
    "word_order",
    "modbus",
    "baudrate",
    "path",
    "max_bytes",
    "warn_fraction",
    "enabled",
    "drain_timeout_s",
    "status_interval_s",
    "backoff_initial_s",
    "backoff_max_s",
    "state_dir",
    "client_id",
    "keepalive_s",
    "username",
    "password",
    "password_env",
    "password_file",
    "inflight_window",
    "connect_timeout_s",
    "ca_file",
    "cert_file",
    "key_file",
    "insecure_skip_hostname_check",
    "token",
    "token_env",
    "token_file",
    "org",
    "bucket",
    "database",
    "retention_policy",
    "batch_size",
    "flush_interval_s",
    "activity",
    "reference_time",
    "check_source",
    "parent",
    "calibration_time",
    "pol_interval_s",
    "key",
    "key_env",
    "key_file",
    "sender",
    "mqtt_username",
    "mqtt_password_env",
    "accept_token_commands",
]
LITERALS = [
    '"vik202"',
    '"crc15r"',
    '"elution_station"',
    '"capintec"',
    '"socket://127.0.0.1:4001"',
    '"/dev/ttyUSB0"',
    '"socket://:0"',
    '"rfc2217://host:99999"',
    '"Tc-99m"',
    '"Tc99m"',
    '"Xx-999"',
    '"740 MBq"',
    '"-1 GBq"',
    '"http://127.0.0.1:8086"',
    '"ftp://x"',
    '"ABCD"',
    '"tcp"',
    '"rtu"',
    '""',
    '" "',
    '"2025-01-15T12:00:00Z"',
    '"yesterday"',
    "0",
    "-1",
    "1",
    "65536",
    "1e308",
    "-0.0",
    "nan",
    "inf",
    "-inf",
    "9223372036854775807",
    "true",
    "false",
    "[]",
    '[1, "a"]',
    "{}",
    '{ url = "/dev/ttyS0" }',
    '{ modbus = "tcp", host = "h" }',
    "2025-01-01T00:00:00Z",
    "2025-01-01",
    "12:00:00",
    '"../../etc/passwd"',
]


@st.composite
def tomlish_documents(draw: st.DrawFn) -> str:
    lines: list[str] = []
    for _ in range(draw(st.integers(0, 12))):
        shape = draw(st.sampled_from(["section", "device", "pair", "pair", "pair", "junk"]))
        if shape == "section":
            lines.append(f"[{draw(st.sampled_from(SECTIONS))}]")
        elif shape == "device":
            lines.append(draw(st.sampled_from(["[[device]]", "[[command_sender]]", "[[operator]]"])))
        elif shape == "pair":
            lines.append(f"{draw(st.sampled_from(KEYS))} = {draw(st.sampled_from(LITERALS))}")
        else:
            lines.append(draw(st.text(max_size=30)))
    return "\n".join(lines) + "\n"


#: NUL is left out of random text: test_a_nul_byte_in_a_file_name_is_a_config_error covers it in every
#: path-like key, deterministically.
_TEXT = st.text(st.characters(blacklist_characters="\x00"), max_size=40)
toml_scalars = st.one_of(
    _TEXT,
    st.sampled_from(
        [
            "vik202",
            "elution_station",
            "socket://127.0.0.1:1",
            "/dev/null",
            "Tc-99m",
            "740 MBq",
            "http://127.0.0.1:1",
            "ABCD",
            "tcp",
            "rtu",
            "HOME",
            "../nowhere",
        ]
    ),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.datetimes(timezones=st.one_of(st.none(), st.just(dt.UTC))),
    st.dates(),
    st.times(),
)
toml_values = st.recursive(
    toml_scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=12).filter(lambda k: "\x00" not in k), inner, max_size=3)
    ),
    max_leaves=6,
)


def paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every key path into the document (tables by key, arrays by index), the root excluded."""
    children: Any = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in children:
        yield prefix + (key,)
        yield from paths(child, prefix + (key,))


def parent_of(document: dict[str, Any], path: tuple[Any, ...]) -> Any:
    node: Any = document
    for key in path[:-1]:
        node = node[key]
    return node


@pytest.fixture(scope="module")
def valid_document(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    """The example, plus every optional section with its secret and TLS files present."""
    base = tmp_path_factory.mktemp("fuzz-config")
    for name in ("ca.crt", "client.crt", "client.key", "mqtt-password", "influx-token", "panel-password"):
        (base / name).write_text("secret-or-pem\n")
    (base / "panel.key").write_text("0f" * 32 + "\n")
    (base / "tool.key").write_text("1e" * 32 + "\n")
    document = tomllib.loads(EXAMPLE.read_text())
    document["mqtt"] |= {
        "username": "hotlab",
        "password_file": "mqtt-password",
        "tls": {"ca_file": "ca.crt", "cert_file": "client.crt", "key_file": "client.key"},
    }
    document["influx"] = {"url": "http://127.0.0.1:8086", "token_file": "influx-token", "org": "o", "bucket": "b"}
    document["command_sender"] = [{"name": "panel", "key_file": "panel.key"}, {"name": "tool", "key_file": "tool.key"}]
    document["web"] = {"sender": "panel", "mqtt_username": "hotlab-panel", "mqtt_password_file": "panel-password"}
    document["device"][1]["transport"] = {"url": "socket://127.0.0.1:4001"}
    document["device"][3]["options"] = {"read_command": "DS\r", "settings": {"baudrate": 19200}}
    parse_config(document, file="valid.toml", base_dir=base)  # the starting point really is valid
    return document, base


def load_or_config_error(path: Path) -> LabConfig | None:
    try:
        return load_config(path)
    except ConfigError as exc:
        assert str(exc).startswith(f"{path}: "), f"message does not name the file: {exc}"
        return None


@FUZZ
@given(text=tomlish_documents())
def test_tomlish_text_gives_a_config_or_a_config_error(text: str, tmp_path: Path) -> None:
    path = tmp_path / "fuzz.toml"
    path.write_text(text, encoding="utf-8")
    load_or_config_error(path)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200))
def test_arbitrary_bytes_give_a_config_error(raw: bytes, tmp_path: Path) -> None:
    path = tmp_path / "fuzz.toml"
    path.write_bytes(b"[site]\nname = " + raw)
    load_or_config_error(path)


@FUZZ
@given(data=st.data())
def test_one_random_change_to_a_valid_document_gives_a_config_or_a_config_error(
    data: st.DataObject, valid_document: tuple[dict[str, Any], Path]
) -> None:
    original, base = valid_document
    document = copy.deepcopy(original)
    path = data.draw(st.sampled_from(sorted(paths(document), key=repr)), label="path")
    parent = parent_of(document, path)
    action = data.draw(st.sampled_from(["replace", "replace", "delete", "add"]), label="action")
    if action == "replace":
        parent[path[-1]] = data.draw(toml_values, label="value")
    elif action == "delete":
        del parent[path[-1]]
    elif isinstance(parent, dict):
        parent[data.draw(st.text(min_size=1, max_size=12), label="new key")] = data.draw(toml_values, label="value")
    else:
        parent.append(data.draw(toml_values, label="value"))
    try:
        config = parse_config(document, file="fuzz.toml", base_dir=base)
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.toml: "), f"message does not name the file: {exc}"
        return
    # Accepted: then what was accepted must be usable as the types promise.
    assert isinstance(config.site, str)
    for device in config.devices:
        assert device.poll_interval_s >= 0 and 0 < device.timeout_s <= 300


def test_the_fuzzer_reaches_validation_not_just_the_parser(tmp_path: Path) -> None:
    """Guard against a generator that only ever produces TOML syntax errors."""
    path = tmp_path / "fuzz.toml"
    path.write_text(
        '[site]\nname = "lab"\n[[device]]\nname = "c"\nstation = "s"\nfamily = "vik202"\n'
        'transport = "socket://127.0.0.1:4001"\npol_interval_s = 1\n'
    )
    with pytest.raises(ConfigError, match=r"device\[0\]\.pol_interval_s: unknown key \(did you mean 'poll_interval_s'"):
        load_config(path)


AWKWARD_STRINGS = [
    "",
    " ",
    "\t\n",
    pytest.param("x" * 5000, id="'x'*5000"),
    "\U0001f9ea",
    "..",
    "~",
    "/",
    "-1",
    "nan",
    "socket://",
    "\\\\?\\C:",
]


def string_paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    for path in paths(node, prefix):
        if isinstance(parent_of(node, path)[path[-1]], str):
            yield path


@pytest.mark.parametrize("awkward", AWKWARD_STRINGS, ids=repr)
def test_every_string_value_replaced_by_an_awkward_string(
    awkward: str, valid_document: tuple[dict[str, Any], Path]
) -> None:
    """Exhaustive where random sampling is thin: each string in the document, one at a time."""
    original, base = valid_document
    checked = 0
    for path in string_paths(original):
        document = copy.deepcopy(original)
        parent_of(document, path)[path[-1]] = awkward
        try:
            parse_config(document, file="fuzz.toml", base_dir=base)
        except ConfigError:
            pass
        checked += 1
    assert checked >= 30


#: A NUL byte cannot be in a file name (open() raises ValueError, not OSError). The loader must
#: refuse it itself; otherwise `hotlab run` would stop later with a ValueError traceback and
#: exit 1 (the outbox lock's open() catches only OSError) instead of exit 2 and a config error.


@pytest.mark.parametrize(
    "section",
    [
        pytest.param({"mqtt": {"username": "u", "password_file": "secret\x00"}}, id="mqtt.password_file"),
        pytest.param(
            {"influx": {"url": "http://127.0.0.1:1", "org": "o", "bucket": "b", "token_file": "t\x00"}},
            id="influx.token_file",
        ),
        pytest.param({"outbox": {"path": "outbox\x00.sqlite3"}}, id="outbox.path"),
        pytest.param({"history": {"path": "history\x00.sqlite3"}}, id="history.path"),
        pytest.param({"service": {"state_dir": "var\x00"}}, id="service.state_dir"),
        pytest.param({"mqtt": {"tls": {"ca_file": "ca\x00.crt"}}}, id="mqtt.tls.ca_file"),
        pytest.param({"command_sender": [{"name": "panel", "key_file": "key\x00"}]}, id="command_sender.key_file"),
        pytest.param({"web": {"mqtt_username": "u", "mqtt_password_file": "p\x00"}}, id="web.mqtt_password_file"),
    ],
)
def test_a_nul_byte_in_a_file_name_is_a_config_error(section: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^nul\.toml: "):
        parse_config({"site": {"name": "lab"}} | section, file="nul.toml", base_dir=tmp_path)
