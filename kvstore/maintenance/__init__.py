"""Store maintenance off the request path: prune policy, gc, verify, export and import."""
