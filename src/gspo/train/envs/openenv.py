"""OpenEnv environments (github.com/meta-pytorch/OpenEnv) behind docs/environments.md's
contract, in two forms (docs/tools.md, "OpenEnv servers"):

``--env openenv:http://HOST:PORT[/PATH]``: a running OpenEnv server, through OpenEnv's own
``GenericEnvClient`` (pip install 'gspo[openenv]'). At start, ``GET URL/schema`` gives the
server's action model: it must have one text field besides ``metadata`` (the model's reply
is sent as that field); the server must answer (else exit 2 naming the URL) and allow as
many sessions at once as the run keeps episodes open (``check_episodes_at_once``, else exit
2 naming ``max_concurrent_envs``). Per episode: a WebSocket session of its own, ``reset``
with the row's fields as keywords (the server passes on those its environment's ``reset``
takes), then ``step({field: reply})`` per reply; each call bounded by ``--tool-time-limit``.

``--env module:Class`` with a subclass of ``OpenEnvEpisode`` that makes its own client
(an environment's typed client package, its own action and observation)::

    class Echo(OpenEnvEpisode):
        def client(self):                      # one per episode: a session of its own
            return EchoEnv(base_url="http://127.0.0.1:8000")
        def action(self, reply: str):          # default: {"message": reply}
            return EchoAction(message=reply)
        def text(self, observation) -> str:    # default: the rule of ``text`` below
            return observation.echoed_message

Either way: the first message is the row's ``prompt`` with the observation's text appended
(TRL's rule), or the text alone when the row has no prompt; a result with ``done`` ends
the episode, else the observation's text is the next message; the reward is the sum of the
results' rewards (None counts 0), after which the session is closed. Any exception from
the client (the server down, a disconnect, a call over its time limit) stops the run as a
failing environment does (EnvError: a checkpoint, exit 3).

Async clients (OpenEnv's are) run on one event loop in a daemon thread (``Loop``), shared
by every session of the process: a WebSocket stays bound to the loop it was opened on, and
one loop for all sessions is one thread, not one per episode as the clients' ``.sync()``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import json
import threading
import urllib.error
import urllib.request
from urllib.parse import urlparse

from gspo.train.envs.trl import with_observation

PREFIX = "openenv:"  # --env openenv:URL
PROBE_LIMIT = 10.0  # seconds for GET URL/schema at start


class Loop:
    """One asyncio loop on a daemon thread; ``run`` waits for a coroutine from any thread."""

    _loop: asyncio.AbstractEventLoop | None = None
    _lock = threading.Lock()

    @classmethod
    def get(cls) -> asyncio.AbstractEventLoop:
        with cls._lock:
            if cls._loop is None:
                cls._loop = asyncio.new_event_loop()
                threading.Thread(target=cls._loop.run_forever, name="gspo-openenv",
                                 daemon=True).start()  # fmt: skip
            return cls._loop

    @classmethod
    def run(cls, coro, limit: float | None):
        """``coro``'s result; TimeoutError after ``limit`` seconds (None: no limit), the
        call then cancelled."""
        future = asyncio.run_coroutine_threadsafe(coro, cls.get())
        try:
            return future.result(timeout=limit)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"no answer within {limit:g} s (--tool-time-limit)") from None


class Session:
    """An async OpenEnv client driven from the trainer's thread (``Loop``): its ``reset``,
    ``step`` and ``close``, blocking, each bounded by ``limit`` seconds."""

    def __init__(self, client, limit: float | None) -> None:
        self.client, self.limit = client, limit

    def reset(self, **kwargs):
        return Loop.run(self.client.reset(**kwargs), self.limit)

    def step(self, action):
        return Loop.run(self.client.step(action), self.limit)

    def close(self) -> None:
        Loop.run(self.client.close(), self.limit)


class OpenEnvEpisode:
    """The contract class over an OpenEnv client (module docstring); subclass it and
    define ``client()``; ``action``, ``text`` and ``reset_options`` have defaults.
    ``time_limit``: seconds per call of an async client (None: the client's own)."""

    time_limit: float | None = None

    def __init__(self, **fields) -> None:
        self.row = fields
        self.session = None
        self.total = 0.0  # the sum of the steps' rewards: the episode's return

    def client(self):
        """A new OpenEnv client (async, or sync) for one episode."""
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
        """The observation as the model reads it: a str as is; a dict's ``message``, else
        its one str field, else the dict as JSON; an object's ``message``, else ``str``."""
        if isinstance(observation, str):
            return observation
        if isinstance(observation, dict):
            texts = [v for v in observation.values() if isinstance(v, str)]
            if "message" in observation:
                return str(observation["message"])
            return texts[0] if len(texts) == 1 else json.dumps(observation)
        message = getattr(observation, "message", None)
        return str(message) if message is not None else str(observation)

    def reset(self):
        client = self.client()
        is_async = inspect.iscoroutinefunction(getattr(client, "reset", None))
        self.session = Session(client, self.time_limit) if is_async else client
        result = self.session.reset(**self.reset_options())
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
        """End the session (also after the check at start reads the first message, and
        for every episode of a batch that stops on an error)."""
        if self.session is not None:
            session, self.session = self.session, None
            session.close()


class ServerEpisode(OpenEnvEpisode):
    """An episode on the server of ``--env openenv:URL`` (``server_env`` sets ``url``,
    ``field`` and ``time_limit``): OpenEnv's GenericEnvClient, the row's fields as
    ``reset``'s keywords, the reply as the action's one text field."""

    url: str = ""
    field: str = "message"

    def client(self):
        from openenv.core.generic_client import GenericEnvClient

        return GenericEnvClient(base_url=self.url, connect_timeout_s=self.time_limit,
                                message_timeout_s=self.time_limit)  # fmt: skip

    def reset_options(self) -> dict:
        return dict(self.row)

    def action(self, reply: str) -> dict:
        return {self.field: reply}

    @classmethod
    def check_episodes_at_once(cls, n: int, why: str) -> None:
        """ValueError (exit 2) unless the server holds ``n`` sessions at once: opens them,
        asks each for its state, closes them. ``why``: the settings that make ``n``."""
        try:
            held = Loop.run(_open_sessions(cls, n), None)  # each call bounded by the client
        except (ConnectionError, OSError, TimeoutError) as err:
            raise ValueError(f"--env {PREFIX}{cls.url}: opening {n} sessions failed "
                             f"({err}); is the server up?") from None
        if held < n:
            raise ValueError(f"--env {PREFIX}{cls.url}: the server holds {held} sessions at "
                             f"once and this run keeps {n} episodes open at once ({why}); "
                             f"start it with create_app(..., max_concurrent_envs={n}) or "
                             "more, or lower those settings")  # fmt: skip


async def _open_sessions(cls, n: int) -> int:
    """How many of ``n`` sessions the server of ``cls`` opens at once; all closed after.
    Past its ``max_concurrent_envs`` OpenEnv's server answers a new connection with
    CAPACITY_REACHED and closes it at once, so the client's first call fails either with
    that error or on the closed connection."""
    from websockets.exceptions import ConnectionClosed  # OpenEnv's client is built on it

    clients, held = [], 0
    try:
        for _ in range(n):
            client = cls().client()
            clients.append(client)
            try:
                await client.state()
            except ConnectionClosed:
                break
            except RuntimeError as err:  # OpenEnv's client raises error responses so
                if "CAPACITY_REACHED" in str(err):
                    break
            held += 1
    finally:
        for client in clients:
            await client.close()
    return held


def is_server(spec: str | None) -> bool:
    """``--env`` names an OpenEnv server (``openenv:URL``)."""
    return spec is not None and spec.startswith(PREFIX)


def check_url(spec: str) -> str | None:
    """The fix for a malformed ``openenv:URL`` (None when it is well formed)."""
    url = urlparse(spec.removeprefix(PREFIX))
    if url.scheme not in ("http", "https") or not url.netloc:
        return "give the server's address as openenv:http://HOST:PORT (or https://)"
    return None


def server_env(spec: str, *, time_limit: float) -> type:
    """The contract class of ``--env openenv:URL``. ValueError (exit 2) when OpenEnv is not
    installed, the server does not answer, or its action has no single text field."""
    url = spec.removeprefix(PREFIX).rstrip("/")
    try:
        import openenv.core.generic_client  # noqa: F401 - OpenEnv's client: the extra
    except ImportError:
        raise ValueError(f"--env {spec}: OpenEnv's client is not installed; pip install "
                         "'gspo[openenv]' (openenv-core)") from None  # fmt: skip
    field = action_field(spec, _schema(spec, url))
    return type("OpenEnvServer", (ServerEpisode,), {"url": url, "field": field,
                                                     "time_limit": time_limit})  # fmt: skip


def _schema(spec: str, url: str) -> dict:
    try:
        with urllib.request.urlopen(f"{url}/schema", timeout=PROBE_LIMIT) as response:
            return json.load(response)
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise ValueError(f"--env {spec}: no OpenEnv server answers GET {url}/schema "
                         f"({reason}); start the server first, or fix the URL") from None


def action_field(spec: str, schema: dict) -> str:
    """The one text field of the server's action model (``schema["action"]``, a JSON
    schema; ``metadata``, which every OpenEnv action has, is left out); ValueError
    naming the schema when there is not exactly one, or it is not a string."""
    action = schema.get("action", {}) if isinstance(schema, dict) else {}
    fields = {k: v for k, v in action.get("properties", {}).items() if k != "metadata"}
    texts = [k for k, v in fields.items() if v.get("type") == "string"]
    if len(fields) != 1 or len(texts) != 1:
        shown = json.dumps({k: v.get("type", "?") for k, v in fields.items()})
        raise ValueError(f"--env {spec}: the server's action has the fields {shown} (its "
                         "schema, GET URL/schema); gspo sends each reply as an action's one "
                         "text field: serve an action with a single str field, or write a "
                         "client class (--env module:Class, a subclass of "
                         "gspo.train.envs.openenv.OpenEnvEpisode)")  # fmt: skip
    return texts[0]
