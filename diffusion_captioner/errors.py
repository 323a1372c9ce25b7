"""The toolkit's user-facing error types, in a module that imports nothing of the toolkit (so
every other module may raise them without an import cycle)."""


class ComponentError(ValueError):
    """A component could not be found or built; the message is one line meant for the user."""
