"""Daemons: the compute nodes' agents, connected to the Gate through the tunnel."""
