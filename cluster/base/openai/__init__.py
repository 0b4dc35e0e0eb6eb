"""The OpenAI-compatible HTTP front end, shared by the router and the workers: the schema (``protocol``), the
conversions to and from the generation contract (``convert``), error answers (``errors``), the FastAPI app over
any ``GenerationBackend`` (``app``) and the uvicorn server that runs it on an asyncio loop (``server``)."""
