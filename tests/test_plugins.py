"""The plug-in API: agents named in ``CHAT_AGENTS`` and agents and tools of installed
packages (entry points), with clear start-up errors, run behind a real gateway."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from agents.errors import PluginError
from agents.registry import (
    AGENTS_GROUP,
    TOOLS_GROUP,
    build_agents,
    build_tools,
    parse_agent_headers,
    parse_agent_specs,
)
from agents.tools import builtin_tools
from server.settings import Settings
from tests.support import (
    ROOT,
    SECRET,
    check_run_invariants,
    run_server,
    spawn_server,
    ws_client,
)

EXAMPLE = ROOT / "tests" / "plugin_example"


def settings(**changes: Any) -> Settings:
    return Settings(jwt_secret=SECRET, db_url="sqlite:///:memory:", **changes)


def of_type(events: list[dict[str, Any]], type: str) -> list[dict[str, Any]]:
    return [e["data"] for e in events if e["type"] == type]


def test_specs_and_headers_are_parsed() -> None:
    specs = parse_agent_specs(["a=pkg.mod:Agent", " b = https://agents.example/run "])
    assert [(s.name, s.target, s.is_url) for s in specs] == [
        ("a", "pkg.mod:Agent", False),
        ("b", "https://agents.example/run", True),
    ]
    for bad, message in [
        ("nothing", "is not name=module:attribute or name=URL"),
        ("a=", "is not name=module:attribute or name=URL"),
        ("a=pkg.mod", "neither module:attribute nor a URL"),
        ("a b=pkg:x", "must be 1-64 letters"),
    ]:
        with pytest.raises(PluginError, match=message):
            parse_agent_specs([bad])
    headers = parse_agent_headers(["r.Authorization=Bearer a=b", "r.X-Team=ops"])
    assert headers == {"r": {"Authorization": "Bearer a=b", "X-Team": "ops"}}
    with pytest.raises(PluginError) as caught:
        parse_agent_headers(["Authorization=Bearer s3cret-token"])
    assert "s3cret-token" not in str(caught.value)


def test_instances_classes_and_factories_become_agents_under_their_configured_names() -> None:
    registry = build_agents(
        settings(
            agents=(
                "greeter=tests.plugin_agents:Greeter",
                "hello=tests.plugin_agents:greeter_instance",
                "made=tests.plugin_agents:make_plain",
                "plain=tests.plugin_agents:Plain",
            ),
            entry_points="off",
        )
    )
    assert registry.names() == ["demo", "greeter", "hello", "load", "made", "plain"]
    assert registry.get("hello").name == "hello"
    assert registry.get("made").description == "Answers plainly."
    assert registry.get(None).name == "demo"
    chosen = build_agents(
        settings(agents=("greeter=tests.plugin_agents:Greeter",), default_agent="greeter")
    )
    assert chosen.default == "greeter"


@pytest.mark.parametrize(
    ("agents", "message"),
    [
        (("x=tests.no_such_module:Agent",), r"'tests.no_such_module:Agent' does not import"),
        (("x=tests.plugin_agents:Missing",), r"has no attribute 'Missing'"),
        (("x=tests.plugin_agents:not_an_agent",), r"NotAnAgent is not an agent"),
        (("x=tests.plugin_agents:broken_factory",), r"creating it failed: RuntimeError"),
        (("demo=tests.plugin_agents:Plain",), r"'demo' is taken twice: by the built-in agents"),
        (
            ("x=tests.plugin_agents:Plain", "x=tests.plugin_agents:Greeter"),
            r"'x' is taken twice: by CHAT_AGENTS and by CHAT_AGENTS",
        ),
    ],
    ids=["no-module", "no-attribute", "not-an-agent", "factory-fails", "builtin-name", "twice"],
)
def test_a_bad_spec_is_a_clear_error_at_start_up(agents: tuple[str, ...], message: str) -> None:
    with pytest.raises(PluginError, match=message):
        build_agents(settings(agents=agents))


def test_a_default_agent_that_does_not_exist_and_stray_headers_are_errors() -> None:
    with pytest.raises(PluginError, match=r"CHAT_DEFAULT_AGENT 'nope' is not an agent"):
        build_agents(settings(default_agent="nope"))
    with pytest.raises(PluginError, match=r"names agents that are not AG-UI URLs: demo"):
        build_agents(settings(agent_headers=("demo.Authorization=Bearer x",)))


def test_the_server_refuses_to_start_with_a_bad_spec(tmp_path: Path) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(ROOT),
        "CHAT_JWT_SECRET": SECRET,
        "CHAT_DB_URL": "sqlite:///:memory:",
        "CHAT_AGENTS": "support=tests.plugin_agents:not_an_agent",
    }
    done = subprocess.run(
        [sys.executable, "-m", "server", "--port", "1"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done
    assert "agent 'support' (CHAT_AGENTS): NotAnAgent is not an agent" in done.stderr


async def test_configured_agents_run_behind_a_real_gateway(user: str) -> None:
    agents = ("greeter=tests.plugin_agents:Greeter", "made=tests.plugin_agents:make_plain")
    with run_server(agents=agents) as server:
        async with ws_client(server, user) as client:
            first = await client.run("hi", agent="greeter")
            thread = first[0]["thread_id"]
            again = await client.run("hi again", agent="greeter", thread_id=thread)
            made = await client.run("what is 6 * 7", agent="made")
    for events in (first, again, made):
        check_run_invariants(events)
        assert events[-1]["data"]["status"] == "completed"
    assert first[1]["data"] == {"agent": "greeter"}
    assert of_type(first, "agent_thinking") == [{"text": "Greeting.", "kind": "status"}]
    assert first[-2]["data"]["content"] == f"Hello {user}, after 0 messages."
    assert again[-2]["data"]["content"] == f"Hello {user}, after 2 messages."
    assert made[1]["data"] == {"agent": "made"}
    assert of_type(made, "tool_completed")[0]["result"] == 42
    assert made[-2]["data"]["content"] == "It is 42."


@pytest.fixture(scope="module")
def example_installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The example package, built and installed (with pip) into a directory of its own,
    which only the gateway processes that are given it see."""
    base = tmp_path_factory.mktemp("plugin")
    source = base / "src"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    target = base / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(target),
            str(source),
        ],
        check=True,
        timeout=300,
    )
    assert list(target.glob("shout_agent-1.0.0.dist-info/entry_points.txt"))
    yield target


