"""An MCP client made with the Python SDK (`mcp` from PyPI, streamable HTTP), for tests/mcp.rs.

Connects to MCP_URL with "Authorization: Bearer MCP_TOKEN", trusting the CA in MCP_CA, runs
the operations of argv[1] (a JSON array of {"op": "list"} and
{"op": "call", "name": ..., "arguments": {...}}) in order and prints one JSON line for each:
{"tools": [names]}, {"result": ...} or {"error": message, "code": n, "data": ...}. The first
line is {"protocol": the negotiated version}. The session is ended (DELETE) on the way out.
"""

import asyncio
import json
import os
import ssl
import sys

import httpx2
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError


async def main() -> None:
    ops = json.loads(sys.argv[1])
    tls = ssl.create_default_context(cafile=os.environ["MCP_CA"])
    headers = {"Authorization": f"Bearer {os.environ['MCP_TOKEN']}"}
    timeout = httpx2.Timeout(30, read=300)
    async with httpx2.AsyncClient(verify=tls, headers=headers, timeout=timeout) as http:
        async with streamable_http_client(os.environ["MCP_URL"], http_client=http) as streams:
            async with ClientSession(streams[0], streams[1]) as session:
                init = await session.initialize()
                print(json.dumps({"protocol": init.protocol_version}), flush=True)
                for op in ops:
                    try:
                        if op["op"] == "list":
                            r = await session.list_tools()
                            print(json.dumps({"tools": [t.name for t in r.tools]}), flush=True)
                        else:
                            r = await session.call_tool(op["name"], op["arguments"])
                            result = r.model_dump(mode="json", by_alias=True, exclude_none=True)
                            print(json.dumps({"result": result}), flush=True)
                    except MCPError as e:
                        print(json.dumps({"error": e.message, "code": e.code, "data": e.data}), flush=True)


asyncio.run(main())
