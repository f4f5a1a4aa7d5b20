"""Imports every module that defines `zoo` commands, so that they register with the app."""
