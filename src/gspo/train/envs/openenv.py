"""OpenEnv environments (github.com/meta-pytorch/OpenEnv) through ``--env module:Class``:
an OpenEnv client's ``reset``/``step`` behind docs/environments.md's contract.

OpenEnv is not a dependency of gspo (its package pulls gradio, fastmcp and about 34 more);
this adapter calls the client the user makes, by the client API OpenEnv documents
(openenv.core.env_client.EnvClient and its ``.sync()`` wrapper, SyncEnvClient)::

    client.reset(**kwargs) -> StepResult      # StepResult(observation, reward=None,
    client.step(action)    -> StepResult      #            done=False, metadata=None)
    client.close()

An async client (``async def reset``, OpenEnv's default) is used through its ``.sync()``.
What a user writes (docs/tools.md, "OpenEnv")::

    from gspo.train.envs.openenv import OpenEnvEpisode
    from echo_env import EchoAction, EchoEnv

    class Echo(OpenEnvEpisode):
        def client(self):                      # one per episode: a session of its own
            return EchoEnv(base_url="http://127.0.0.1:8000")
        def action(self, reply: str):          # default: {"message": reply}
            return EchoAction(message=reply)
        def text(self, observation) -> str:    # default: the observation's "message" or str
            return observation.echoed_message

One instance (and one client session) per episode: ``reset()`` opens the client and calls
its ``reset(**reset_options())``; the first message is the row's ``prompt`` with the
observation's text appended (TRL's rule), or the text alone when the row has no prompt.
Each reply becomes ``step(action(reply))``; the episode ends when a result says ``done``
(else the observation's text is the next message). The reward is the sum of the steps'
rewards (None counts 0), after which the session is closed. Any exception from the client
(the server down, a disconnect, OpenEnv's ``message_timeout_s`` passed) stops the run as a
failing environment does (EnvError: a checkpoint, exit 3).
"""

from __future__ import annotations

import inspect
import json

from gspo.train.envs.trl import with_observation


class OpenEnvEpisode:
    """The contract class over an OpenEnv client (module docstring); subclass it and
    define ``client()``; ``action``, ``text`` and ``reset_options`` have defaults."""

    def __init__(self, **fields) -> None:
        self.row = fields
        self.session = None
        self.total = 0.0  # the sum of the steps' rewards: the episode's return

    def client(self):
        """A new OpenEnv client (sync, or async with ``.sync()``) for one episode."""
        raise NotImplementedError(f"{type(self).__name__}.client(): return an OpenEnv "
                                  "client, e.g. GenericEnvClient(base_url=...)")  # fmt: skip

    def reset_options(self) -> dict:
        """Keywords of the client's ``reset`` (e.g. a seed from the row); none by default."""
        return {}

    def action(self, reply: str):
        """The model's reply as the environment's action: ``{"message": reply}`` (the field
        of OpenEnv's echo and TextArena actions; a dict is what GenericEnvClient sends)."""
        return {"message": reply}

    def text(self, observation) -> str:
        """The observation as the model reads it: a str as is, else its ``message`` (a dict's
        key or an attribute), else the dict as JSON, else ``str``."""
        if isinstance(observation, str):
            return observation
        if isinstance(observation, dict):
            return str(observation["message"]) if "message" in observation else \
                json.dumps(observation)  # fmt: skip
        message = getattr(observation, "message", None)
        return str(message) if message is not None else str(observation)

    def reset(self):
        client = self.client()
        if inspect.iscoroutinefunction(getattr(client, "reset", None)):
            client = client.sync()  # OpenEnv's clients are async; .sync() is theirs
        self.session = client
        result = client.reset(**self.reset_options())
        self.total += float(result.reward or 0.0)
        return with_observation(self.row.get("prompt"), self.text(result.observation))

    def step(self, reply: str) -> str | None:
        result = self.session.step(self.action(reply))
        self.total += float(result.reward or 0.0)
        return None if result.done else self.text(result.observation)

    def reward(self) -> float:
        self.close()
        return self.total

    def close(self) -> None:
        """End the session (also called after the check at start reads the first message)."""
        if self.session is not None:
            self.session.close()
            self.session = None
