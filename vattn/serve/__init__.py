"""`vattn serve`: an OpenAI-compatible HTTP server on the engine (app.py), replicas on Ray Serve (ray.py).

Imports nothing heavy: FastAPI, uvicorn and torch load with vattn.serve.app."""
