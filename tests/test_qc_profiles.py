"""Jurisdiction profiles: every limit of every profile has a source, overrides apply on top, unknown profiles refused."""

from __future__ import annotations

import pytest

from hotlab.controller.config_table import ConfigError, ConfigTable
from hotlab.controller.qc.limits import DEFAULT_PROFILE, PROFILE_LIMITS, PROFILES, load_limits


def test_every_profile_sets_every_test_with_a_source() -> None:
    tests = set(PROFILE_LIMITS[DEFAULT_PROFILE])
    assert {"lu177m_ratio", "sr82_breakthrough", "sr85_breakthrough", "mo99_breakthrough"} <= tests
    for profile in PROFILES:
        assert set(PROFILE_LIMITS[profile]) == tests, profile
        for test, limit in PROFILE_LIMITS[profile].items():
            assert len(limit.source) > 20, (profile, test)


def test_us_nrc_limits_are_10_cfr_35_204() -> None:
    limits = load_limits(profile="us-nrc")
    assert (limits["mo99_breakthrough"].fail, limits["mo99_breakthrough"].unit) == (0.15, "kBq/MBq")
    assert limits["sr82_breakthrough"].fail == 0.02 and limits["sr85_breakthrough"].fail == 0.2
    assert "35.204(a)" in limits["sr82_breakthrough"].source and "35.204(c)" in limits["sr85_breakthrough"].source
    # No NRC rule for Ge-68: the source says so and names what is applied instead.
    ge68 = limits["ge68_breakthrough"].source
    assert ge68.startswith("us-nrc: no NRC regulation") and "applied instead: Ph. Eur. 2464" in ge68


def test_ph_eur_mo99_is_0_1_percent_of_total_in_kbq_per_mbq_and_says_what_was_not_checked() -> None:
    # 0.1 % of total radioactivity: Mo / (Mo + Tc) = 1e-3 -> Mo / Tc = 1e-3 / (1 - 1e-3) = 1.001 kBq/MBq;
    # 1.0 kBq/MBq is the limit in the unit every profile judges in (never looser than the text).
    mo99 = load_limits(profile="ph-eur")["mo99_breakthrough"]
    assert mo99.fail == 1.0 and mo99.fail <= 1e-3 / (1 - 1e-3) * 1e3
    assert "0124" in mo99.source and "0283" in mo99.source and "NOT checked" in mo99.source
    assert load_limits(profile="ph-eur")["ge68_breakthrough"].source.startswith("Ph. Eur. 2464")


def test_chp_applies_the_strictest_checked_mo99_limit_and_says_why() -> None:
    chp = load_limits(profile="chp")
    strictest = min(PROFILE_LIMITS[p]["mo99_breakthrough"].fail or 0 for p in ("us-nrc", "ph-eur"))
    assert chp["mo99_breakthrough"].fail == strictest == 0.15
    assert "could not be checked" in chp["mo99_breakthrough"].source
    assert all("could not be checked" in chp[t].source for t in ("constancy", "lu177m_ratio", "ga68_half_life"))


def test_overrides_apply_on_top_of_the_profile() -> None:
    limits = load_limits({"mo99_breakthrough": {"fail": 0.5}}, profile="ph-eur")
    assert limits["mo99_breakthrough"].fail == 0.5
    assert limits["mo99_breakthrough"].source.startswith("site configuration (default: Ph. Eur. 0124")
    assert limits["ge68_breakthrough"] == PROFILE_LIMITS["ph-eur"]["ge68_breakthrough"]


def test_an_unknown_profile_is_a_config_error_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"^qc\.profile: unknown profile 'eu'; known: us-nrc, ph-eur, chp$"):
        load_limits(profile="eu")
    with pytest.raises(ConfigError, match=r"^lab\.toml: qc\.profile: unknown profile"):
        load_limits(ConfigTable({}, "qc.limits", file="lab.toml"), profile="eu")
