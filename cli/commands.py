"""Imports every module that defines `zoo` commands, so that they register with the app."""
from . import deploy_commands  # noqa: F401,E402
from . import export_commands  # noqa: F401,E402
from . import train_commands  # noqa: F401,E402
from . import search_commands  # noqa: F401,E402
from . import convert_commands  # noqa: F401,E402
