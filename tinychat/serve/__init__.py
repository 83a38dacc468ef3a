"""The OpenAI-compatible server (FastAPI + uvicorn), its web chat page and the terminal chat."""
