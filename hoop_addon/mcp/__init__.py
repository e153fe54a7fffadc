"""Model Context Protocol (MCP) over streamable HTTP: pure parsing and checks, no mitmproxy."""
