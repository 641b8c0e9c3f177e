"""Redis command table (snapshot of a real Redis 7's COMMAND/COMMAND DOCS) and key extraction."""

from proxy.commands.table import CommandInfo, CommandTable, KeySpec, default_table

__all__ = ["CommandInfo", "CommandTable", "KeySpec", "default_table"]
