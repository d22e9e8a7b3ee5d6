"""rlcli: train language models with SFT, reward modelling and PPO, including models that call tools."""

__version__ = "0.1.0"
