"""Daemons: the compute nodes' agents, connected to the Gate through the tunnel.

:mod:`~qmesh.daemon.role` composes the rest: telemetry, the GGUF catalog and
quantization planner, runtimes (llama.cpp, Ollama, OpenAI-compatible), the
scheduler that swaps models, the ``infer`` service and the inventory
reporter.
"""
