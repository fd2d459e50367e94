"""The root of every error hotlab reports to a user.

Why one root: the command line turns a `HotlabError` into a one-line message and an exit code
(`exit_code`: 2 for bad input, 1 for a runtime failure) and lets anything else surface as a
bug, so each layer's errors derive from it instead of being listed one by one in the CLI.
"""

from __future__ import annotations


class HotlabError(Exception):
    """An expected failure with a message meant for the user."""

    #: The process exit code when this error ends a command: 1 runtime failure, 2 bad input.
    exit_code = 1


class InputError(HotlabError, ValueError):
    """Bad input from a user, a file or a device setting: exit code 2."""

    exit_code = 2
