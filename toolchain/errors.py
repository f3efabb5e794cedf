"""User-facing errors: the CLI turns these into one line on stderr and exit code 2."""


class UserError(Exception):
    """Bad input from the user (flags, config, data, checkpoint). Message is one line."""


class BuildError(Exception):
    """The build ran but its result failed a check (e.g. ONNX parity): exit code 1."""
