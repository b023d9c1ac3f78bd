"""Allowed-IP validation, rule edits and config rendering: pure functions, no nginx, no Triton."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jinja2
import pytest

from backends.errors import InvalidArgumentError
from builder.serve.proxy import TEMPLATES, AccessRules, ProxyLayout, StateDir, parse_entry, render_config
from builder.serve.serving import access_rules


@pytest.mark.parametrize("entry, canonical", [
    ("127.0.0.1", "127.0.0.1"),
    ("127.0.0.1/32", "127.0.0.1"),
    ("10.0.0.0/8", "10.0.0.0/8"),
    ("0.0.0.0/0", "0.0.0.0/0"),
    (" 203.0.113.0/24 ", "203.0.113.0/24"),
    ("::1", "::1"),
    ("2001:DB8::/32", "2001:db8::/32"),
    ("2001:db8:0:0::7/128", "2001:db8::7"),
])
def test_valid_entries_are_canonical(entry, canonical):
    assert parse_entry(entry) == canonical


@pytest.mark.parametrize("entry, says", [
    ("10.0.0.1/8", "host bits set: write the network 10.0.0.0/8 or the single address 10.0.0.1"),
    ("2001:db8::1/32", "host bits set: write the network 2001:db8::/32"),
    ("garbage", "'garbage' is not an IPv4/IPv6 address or CIDR block: write e.g."),
    ("1.2.3.4/33", "is not an IPv4/IPv6 address or CIDR block"),
    ("256.1.1.1", "is not an IPv4/IPv6 address or CIDR block"),
    ("10/8", "is not an IPv4/IPv6 address or CIDR block"),
    ("", "empty allowed IP entry: give an address"),
    ("   ", "empty allowed IP entry"),
    ("fe80::1%eth0", "IPv6 zone id: drop the %eth0 part"),
    ("::ffff:1.2.3.4", "IPv4-mapped IPv6 address, which nginx compares as IPv4: write 1.2.3.4 instead"),
])
def test_invalid_entries_name_the_entry_and_the_fix(entry, says):
    with pytest.raises(InvalidArgumentError, match=None) as e:
        parse_entry(entry)
    assert says in str(e.value)
    assert "\n" not in str(e.value)


def test_trusted_proxies_are_named_as_such():
    with pytest.raises(InvalidArgumentError, match="trusted proxy 'nope'"):
        AccessRules.parse([], ["nope"])


def test_rule_edits_validate_dedupe_and_match_canonically():
    rules = AccessRules.parse(["127.0.0.1/32"], ["10.1.0.0/16"])
    assert rules.adding(["127.0.0.2", "127.0.0.1"]).allowed_ips == ("127.0.0.1", "127.0.0.2")
    assert rules.adding(["127.0.0.2"]).removing(["127.0.0.1/32"]).allowed_ips == ("127.0.0.2",)
    assert rules.setting(["::1"]) == AccessRules(("::1",), ("10.1.0.0/16",))
    with pytest.raises(InvalidArgumentError, match="127.0.0.9 not in the allowed IPs"):
        rules.removing(["127.0.0.9"])
    with pytest.raises(InvalidArgumentError, match="'bad'"):
        rules.adding(["127.0.0.3", "bad"])
    assert rules.allowed_ips == ("127.0.0.1",)  # frozen: a failed edit changes nothing


LAYOUT = ProxyLayout(8000, 8001, "127.0.0.1:40000", "127.0.0.1:40001", ("0.0.0.0", "::"))


def _render(tmp_path, rules: AccessRules) -> str:
    return render_config(StateDir(tmp_path), LAYOUT, rules)


def test_empty_list_renders_no_access_rules(tmp_path):
    conf = _render(tmp_path, AccessRules())
    directives = [line.strip() for line in conf.splitlines() if not line.strip().startswith("#")]
    assert not [d for d in directives if d.startswith(("allow ", "deny "))]
    assert "set_real_ip_from" not in conf
    assert "listen 0.0.0.0:8000;" in conf and "listen [::]:8001 http2;" in conf
    assert "grpc_pass grpc://triton_grpc;" in conf and "server 127.0.0.1:40001;" in conf
    assert "{{" not in conf and "{%" not in conf


@pytest.mark.parametrize("layout", [LAYOUT, dataclasses.replace(LAYOUT, gateway="127.0.0.1:9", keys_required=True)],
                         ids=["public", "keys"])
def test_rules_guard_every_route_and_realip_trusts_only_proxies(tmp_path, layout):
    conf = render_config(StateDir(tmp_path), layout, AccessRules.parse(["10.0.0.0/8", "2001:db8::/32"],
                                                                       ["192.0.2.10"]))
    block = "allow 10.0.0.0/8;\n            allow 2001:db8::/32;\n            deny all;"
    routes = [loc for loc in conf.split("location ")[1:] if "proxy_pass http://gateway;" in loc
              or "proxy_pass http://triton_http;" in loc or "grpc_pass" in loc]
    # HTTP: Triton, its health checks (and with a gateway: /v1, the /v2 inference relay and the
    # readiness check that asks it too); gRPC: calls and health checks
    assert len(routes) == (7 if layout.gateway else 4) and all(block in loc for loc in routes)
    assert "set_real_ip_from 192.0.2.10;" in conf
    assert "real_ip_header X-Forwarded-For;" in conf and "real_ip_recursive on;" in conf
    assert str(tmp_path) in conf and "/var/log/nginx" not in conf and "/run/" not in conf


def test_workers_drop_to_nobody_only_when_the_master_is_root(tmp_path, monkeypatch):
    monkeypatch.setattr("os.geteuid", lambda: 0)
    assert "\nuser nobody " in _render(tmp_path, AccessRules())
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    assert "\nuser " not in _render(tmp_path, AccessRules())


def test_template_fails_on_a_missing_value():
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), undefined=jinja2.StrictUndefined)
    with pytest.raises(jinja2.UndefinedError):
        env.get_template("nginx.conf.j2").render(worker_processes=1)


DEPLOYMENT = """
[serving]
allowed_ips = ["203.0.113.0/24"]
trusted_proxies = ["10.0.0.5"]

