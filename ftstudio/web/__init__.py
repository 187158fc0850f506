"""The HTTP side: the FastAPI app and its routes, the gate, auth, uploads, the event stream, the
server daemon and the page (static/)."""
