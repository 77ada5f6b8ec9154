"""A trained run served over HTTP: ``python cli.py serve --run RUN`` (FastAPI on uvicorn) and its web page."""
