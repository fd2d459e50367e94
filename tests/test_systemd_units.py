"""`hotlab install-units` writes units that systemd itself accepts, with the settings a lab service needs.

`systemd-analyze verify` parses the files as systemd would load them and reports unknown directives,
bad values and an ExecStart= that does not exist; it does not need a running systemd, nor the service
user (User= is resolved only when the service starts). The units run this environment's `hotlab`,
which exists, so nothing is stubbed. Skipped only where systemd-analyze is not installed.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hotlab.controller.cli.main import main
from hotlab.controller.deploy.systemd import hidden_paths

HOTLAB = Path(sys.executable).parent / "hotlab"
UNITS = ("hotlab.service", "hotlab-web.service")


def directives(text: str) -> dict[str, list[str]]:
    """`Section.Key` -> every value it is given, in order (a key such as DeviceAllow= may repeat)."""
    found: dict[str, list[str]] = {}
    section = ""
    for line in text.splitlines():
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif line and not line.startswith("#"):
            key, _, value = line.partition("=")
            found.setdefault(f"{section}.{key}", []).append(value)
    return found


def install(out: Path, *options: str) -> dict[str, dict[str, list[str]]]:
    assert main(["install-units", "--out", str(out), *options]) == 0
    return {name: directives((out / name).read_text()) for name in UNITS}


def verify(*paths: Path) -> str:
    """What `systemd-analyze verify` says about our units (nothing at all when they are clean)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed")
    run = subprocess.run(
        [analyze, "verify", "--man=no", "--generators=no", *map(str, paths)], capture_output=True, text=True, timeout=60
    )
    ours = [line for line in (run.stdout + run.stderr).splitlines() if "hotlab" in line]
    assert run.returncode == 0, run.stdout + run.stderr
    return "\n".join(ours)


def test_systemd_accepts_both_units_without_a_single_warning(tmp_path: Path) -> None:
    install(tmp_path)
    assert verify(*(tmp_path / name for name in UNITS)) == ""


def test_the_verifier_would_catch_a_misspelt_directive(tmp_path: Path) -> None:
    install(tmp_path)
    unit = tmp_path / "hotlab.service"
    unit.write_text(unit.read_text().replace("ProtectHome=", "ProtectHomes="))
    assert "Unknown key 'ProtectHomes'" in verify(unit)


