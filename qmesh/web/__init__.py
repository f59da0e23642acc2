"""HTTP for the Gate: an h11 server under Trio with a small router."""
