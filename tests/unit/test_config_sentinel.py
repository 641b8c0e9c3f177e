"""`[backend] mode = "sentinel"`: what it needs, and errors that name file and key."""

from __future__ import annotations

from tests.unit.test_config import Site, site  # noqa: F401 - the fixture


def sentinel(site: Site, **backend: object) -> None:  # noqa: F811
    b = site.doc["backend"]
    b.pop("address", None)
    b.pop("port", None)
    b.update({"mode": "sentinel", "sentinels": ["10.0.0.5:26379", "[::1]:26380"],
              "master_name": "phi"})
    b.update(backend)


def test_sentinel_mode_loads_without_an_address(site: Site) -> None:  # noqa: F811
    sentinel(site)
    cfg = site.load().backend
    assert cfg.mode == "sentinel" and cfg.master_name == "phi"
    assert cfg.sentinels == (("10.0.0.5", 26379), ("::1", 26380))


def test_sentinel_mode_needs_sentinels_and_a_name(site: Site) -> None:  # noqa: F811
    sentinel(site, sentinels=[])
    site.doc["backend"].pop("master_name")
    problems = site.problems()
    assert any("sentinels" in p and "must list" in p for p in problems), problems
    assert any("master_name" in p and "sentinel monitor" in p for p in problems), problems


def test_a_bad_sentinel_address_is_named(site: Site) -> None:  # noqa: F811
    sentinel(site, sentinels=["10.0.0.5"])
    assert '"10.0.0.5" is not host:port' in site.problem()


def test_sentinel_keys_outside_sentinel_mode_are_refused(site: Site) -> None:  # noqa: F811
    site.doc["backend"]["master_name"] = "phi"
    assert 'only used with mode = "sentinel"' in site.problem()
