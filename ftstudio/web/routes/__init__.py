"""The HTTP routes, one router per area: the studio itself, tasks and their control, a task's
results (checkpoints, chat, files), datasets and models. Each route is thin: it calls one
`Service` method; errors become status codes in api.py's handlers, at the edge."""
