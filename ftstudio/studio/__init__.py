"""The core: the store, the lifecycle, the queue, the supervisor and the service that the CLI and
the web both call. It imports no HTTP library."""
