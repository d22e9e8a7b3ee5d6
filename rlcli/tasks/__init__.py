"""Tasks and environments from other libraries, named by recipe keys: reasoning-gym datasets
(``tasks.reasoning_gym``), TextArena games (``tasks.textarena``) and OpenEnv environments (``tasks.openenv``)."""
