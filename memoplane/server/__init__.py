"""The agent API (`memoplane serve`): E2B-compatible sandboxes and memoized runs over HTTP.

- app.py: the ASGI app (FastAPI, OpenAPI at /openapi.json) and the one authentication hook
  every request passes; envd.py: E2B's in-sandbox Connect services; files.py: /files;
  memo.py: POST /v1/run; sessions.py: sandboxes that live between calls; session_agent.py:
  the agent inside each of them; serve.py: the command.
"""
