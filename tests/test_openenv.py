"""OpenEnv's client API behind the environment contract (gspo.train.envs.openenv).

STAND-IN, NOT OPENENV: the openenv package is not installed here (it is no dependency of
gspo). ``StandInClient`` below follows the client API that OpenEnv documents in
openenv/core/env_client.py, client_types.py and sync_client.py (meta-pytorch/OpenEnv, read
2026-12-05): an async client constructed with ``base_url`` (and ``connect_timeout_s``,
``message_timeout_s``), ``async reset(**kwargs)`` and ``async step(action)`` returning a
``StepResult(observation, reward=None, done=False, metadata=None)`` dataclass, ``async
close()``, and ``sync()`` giving a blocking wrapper with the same method names. Its "server"
is a dict in this process; no socket is opened. A real OpenEnv server was not run."""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from typing import Any

import pytest

from gspo.train.checkpoint import list_checkpoints
from gspo.train.cli import main
from gspo.train.envs.openenv import OpenEnvEpisode
from test_train_e2e import TINY


@dataclass
class StepResult:  # openenv.core.client_types.StepResult, field for field
    observation: Any
    reward: float | None = None
    done: bool = False
    metadata: dict[str, Any] | None = None


SERVER = {"open": 0, "most_open": 0, "down": False}  # the stand-in server's state


class StandInClient:
    """An OpenEnv-style async client of a guessing game: reset asks for a digit; a reply
    holding the target digit (the session's number mod 10) gets reward 1 and ends the
    episode; another gets 0 and "again"; observations are dicts (GenericEnvClient's)."""

    def __init__(self, base_url: str, connect_timeout_s: float = 10.0,
                 message_timeout_s: float = 60.0) -> None:  # fmt: skip
        self.base_url, self.target = base_url, None

    async def reset(self, **kwargs: Any) -> StepResult:
        SERVER["open"] += 1
        SERVER["most_open"] = max(SERVER["most_open"], SERVER["open"])
        self.target = kwargs.get("seed", 0) % 10
        return StepResult(observation={"message": " Guess a digit."}, reward=None, done=False)

    async def step(self, action: dict, **kwargs: Any) -> StepResult:
        if SERVER["down"]:
            raise ConnectionError(f"Failed to connect to {self.base_url}/ws: refused")
        hit = str(self.target) in action["message"]
        return StepResult(observation={"message": "again"}, reward=float(hit), done=hit)

    async def close(self) -> None:
        SERVER["open"] -= 1

    def sync(self) -> StandInSync:
        return StandInSync(self)


class StandInSync:
    """SyncEnvClient's shape: the async client's methods, blocking."""

    def __init__(self, client: StandInClient) -> None:
        self._async = client

    def reset(self, **kwargs: Any) -> StepResult:
        return asyncio.run(self._async.reset(**kwargs))

    def step(self, action: Any, **kwargs: Any) -> StepResult:
        return asyncio.run(self._async.step(action, **kwargs))

    def close(self) -> None:
        asyncio.run(self._async.close())


class Guess(OpenEnvEpisode):
    def client(self):
        return StandInClient(base_url="http://127.0.0.1:8000")

    def reset_options(self) -> dict:
        return {"seed": self.row["seed"]}


def test_an_episode_resets_steps_sums_rewards_and_closes_its_session():
    SERVER.update(open=0, most_open=0, down=False)
    env = Guess(prompt="Play.", seed=13)
    assert env.reset() == "Play. Guess a digit."  # the observation appended (TRL's rule)
    assert SERVER["open"] == 1 and isinstance(env.session, StandInSync)  # async -> .sync()
    assert env.step("5") == "again"
    assert env.step("3") is None  # done: the episode ends
    assert env.reward() == 1.0 and SERVER["open"] == 0
    chat = Guess(prompt=[{"role": "user", "content": "Play."}], seed=1)
    assert chat.reset() == [{"role": "user", "content": "Play. Guess a digit."}]
    assert Guess(seed=1).reset() == " Guess a digit."  # no prompt: the observation alone


def test_default_action_and_text_follow_openenvs_message_fields():
    env = OpenEnvEpisode()
    assert env.action("hi") == {"message": "hi"}
    assert env.text({"message": 3}) == "3"
    assert env.text({"board": [1]}) == json.dumps({"board": [1]})

    @dataclass
    class EchoObservation:
        message: str

    assert env.text(EchoObservation("echo")) == "echo" and env.text("plain") == "plain"
    with pytest.raises(NotImplementedError, match="return an OpenEnv client"):
        env.reset()


def _prompts(tmp_path) -> str:
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"game {s}:", "seed": s}) + "\n"
                            for s in range(8)))  # fmt: skip
    return str(path)


def test_an_openenv_style_client_trains_a_tiny_model(tmp_path):
    SERVER.update(open=0, most_open=0, down=False)
    run = tmp_path / "run"
    assert main([*TINY, "--prompts", _prompts(tmp_path), "--env", "test_openenv:Guess",
                 "--max-turns", "2", "--max-new-tokens", "3", "--steps", "2", "--no-plot",
                 "--samples-per-step", "4", "--run-dir", str(run)]) == 0  # fmt: skip
    assert SERVER["open"] == 0 and SERVER["most_open"] >= 2  # every session closed
    lines = (run / "samples.jsonl").read_text().splitlines()
    got = [c for line in lines for c in json.loads(line)["completions"]]
    assert got
    for c in got:  # the stand-in's reward: 1 when a reply held the target digit
        target = int(re.search(r"game (\d+)", c["turns"][0]["content"])[1]) % 10
        replies = [t["content"] for t in c["turns"] if t["role"] == "assistant"]
        assert c["reward"] == float(any(str(target) in r for r in replies)), c


def test_a_server_that_fails_stops_the_run_with_a_checkpoint_and_exit_3(tmp_path, capsys):
    SERVER.update(open=0, most_open=0, down=True)
    run = tmp_path / "run"
    code = main([*TINY, "--prompts", _prompts(tmp_path), "--env", "test_openenv:Guess",
                 "--max-turns", "2", "--max-new-tokens", "3", "--steps", "2", "--no-plot",
                 "--run-dir", str(run)])  # fmt: skip
    SERVER["down"] = False
    err = capsys.readouterr().err
    assert code == 3, err
    assert "Guess.step() raised ConnectionError: Failed to connect to http://127.0.0.1:8000" \
        in err  # fmt: skip
    assert [p.name for p in list_checkpoints(run)] == ["step-000000"]
