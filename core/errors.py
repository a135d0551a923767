"""Errors that end in a one-line message for the user, never a traceback."""


class UsageError(Exception):
    """The user asked for something that cannot be done as asked (exit code 2)."""


class ConfigError(UsageError):
    """The configuration is wrong; ``problems`` names each wrong key."""

    def __init__(self, problems: list[str] | str, source: str = "config"):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        super().__init__(f"{source}: " + "; ".join(self.problems))


class PluginError(UsageError):
    """A plugin could not be loaded; the message names the plugin and its package."""
