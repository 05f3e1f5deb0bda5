"""Errors that describe bad user input; the CLI prints them without a traceback."""


class JaxalignError(Exception):
    """A problem with the user's input (a file, a config key, a tensor), stated so the user can fix it."""
