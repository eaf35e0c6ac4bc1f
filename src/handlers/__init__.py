"""Thin Lambda entry points: parse the event, call `core`, shape the response."""
