"""HTTP for the Gate: a router, the HTTP engine's server, a pooled client."""
