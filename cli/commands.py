"""Every module that defines `zoo` commands; importing them marks their commands for the app."""

from . import (
    convert_commands,  # noqa: F401
    deploy_commands,  # noqa: F401
    export_commands,  # noqa: F401
    profile_commands,  # noqa: F401
    search_commands,  # noqa: F401
    train_commands,  # noqa: F401
)
from .common import COMMANDS  # noqa: F401  (what cli.app registers)
