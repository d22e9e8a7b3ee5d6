"""An OpenEnv environment written against OpenEnv's own base classes (configs/foreign/openenv.yaml, the tests): count
up from 1 to a target, one number per step.

``reset(seed)`` picks the target (``seed % 4 + 2``: 2 to 5) and says it; each ``step(CountAction(number=...))`` is
right when the first number in it is the next number (step reward 1) and ends the episode when it reaches the
target; a wrong number ends it with step reward 0. So a perfect episode's summed reward is the target, its last step
reward 1. With ``OPENENV_TEST_CRASH`` set, ``CountAction(number="crash")`` kills the serving process (a server that
dies mid-episode) and ``number="hang"`` stalls the step for 30 s (a server that stops answering). Serve it on
loopback: ``python recipes/openenv_count.py PORT [MAX_SESSIONS]``; the recipe's
``env.environment.options.url: http://127.0.0.1:PORT`` then plays it remotely.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import time
from typing import Any, Optional

from pydantic import Field

from openenv.core import Action, Environment, Observation, State


class CountAction(Action):
    """Say the next number."""

    number: str = Field(..., description="the next number, in digits")


class CountObservation(Observation):
    text: str = ""


_live = 0
_most_live = 0
_lock = threading.Lock()


class CountingEnv(Environment):
    SUPPORTS_CONCURRENT_SESSIONS = True

    def __init__(self):
        super().__init__()
        global _live, _most_live
        with _lock:
            _live += 1
            _most_live = max(_most_live, _live)
        self._state = State(step_count=0)
        self.target, self.count = 0, 0

    def reset(self, seed: Optional[int] = None, episode_id: Optional[str] = None, **kwargs: Any) -> CountObservation:
        self.target, self.count = (int(seed or 0) % 4) + 2, 0
        self._state = State(episode_id=episode_id, step_count=0)
        return CountObservation(text=f"Count from 1 to {self.target}, one number per turn: reply with the next number "
                                     "only, starting with 1.", done=False, reward=None)

    def step(self, action: CountAction, timeout_s: Optional[float] = None, **kwargs: Any) -> CountObservation:
        if action.number == "crash" and os.environ.get("OPENENV_TEST_CRASH"):
            os.kill(os.getpid(), signal.SIGKILL)
        if action.number == "hang" and os.environ.get("OPENENV_TEST_CRASH"):
            time.sleep(30)
        self._state.step_count += 1
        said = re.search(r"-?\d+", action.number)  # the first number in the reply is the move
        if said is not None and int(said.group()) == self.count + 1:
            self.count += 1
            done = self.count == self.target
            return CountObservation(text="done" if done else f"ok, {self.count}", done=done, reward=1.0)
        return CountObservation(text=f"wrong: expected {self.count + 1}", done=True, reward=0.0)

    @property
    def state(self) -> State:
        return self._state

    def close(self) -> None:
        global _live
        with _lock:
            _live -= 1


def most_sessions() -> int:
    return _most_live


def app(max_sessions: int = 4):
    from openenv.core import create_fastapi_app

    fastapi_app = create_fastapi_app(CountingEnv, CountAction, CountObservation, max_concurrent_envs=max_sessions)

    @fastapi_app.get("/test/most_sessions")
    def _most() -> dict:
        return {"most": _most_live, "live": _live}

    return fastapi_app


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app(int(sys.argv[2]) if len(sys.argv) > 2 else 4), host="127.0.0.1", port=int(sys.argv[1]),
                log_level="warning")
