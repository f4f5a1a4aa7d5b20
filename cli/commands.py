"""Imports every module that defines `zoo` commands, so that they register with the app."""

from . import (
    convert_commands,  # noqa: F401,E402
    deploy_commands,  # noqa: F401,E402
    export_commands,  # noqa: F401,E402
    search_commands,  # noqa: F401,E402
    train_commands,  # noqa: F401,E402
)