def test_the_controller_runs_as_its_user_with_serial_ports_and_nothing_else(tmp_path: Path) -> None:
    unit = install(tmp_path)["hotlab.service"]
    assert unit["Service.ExecStart"] == [f"{HOTLAB} run --config /etc/hotlab/lab.toml"]
    assert Path(unit["Service.ExecStart"][0].split()[0]).is_file()
    assert unit["Service.Type"] == ["exec"]  # `hotlab run` sends no sd_notify READY=1
    assert (unit["Service.User"], unit["Service.Group"]) == (["hotlab"], ["hotlab"])
    assert unit["Service.SupplementaryGroups"] == ["dialout"]
    assert unit["Service.StateDirectory"] == unit["Service.ConfigurationDirectory"] == ["hotlab"]
    assert unit["Service.Restart"] == ["on-failure"] and float(unit["Service.RestartSec"][0]) > 0
    assert unit["Service.RestartPreventExitStatus"] == ["2"]  # a bad config does not restart in a loop
    assert unit["Service.KillSignal"] == ["SIGTERM"]
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "ProtectKernelTunables", "ProtectControlGroups"):
        assert unit[f"Service.{key}"] == ["yes"], key
    assert unit["Service.ProtectSystem"] == ["strict"]
    assert unit["Service.CapabilityBoundingSet"] == [""]  # an empty set: no capability at all
    assert set(unit["Service.RestrictAddressFamilies"][0].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    # Serial ports stay visible, and only they besides the pseudo devices: /dev/ttyS*, ttyUSB*, ttyACM*.
    assert unit["Service.PrivateDevices"] == ["no"] and unit["Service.DevicePolicy"] == ["closed"]
    assert {"char-ttyS rw", "char-ttyUSB rw", "char-ttyACM rw"} <= set(unit["Service.DeviceAllow"])
    assert unit["Service.Environment"] == ["HOTLAB_AUDIT_KEY_FILE=/etc/hotlab/audit.key"]
    assert unit["Install.WantedBy"] == ["multi-user.target"]


def test_the_web_panel_has_no_devices_and_stops_on_the_signal_it_handles(tmp_path: Path) -> None:
    unit = install(tmp_path, "--web-host", "0.0.0.0", "--web-port", "8443")["hotlab-web.service"]
    assert unit["Service.ExecStart"] == [f"{HOTLAB} web --config /etc/hotlab/lab.toml --host 0.0.0.0 --port 8443"]
    assert unit["Service.PrivateDevices"] == ["yes"] and "Service.DeviceAllow" not in unit
    assert "Service.SupplementaryGroups" not in unit
    assert unit["Service.KillSignal"] == ["SIGTERM"]  # controller/cli/web.py ends gracefully on it
    assert unit["Service.CapabilityBoundingSet"] == [""] and "Service.AmbientCapabilities" not in unit


def test_a_web_port_below_1024_gets_only_the_capability_to_bind_it(tmp_path: Path) -> None:
    unit = install(tmp_path, "--web-port", "443")["hotlab-web.service"]
    assert unit["Service.AmbientCapabilities"] == unit["Service.CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    assert verify(tmp_path / "hotlab-web.service") == ""


@pytest.mark.parametrize("drain_s", [10.0, 60.0])
def test_the_stop_timeout_outlasts_the_controllers_longest_graceful_stop(tmp_path: Path, drain_s: float) -> None:
    # controller/service.py stops in turn: the audit anchor (drain), the devices (drain + 2 s), the sinks'
    # backlog (drain) and the sinks (drain + 15 s). systemd must not SIGKILL it before all four are over.
    longest_s = drain_s + (drain_s + 2) + drain_s + (drain_s + 15)
    unit = install(tmp_path, "--drain-timeout", str(drain_s))["hotlab.service"]
    assert int(unit["Service.TimeoutStopSec"][0]) > longest_s


def test_paths_with_spaces_and_percent_signs_reach_the_command_line_intact(tmp_path: Path) -> None:
    # systemd.service(5): a word with a space is quoted; "%" starts a specifier, so a literal one is "%%".
    config = "/etc/hot lab/100%/lab.toml"
    unit = install(tmp_path, "--config", config)["hotlab.service"]
    assert unit["Service.ExecStart"] == [f'{HOTLAB} run --config "/etc/hot lab/100%%/lab.toml"']
    assert verify(tmp_path / "hotlab.service") == ""


def test_a_dry_run_prints_both_units(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["install-units", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "# --- hotlab.service\n" in out and "# --- hotlab-web.service\n" in out
    assert f"ExecStart={HOTLAB} run" in out


def test_the_next_steps_name_the_user_the_key_and_systemctl(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    install(tmp_path, "--user", "lab-svc")
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'hotlab.service'}" in out
    assert "useradd --system --user-group --groups dialout --home-dir /var/lib/hotlab" in out and "lab-svc" in out
    assert "openssl rand -hex 32 | install -m 0400 -o lab-svc -g lab-svc /dev/stdin /etc/hotlab/audit.key" in out
    assert f"sudo -u lab-svc env HOTLAB_AUDIT_KEY_FILE=/etc/hotlab/audit.key {HOTLAB} doctor --config" in out
    assert "systemctl enable --now hotlab.service hotlab-web.service" in out


def test_bad_options_are_refused_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["install-units", "--out", str(tmp_path), "--user", "Bad User"]) == 2
    assert main(["install-units", "--out", str(tmp_path), "--web-port", "70000"]) == 2
    err = capsys.readouterr().err
    assert "hotlab install-units: error: user 'Bad User' is not a system user name" in err
    assert "web port 70000 is not a TCP port" in err
    assert not list(tmp_path.iterdir())


def test_an_installation_under_a_home_directory_is_named_as_hidden_by_protecthome() -> None:
    assert hidden_paths([Path("/home/ada/venv/bin/hotlab"), Path("/root/.pyenv"), Path("/run/user/1000/x")]) == [
        Path("/home/ada/venv/bin/hotlab"),
        Path("/root/.pyenv"),
        Path("/run/user/1000/x"),
    ]
    assert hidden_paths([Path("/opt/hotlab/bin/hotlab"), Path("/homestead/bin/hotlab"), Path("/usr")]) == []
