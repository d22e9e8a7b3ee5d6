"""Reward sources: Python functions and reward models behind one interface."""
