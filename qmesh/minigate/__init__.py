"""MiniGate: the edge sidecar that mimics services on localhost and tunnels them to the Gate."""
