"""tickpipe as a Model Context Protocol server: the same keys, entitlements and query history as
REST and the WebSocket, over streamable HTTP at ``/mcp`` (``http``) and over stdio
(``tickpipe mcp``, ``stdio``). ``contract`` is the surface, ``tools`` and ``resources`` the
answers, ``server`` the handlers both transports share."""
