"""Errors that stop a command with one clear message (the CLI turns them into exit code 2)."""


class HistoryError(Exception):
    """The history directory cannot be used at all: a required file or column is missing."""
