"""Chatting with a fine-tune: the request, where the worker runs, and the worker process."""
