"""``--env openenv:URL`` and ``OpenEnvEpisode`` against OpenEnv's own server: the guessing
game of tests/openenv_guess.py served by ``create_app`` under uvicorn on 127.0.0.1 (a
process started here, reached by OpenEnv's GenericEnvClient over WebSocket). Skipped where
openenv-core (the ``openenv`` extra) is not installed."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from gspo.train import episodes
from gspo.train.checkpoint import list_checkpoints
from gspo.train.cli import main
from gspo.train.envs.openenv import OpenEnvEpisode, action_field, server_env
from test_train_e2e import TINY, rows, weights

REPO = Path(__file__).resolve().parents[1]
GAME = [*TINY, "--max-turns", "2", "--max-new-tokens", "3", "--no-plot"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """tests/openenv_guess.py in a process of its own, on 127.0.0.1:``port``."""

    def __init__(self, log: Path, port: int | None = None) -> None:
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "openenv_guess.py"),
                                      str(self.port)], stdout=log.open("a"),
                                     stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        deadline = time.time() + 120  # importing OpenEnv's server (gradio) takes seconds
        while not self.counts():
            if self.proc.poll() is not None or time.time() > deadline:
                self.kill()
                raise RuntimeError(f"the OpenEnv test server did not start: {log.read_text()}")
            time.sleep(0.2)

    def counts(self) -> dict | None:
        try:
            with urllib.request.urlopen(self.url + "/counts", timeout=2) as response:
                return json.load(response)
        except OSError:
            return None

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("openenv.core")
    started = Server(tmp_path_factory.mktemp("openenv") / "server.log")
    yield started
    started.kill()


def _prompts(tmp_path, n: int = 8) -> str:
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"game {s}:", "seed": s}) + "\n"
                            for s in range(n)))  # fmt: skip
    return str(path)


def _rewarded_by_the_game(run: Path) -> list[dict]:
    """Every sample's episode, checked against the game's rule: reward 1 exactly when a
    reply held the target digit (seed % 10, the seed read from the prompt)."""
    lines = (run / "samples.jsonl").read_text().splitlines()
    got = [c for line in lines for c in json.loads(line)["completions"]]
    for c in got:
        target = int(re.search(r"game (\d+)", c["turns"][0]["content"])[1]) % 10
        replies = [t["content"] for t in c["turns"] if t["role"] == "assistant"]
        assert c["reward"] == float(any(str(target) in r for r in replies)), c
    return got


def test_an_episode_resets_with_the_rows_fields_steps_and_closes_its_session(server):
    env_class = server_env(f"openenv:{server.url}/guess", time_limit=10.0)
    assert env_class.field == "message"  # the action's one text field, from GET URL/schema
    before = server.counts()
    env = env_class(prompt="Play.", seed=13)
    assert env.reset() == "Play. Guess a digit."  # the observation appended (TRL's rule)
    assert env.step("5") == "again"
    assert env.step("3") is None  # 13 % 10 == 3: done, the episode ends
    assert env.reward() == 1.0 and env.session is None  # rewards summed, session closed
    chat = env_class(prompt=[{"role": "user", "content": "Play."}], seed=1)
    assert chat.reset() == [{"role": "user", "content": "Play. Guess a digit."}]
    chat.close()
    bare = env_class(seed=1)
    assert bare.reset() == " Guess a digit."  # no prompt: the text alone
    after = server.counts()
    assert (after["reset"] - before["reset"], after["step"] - before["step"]) == (3, 2)
    assert after["open"] - before["open"] == 1  # open until its reward() or close()
    bare.close()
    assert server.counts()["open"] == before["open"]


def test_the_observation_text_and_the_default_action():
    env = OpenEnvEpisode()
    assert env.action("hi") == {"message": "hi"}
    assert env.text({"message": 3, "board": "x"}) == "3"  # message first
    assert env.text({"board": "x..", "turn": 2}) == "x.."  # the one str field
    assert env.text({"board": [1], "turn": 2}) == json.dumps({"board": [1], "turn": 2})
    assert env.text("plain") == "plain"
    with pytest.raises(NotImplementedError, match="return an OpenEnv client"):
        env.reset()


@pytest.mark.parametrize("schema, why", [
    ({"action": {"properties": {"message": {"type": "string"}, "n": {"type": "integer"}}}},
     '{"message": "string", "n": "integer"}'),
    ({"action": {"properties": {"digit": {"type": "integer"}}}}, '{"digit": "integer"}'),
    ({"action": {"properties": {"metadata": {"type": "object"}}}}, "{}"),
])  # fmt: skip
def test_an_action_without_one_text_field_is_refused_naming_its_fields(schema, why):
    assert action_field("x", {"action": {"properties": {
        "metadata": {"type": "object"}, "text": {"type": "string"}}}}) == "text"
    with pytest.raises(ValueError, match=re.escape(why) + ".*a single str field"):
        action_field("openenv:http://h:1", schema)


def test_a_server_trains_a_tiny_model_and_closes_every_session(server, tmp_path):
    run = tmp_path / "run"
    before = server.counts()
    assert main([*GAME, "--prompts", _prompts(tmp_path), "--env", f"openenv:{server.url}/guess",
                 "--steps", "2", "--samples-per-step", "4", "--run-dir", str(run)]) == 0
    assert len(_rewarded_by_the_game(run)) == 2 * 4 * 4  # steps x groups written x G
    metrics = rows(run)
    assert [r["step"] for r in metrics] == [0, 1, 2]
    assert all(1 <= r["turns_per_episode"] <= 2 for r in metrics[1:])
    # resets: every row once at start (8; the capacity check asks for state, no reset),
    # the held-out row (--prompts holds out its last 10%: 1 of 8) at steps 0 and 2, and
    # 4 prompts x 4 episodes at steps 1 and 2; wrong counts would mean sessions reused
    after = server.counts()
    assert after["reset"] - before["reset"] == 8 + 2 * 1 + 2 * 16
    assert after["open"] == 0  # every session closed (the server closes its environment)


class GuessClient(OpenEnvEpisode):
    """The module:Class form: the user's class makes OpenEnv's client itself."""

    url = ""

    def client(self):
        from openenv.core.generic_client import GenericEnvClient

        return GenericEnvClient(base_url=self.url)

    def reset_options(self) -> dict:
        return {"seed": self.row["seed"]}


def test_a_client_class_of_the_user_trains_through_module_class(server, tmp_path, monkeypatch):
    monkeypatch.setattr(GuessClient, "url", f"{server.url}/guess")
    run = tmp_path / "run"
    assert main([*GAME, "--prompts", _prompts(tmp_path), "--env", "test_openenv:GuessClient",
                 "--steps", "1", "--samples-per-step", "4", "--run-dir", str(run)]) == 0
    assert len(_rewarded_by_the_game(run)) == 16


def test_a_server_allowing_too_few_sessions_is_refused_at_start(server, tmp_path, capsys):
    code = main([*GAME, "--prompts", _prompts(tmp_path), "--env", f"openenv:{server.url}/small",
                 "--steps", "1", "--run-dir", str(tmp_path / "run")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2, err
    assert "holds 2 sessions at once and this run keeps 16 episodes open at once " \
        "(--prompts-per-step 4 x --group-size 4" in err  # fmt: skip
    assert "max_concurrent_envs=16" in err and not (tmp_path / "run").exists()


def test_the_servers_action_must_have_one_text_field(server, tmp_path, capsys):
    for path, fields in (("two", '{"message": "string", "confidence": "number"}'),
                         ("number", '{"digit": "integer"}')):  # fmt: skip
        code = main([*GAME, "--prompts", _prompts(tmp_path), "--env",
                     f"openenv:{server.url}/{path}", "--steps", "1",
                     "--run-dir", str(tmp_path / path)])  # fmt: skip
        err = capsys.readouterr().err
        assert code == 2 and fields in err and "a single str field" in err, err


def test_no_server_at_the_url_is_exit_2_naming_it(tmp_path, capsys):
    pytest.importorskip("openenv.core")
    url = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    code = main([*GAME, "--prompts", _prompts(tmp_path), "--env", f"openenv:{url}",
                 "--steps", "1", "--run-dir", str(tmp_path / "run")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and f"no OpenEnv server answers GET {url}/schema" in err, err


def test_a_slow_server_stops_the_run_with_exit_3_and_a_checkpoint(server, tmp_path, capsys):
    run = tmp_path / "run"
    before, t0 = server.counts(), time.perf_counter()
    code = main([*GAME, "--prompts", _prompts(tmp_path), "--env", f"openenv:{server.url}/slow",
                 "--tool-time-limit", "0.5", "--steps", "1", "--run-dir", str(run)])
    err = capsys.readouterr().err
    assert code == 3, err
    assert "OpenEnvServer.step() raised TimeoutError: no answer within 0.5 s " \
        "(--tool-time-limit)" in err  # fmt: skip
    assert [p.name for p in list_checkpoints(run)] == ["step-000000"]
    assert time.perf_counter() - t0 < 60  # one call's limit, not every session's
    # the failed batch's sessions are closed (episodes.close_all; without it one stayed
    # open here); the one whose step was late ends once the server finishes that step (3 s)
    deadline = time.time() + 20
    while server.counts()["open"] != before["open"] and time.time() < deadline:
        time.sleep(0.2)
    assert server.counts()["open"] == before["open"]


@pytest.mark.parametrize("flags, why", [
    (["--env", "openenv:127.0.0.1:8000"], "openenv:http://HOST:PORT"),
    (["--env", "openenv:ftp://h:1"], "openenv:http://HOST:PORT"),
    (["--env", "openenv:http://h:1", "--reward", "m:f"], "the server's rewards score"),
    (["--env", "openenv:http://h:1", "--tool-parser", "hermes"], "drop --tool-parser"),
])  # fmt: skip
def test_malformed_urls_and_flags_that_do_nothing_with_a_server_are_refused(
        flags, why, tmp_path, capsys):  # fmt: skip
    code = main([*GAME, "--prompts", _prompts(tmp_path), *flags, "--run-dir",
                 str(tmp_path / "run")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and why in err, err


def test_gspo_eval_runs_episodes_on_the_server(server, tmp_path, capsys):
    from gspo.cli import main as gspo_main

    out = tmp_path / "completions.jsonl"
    assert gspo_main(["eval", "--model", "tiny", "--tiny-hidden", "32", "--task", "digitsum",
                      "--prompts",
                      _prompts(tmp_path, 4), "--env", f"openenv:{server.url}/guess",
                      "--max-turns", "2", "-n", "2", "--max-new-tokens", "3", "--engine", "hf",
                      "--out", str(out), "--device", "cpu"]) == 0  # fmt: skip
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 1 <= summary["turns_per_episode"] <= 2 and "pass@2" in summary
    for r in (json.loads(line) for line in out.read_text().splitlines()):
        target = int(re.search(r"game (\d+)", r["greedy_turns"][0]["content"])[1]) % 10
        replies = [t["content"] for t in r["greedy_turns"] if t["role"] == "assistant"]
        assert r["greedy_reward"] == float(any(str(target) in x for x in replies)), r


def test_a_server_killed_mid_step_is_exit_3_and_the_resumed_run_equals_the_straight_one(
        tmp_path, capsys, monkeypatch):  # fmt: skip
    """A server of its own: killed in step 2's second turn, started again on its port."""
    pytest.importorskip("openenv.core")
    log = tmp_path / "server.log"
    dying = Server(log)
    prompts, straight, killed = _prompts(tmp_path), tmp_path / "straight", tmp_path / "killed"
    flags = [*GAME, "--prompts", prompts, "--env", f"openenv:{dying.url}", "--steps", "3"]
    flags[flags.index("--env") + 1] += "/guess"
    try:
        assert main([*flags, "--run-dir", str(straight)]) == 0
        rollout, calls = episodes.MultiTurn.rollout, []

        def dies_in_step_2(self, prompts, *, group_size, greedy, seed=None):
            calls.append(greedy)
            if calls.count(False) == 2:  # step 2's episodes: die after their first turn
                sample = self.sampler.continue_ids

                def then_die(ids, **kw):
                    turns.append(ids)
                    if len(turns) == 2:
                        dying.kill()
                    return sample(ids, **kw)

                turns = []
                monkeypatch.setattr(self.sampler, "continue_ids", then_die)
            return rollout(self, prompts, group_size=group_size, greedy=greedy, seed=seed)

        monkeypatch.setattr(episodes.MultiTurn, "rollout", dies_in_step_2)
        assert main([*flags, "--run-dir", str(killed)]) == 3
        assert "raised" in capsys.readouterr().err
        assert [c.name for c in list_checkpoints(killed)] == ["step-000001"]
        monkeypatch.undo()
        dying = Server(log, port=dying.port)  # the same URL: the run's config names it
        assert main(["--resume", str(killed)]) == 0
    finally:
        dying.kill()
    for x, y in zip(rows(straight), rows(killed), strict=True):
        assert (x["step"], x.get("reward_mean"), x.get("eval_reward")) == \
            (y["step"], y.get("reward_mean"), y.get("eval_reward"))  # fmt: skip
    for name, value in weights(straight).items():
        torch.testing.assert_close(weights(killed)[name], value, rtol=0, atol=0, msg=name)
