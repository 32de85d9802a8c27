"""Routing state shared through Valkey: schema, pod state machine, writer, subscriber."""