async def test_the_example_package_runs_through_its_entry_points(
    example_installed: Path, tmp_path: Path, user: str
) -> None:
    with spawn_server(tmp_path, PYTHONPATH=str(example_installed)) as server:
        async with httpx.AsyncClient(base_url=server.http) as http:
            body = (await http.get("/health")).json()
        assert "shout" in body["agents"]
        async with ws_client(server, user) as client:
            events = await client.run("make some noise", agent="shout")
    check_run_invariants(events)
    assert events[-1]["data"]["status"] == "completed"
    assert events[1]["data"] == {"agent": "shout"}
    assert of_type(events, "agent_thinking")[0]["kind"] == "status"
    (executing,) = of_type(events, "tool_executing")
    (done,) = of_type(events, "tool_completed")
    assert executing["tool"] == "word_count" and executing["args"] == {"text": "make some noise"}
    assert done["ok"] and done["result"] == {"words": 3, "characters": 15}
    assert events[-2]["data"]["content"] == "MAKE SOME NOISE (3 words; 0 earlier messages)"


async def test_entry_points_can_be_turned_off(example_installed: Path, tmp_path: Path) -> None:
    with spawn_server(
        tmp_path, PYTHONPATH=str(example_installed), CHAT_ENTRY_POINTS="off"
    ) as server:
        async with httpx.AsyncClient(base_url=server.http) as http:
            body = (await http.get("/health")).json()
    assert "shout" not in body["agents"]


def _entry_points(monkeypatch: pytest.MonkeyPatch, group: str, **values: str) -> None:
    from importlib.metadata import EntryPoint

    import agents.registry as registry

    def fake(asked: str) -> list[EntryPoint]:
        if asked != group:
            return []
        return [EntryPoint(name, value, group) for name, value in values.items()]

    monkeypatch.setattr(registry, "discovered", fake)


def test_entry_point_tools_come_from_tools_or_factories(monkeypatch: pytest.MonkeyPatch) -> None:
    _entry_points(monkeypatch, TOOLS_GROUP, echo="tests.plugin_agents:tools")
    registry = build_tools(settings())
    assert [t.name for t in registry] == ["calculator", "clock", "sleep", "echo"]
    assert build_tools(settings(entry_points="off")).schemas() == builtin_tools().schemas()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("tests.plugin_agents:Plain", r"Plain is not a Tool, a list of Tools, or a factory"),
        ("tests.plugin_agents:CLOCK_AGAIN", r"a tool named 'clock' is registered already"),
        ("tests.plugin_agents:NO_SCHEMA", r"needs a JSON schema of type object"),
        ("tests.nope:tool", r"does not import"),
    ],
)
def test_entry_point_tools_are_checked(
    monkeypatch: pytest.MonkeyPatch, value: str, message: str
) -> None:
    _entry_points(monkeypatch, TOOLS_GROUP, bad=value)
    with pytest.raises(PluginError, match=message):
        build_tools(settings())


def test_an_entry_point_agent_clashing_with_chat_agents_is_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _entry_points(monkeypatch, AGENTS_GROUP, greeter="tests.plugin_agents:Greeter")
    assert "greeter" in build_agents(settings()).names()
    with pytest.raises(PluginError, match=r"'greeter' is taken twice: by CHAT_AGENTS and by entry"):
        build_agents(settings(agents=("greeter=tests.plugin_agents:Plain",)))
