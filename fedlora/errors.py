"""Errors raised on bad input, each naming the problem."""


class InvalidUpdateError(ValueError):
    """A client update cannot be aggregated (shape, rank, module set, values or example count)."""


class ConfigError(ValueError):
    """A configuration value is missing or out of range."""


class SimulationError(RuntimeError):
    """A simulation failed or ended without all its rounds; the message says why."""
