"""A small OpenEnv environment served by OpenEnv's own server (``create_app`` under uvicorn),
on 127.0.0.1 only, for tests/test_openenv.py and tests/test_openenv_vllm.py.

    python tests/openenv_guess.py PORT

The game: ``reset(seed=S)`` asks for a digit; a reply holding the target digit ``S % 10``
gets reward 1 and ends the episode, any other reply gets 0 and "again". Served at:

    /guess   the game, up to 64 sessions at once
    /small   the game, 2 sessions at once (a run needing more is refused at start)
    /slow    the game, each step taking SLOW_S seconds (past --tool-time-limit)
    /two     an action of two fields (refused at start: one text field is sent)
    /number  an action whose one field is an int (refused at start)

GET /counts: the resets and steps served and the sessions open (all variants together).
"""

from __future__ import annotations

import sys
import time

import uvicorn
from fastapi import FastAPI
from openenv.core.env_server import Action, Environment, Observation, State, create_app

SLOW_S = 3.0
COUNTS = {"reset": 0, "step": 0, "open": 0}  # "open": sessions not yet closed


class GuessAction(Action):
    message: str


class TwoAction(Action):
    message: str
    confidence: float = 1.0


class NumberAction(Action):
    digit: int


class GuessObservation(Observation):
    message: str


class Guess(Environment):
    SUPPORTS_CONCURRENT_SESSIONS = True  # each session has its own instance, no shared state
    delay = 0.0

    def __init__(self) -> None:
        super().__init__()
        self.target, self._state = 0, State(step_count=0)
        COUNTS["open"] += 1  # the server makes one instance per session

    def close(self) -> None:  # the server calls it when the session ends
        COUNTS["open"] -= 1

    def reset(self, seed: int | None = None, episode_id: str | None = None, **kwargs):
        COUNTS["reset"] += 1
        self.target, self._state = (seed or 0) % 10, State(episode_id=episode_id, step_count=0)
        return GuessObservation(message=" Guess a digit.", reward=None, done=False)

    def step(self, action, timeout_s: float | None = None, **kwargs):
        COUNTS["step"] += 1
        time.sleep(self.delay)
        self._state.step_count += 1
        said = str(getattr(action, "message", getattr(action, "digit", "")))
        hit = str(self.target) in said
        return GuessObservation(message="again", reward=float(hit), done=hit)

    @property
    def state(self) -> State:
        return self._state


class Slow(Guess):
    delay = SLOW_S


def app() -> FastAPI:
    root = FastAPI()
    for path, env, action, most in (("/guess", Guess, GuessAction, 64),
                                    ("/small", Guess, GuessAction, 2),
                                    ("/slow", Slow, GuessAction, 64),
                                    ("/two", Guess, TwoAction, 4),
                                    ("/number", Guess, NumberAction, 4)):  # fmt: skip
        root.mount(path, create_app(env, action, GuessObservation, max_concurrent_envs=most))
    root.get("/counts")(lambda: COUNTS)
    return root


if __name__ == "__main__":
    uvicorn.run(app(), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
