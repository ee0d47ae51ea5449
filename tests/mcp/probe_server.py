"""An MCP server built on the SDK's own MCPServer, for what the third-party servers cannot show:
a slow call (to kill a server mid-call or time a call out), a network attempt and a big allocation
(the sandbox), image
and resource blocks, and the streamable-HTTP transport.

    python probe_server.py stdio
    python probe_server.py http PORT
"""

from __future__ import annotations

import base64
import os
import socket
import sys
import time

from mcp.server.mcpserver import MCPServer
from mcp.types import EmbeddedResource, ImageContent, TextContent, TextResourceContents

server = MCPServer("probe")


@server.tool()
def echo(text: str) -> str:
    """Say the text back."""
    return text


@server.tool()
def pid() -> int:
    """This server's process id."""
    return os.getpid()


@server.tool()
def sleep(seconds: float) -> str:
    """Wait, then answer."""
    time.sleep(seconds)
    return f"slept {seconds} s"


@server.tool()
def allocate(megabytes: int) -> str:
    """Hold that much memory for a moment."""
    block = bytearray(megabytes * 1024 * 1024)
    return f"held {len(block) // (1024 * 1024)} MB"


@server.tool()
def connect(port: int) -> str:
    """Open a TCP connection to 127.0.0.1:port and say whether it worked."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return "connected"
    except OSError as err:
        return f"refused: {err}"


@server.tool()
def picture() -> list[ImageContent | EmbeddedResource | TextContent]:
    """An image, a resource and a caption."""
    png = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(300)).decode()
    resource = TextResourceContents(uri="file:///notes/a.txt", mime_type="text/plain", text="secret")
    return [
        ImageContent(type="image", data=png, mime_type="image/png"),
        EmbeddedResource(type="resource", resource=resource),
        TextContent(type="text", text="a chart"),
    ]


if __name__ == "__main__":
    if sys.argv[1:2] == ["http"]:
        server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
    else:
        server.run("stdio")
