"""A small MCP server for the compose demo: the upstream behind the proxies.

Run by the `demo-upstream` service with the Python MCP SDK (`mcp` 2.x):
    python demo_upstream.py [HOST] [PORT]
Serves MCP Streamable HTTP on http://HOST:PORT/mcp.
"""

import sys
from datetime import datetime, timezone

from mcp.server.mcpserver import MCPServer

server = MCPServer("sentinel-compose-demo")


@server.tool()
def echo(text: str) -> str:
    """Return the text unchanged."""
    return text


@server.tool()
def add(a: float, b: float) -> float:
    """Add two numbers."""
    return a + b


@server.tool()
def time() -> str:
    """The current UTC time, ISO 8601."""
    return datetime.now(timezone.utc).isoformat()


@server.tool()
def lookup_customer(email: str) -> dict:
    """A made-up customer record (sensitive: the demo policy denies it to analysts)."""
    return {"email": email, "name": "Ada Example", "tier": "gold"}


if __name__ == "__main__":
    host = sys.argv[1] if len(sys.argv) > 1 else "0.0.0.0"
    port = int(sys.argv[2]) if len(sys.argv) > 2 else 8000
    server.run("streamable-http", host=host, port=port)