[[models]]
name = "tiny"
"""


def test_serve_rules_come_from_file_and_options_else_the_saved_ones(tmp_path):
    state = StateDir(tmp_path / "state")
    state.prepare()
    deployment = tmp_path / "deployment.toml"
    deployment.write_text(DEPLOYMENT)
    rules = access_rules(state, deployment, ["127.0.0.1"], [])
    assert rules == AccessRules(("203.0.113.0/24", "127.0.0.1"), ("10.0.0.5",))
    assert access_rules(state, None, [], []) == AccessRules()
    state.write_rules(rules)  # a restart without a list keeps the saved one: never silently opens up
    assert access_rules(state, None, [], []) == rules
    assert access_rules(state, None, ["::1"], []).allowed_ips == ("::1",)


def test_deployment_file_entries_are_validated(tmp_path):
    deployment = tmp_path / "deployment.toml"
    deployment.write_text(DEPLOYMENT.replace("203.0.113.0/24", "203.0.113.1/24"))
    with pytest.raises(InvalidArgumentError, match="host bits set"):
        access_rules(StateDir(tmp_path / "state"), deployment, [], [])


def test_a_relative_state_dir_renders_absolute_paths(tmp_path, monkeypatch):
    """serve --state-dir demo-output/state: nginx gets absolute paths (it reads them from its prefix)."""
    monkeypatch.chdir(tmp_path)
    state = StateDir(Path("demo-output/state"))
    assert state.path == tmp_path / "demo-output" / "state"
    conf = render_config(state, LAYOUT, AccessRules())
    assert f"error_log {tmp_path}/demo-output/state/logs/error.log" in conf
