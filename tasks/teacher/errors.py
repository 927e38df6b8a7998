"""The teacher's user-facing error, apart from the modules that raise it so that they import one way
(``model`` -> ``int8``, and ``int8`` needs only this)."""


class TeacherError(ValueError):
    """A teacher cannot be loaded or does not fit the task: the message says what and how to fix it."""
