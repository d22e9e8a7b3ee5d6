"""TextArena games as stateful environments: ``env.environment: {spec: builtin:textarena, options: {game:
GuessTheNumber-v0}}`` runs any TextArena game id (``pip install 'rlcli[textarena]'``).

An episode is one game, played in text as TextArena's own agents play it:

- ``reset(**row)`` makes the game (``textarena.make(game)``), resets it with the row's ``seed`` (when the row has
  one) and returns the first observation, appended to the row's prompt;
- each model turn is the action: ``_respond(text)`` passes the turn's text to ``env.step`` and returns what the game
  shows next (only the part of the observation that is new since the last one); in a game of several players a
  fixed-policy opponent moves until it is the model's turn again;
- the game decides when it is over (``done``), and its reward for the model's player is the episode's reward
  (``get_reward``). A game the episode's turns ran out on scores ``unfinished_reward``.

rlcli calls ``_respond`` on every turn but the last one (``env.max_turns``): give an episode at least one turn more
than the game needs. Games that load data at run time (Wordle, Codenames, ... read NLTK corpora) fail with one error
naming the data: NLTK's downloader is never called, so nothing is fetched from the network.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import random
from typing import Any

EXTRA = "pip install 'rlcli[textarena]'  (textarena==0.7.4)"


def missing_package() -> str | None:
    if importlib.util.find_spec("textarena") is None:
        return f"needs the textarena package, which is not installed: {EXTRA}"
    return None


@contextlib.contextmanager
def _no_downloads(wanted: list[str]):
    """NLTK's downloader replaced by one that only records what was asked for (a game module calls it as it is
    imported): a game whose data is missing then fails on the missing data, offline, and says which."""
    try:
        import nltk
    except ImportError:
        yield
        return

    def download(info_or_id=None, *args, **kwargs):
        wanted.extend([info_or_id] if isinstance(info_or_id, str) else list(info_or_id or []))
        return False

    saved = nltk.download
    nltk.download = download
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        nltk.download = saved


def make_game(game: str):
    """``textarena.make(game)``, or a ``ValueError`` in one sentence (unknown id, missing data, missing package)."""
    why = missing_package()
    if why is not None:
        raise ValueError(f"builtin:textarena {why}")
    import textarena

    if game not in textarena.envs.registration.ENV_REGISTRY:
        known = sorted(textarena.envs.registration.ENV_REGISTRY)
        close = [g for g in known if g.lower().startswith(game.split("-")[0].lower()[:4])][:6]
        raise ValueError(f"{game!r} is not a TextArena game id" + (f" (similar: {', '.join(close)})" if close else
                                                                   f" ({len(known)} are registered)"))
    wanted: list[str] = []
    try:
        with _no_downloads(wanted):
            return textarena.make(game)
    except (LookupError, ImportError, OSError) as exc:
        if wanted or isinstance(exc, LookupError):
            import re

            # what the game asked the downloader for (the first time its module loads) and what NLTK missed
            wanted += re.findall(r"Resource \W*(\w+)\W* not found", str(exc))
            data = ", ".join(dict.fromkeys(wanted)) or "a corpus"
            raise ValueError(f"TextArena game {game!r} needs NLTK data that is not installed here ({data}); rlcli "
                             "runs games offline and never downloads it: install it beforehand (python -m "
                             f"nltk.downloader {' '.join(dict.fromkeys(wanted)) or 'NAME'}) or pick a game that "
                             "needs no data") from None
        raise ValueError(f"TextArena game {game!r} could not be made: {type(exc).__name__}: {exc}") from None


class TextArenaGame:
    """One TextArena game per episode (see the module docstring). Options (``env.environment.options``):

    - ``game``: the TextArena id (``GuessTheNumber-v0``, ``TowerOfHanoi-v0``, ``TicTacToe-v0``, ...);
    - ``num_players`` (1) and ``player`` (0): the model plays ``player`` of ``num_players``;
    - ``opponent_moves``: for games of several players, the other players' fixed policy: the first of these
      actions the game accepts (``["[4]", "[0]", "[2]", ...]``), tried in order (``opponent_order: first``) or in
      a random order drawn from the row's seed (``random``);
    - ``unfinished_reward`` (0.0): the reward of a game still running when the episode ends.
    """

    def __init__(self, game: str, num_players: int = 1, player: int = 0, opponent_moves: list[str] | None = None,
                 opponent_order: str = "first", unfinished_reward: float = 0.0):
        if not 0 <= player < num_players:
            raise ValueError(f"player={player} is not one of the {num_players} players (0-{num_players - 1})")
        if num_players > 1 and not opponent_moves:
            raise ValueError(f"a game of {num_players} players needs opponent_moves: the actions the other players "
                             "try, first accepted wins (e.g. every square '[0]' ... '[8]' of TicTacToe-v0)")
        if opponent_order not in ("first", "random"):
            raise ValueError(f"opponent_order is 'first' or 'random', got {opponent_order!r}")
        self.game_id = game
        self.num_players = num_players
        self.player = player
        self.opponent_moves = list(opponent_moves or [])
        self.opponent_order = opponent_order
        self.unfinished_reward = float(unfinished_reward)
        self.env = make_game(game)  # here, so that --dry-run's probe instance refuses a game that cannot run
        self.done = False
        self.rewards: dict | None = None
        self.outcome: str | None = None
        self._shown = ""
        self._rng = random.Random(0)

    def reset(self, seed: int | None = None, **row: Any) -> str:
        """Start the game (at the row's ``seed``) and return its first observation for the model."""
        if seed is not None:
            seed = int(seed)
        self.env.reset(num_players=self.num_players, seed=seed)
        self._rng = random.Random(seed)
        self._opponents_move()
        return self._observe()

    def _respond(self, text: str) -> str:
        """The model's turn is the action; the answer is what the game shows next."""
        if self.done:
            return f"The game is over: {self.outcome}"
        done, _ = self.env.step(text)
        if not done:
            done = self._opponents_move()
        if done or self._game_over():
            self._end()
            seen = self._observe()
            return f"{seen}\n[GAME] Game over: {self.outcome}".lstrip("\n")
        return self._observe()

    def get_reward(self) -> float:
        """The game's reward for the model's player; ``unfinished_reward`` while the game is not over."""
        if not self.done or not self.rewards or self.player not in self.rewards:
            return self.unfinished_reward
        return float(self.rewards[self.player])

    def _close(self) -> None:
        if not self.done:
            with contextlib.suppress(Exception):
                self.env.close()

    # ---------------------------------------------------------------------------------------------------------------

    def _state(self):
        return getattr(self.env, "state", None)

    def _game_over(self) -> bool:
        state = self._state()
        return bool(getattr(state, "done", False))

    def _current_player(self) -> int:
        return int(self.env.get_observation()[0])

    def _opponents_move(self) -> bool:
        """Let the other players move until it is the model's turn or the game ends; True when it ended."""
        while not self._game_over() and self._current_player() != self.player:
            moved = False
            order = list(self.opponent_moves)
            if self.opponent_order == "random":
                self._rng.shuffle(order)
            mover = self._current_player()
            for action in order:
                # a refused move would cost the opponent an error in the game's tally: try it on a copy first
                trial = copy.deepcopy(self.env)
                done, _ = trial.step(action)
                if done or self._accepted(trial, mover):
                    self.env = trial
                    moved = True
                    break
            if not moved:
                raise RuntimeError(f"no opponent move was accepted by {self.game_id} (tried {len(order)})")
            if self._game_over():
                return True
        return self._game_over()

    @staticmethod
    def _accepted(env, mover: int) -> bool:
        state = env.state
        return bool(getattr(state, "done", False)) or (state.current_player_id != mover
                                                       and not getattr(state, "made_invalid_move", False))

    def _observe(self) -> str:
        """What the model's player sees that it has not seen yet (TextArena's observations grow with the game)."""
        _, observation = self.env.get_observation()
        text = observation if isinstance(observation, str) else "\n".join(
            str(m[1]) if isinstance(m, (tuple, list)) and len(m) > 1 else str(m) for m in observation or [])
        new = text[len(self._shown):] if text.startswith(self._shown) else text
        self._shown = text
        return new.strip("\n")

    def _end(self) -> None:
        self.done = True
        state = self._state()
        info = {}
        try:
            closed = self.env.close()
            self.rewards, info = closed if isinstance(closed, tuple) else (closed, {})
        except Exception:  # noqa: BLE001 - the rewards are on the state as well
            self.rewards = getattr(state, "rewards", None)
        info = info or getattr(state, "game_info", {}) or {}
        reason = (info.get(self.player) or {}).get("reason") if isinstance(info, dict) else None
        self.outcome = reason or "the game ended"
