"""`odyssey serve`: the video generation service (OpenAI-style HTTP API on Ray Serve, live progress and previews,
a web page). service.py keeps the jobs (queue, state, events, SQLite) over the batch driver's replicas; api.py is
the HTTP surface; app.py the Ray Serve deployment; cli.py the command."""
