"""Model runtimes behind one interface (:mod:`qmesh.daemon.runtimes.base`):
llama.cpp (supervised model-server processes), Ollama and any
OpenAI-compatible server, all over HTTP (:mod:`qmesh.daemon.runtimes.http`)."""
