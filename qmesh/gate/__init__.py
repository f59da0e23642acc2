"""The Gate: authentication, the tunnel listener and the services edges reach through it."""
