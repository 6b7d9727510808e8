// An MCP client made with the reference SDK (StreamableHTTPClientTransport), for tests/mcp.rs:
// connects to MCP_URL with "Authorization: Bearer MCP_TOKEN" (trusting NODE_EXTRA_CA_CERTS),
// runs the operations of argv[2] (a JSON array of {"op": "list"} and
// {"op": "call", "name": ..., "arguments": {...}, "timeout": ms, "progress": bool}) in order and prints one JSON line for each:
// {"tools": [names]}, {"result": ...} or {"error": message, "code": n, "data": ...}.
// Log notifications the server sends are appended to NOTES_FILE.
const fs = require('node:fs');
const { Client } = require('@modelcontextprotocol/sdk/client/index.js');
const { StreamableHTTPClientTransport } = require('@modelcontextprotocol/sdk/client/streamableHttp.js');
const { LoggingMessageNotificationSchema } = require('@modelcontextprotocol/sdk/types.js');

async function main() {
  const ops = JSON.parse(process.argv[2]);
  const transport = new StreamableHTTPClientTransport(new URL(process.env.MCP_URL), {
    requestInit: { headers: { Authorization: `Bearer ${process.env.MCP_TOKEN}` } },
  });
  const client = new Client({ name: 'tollgate-test', version: '1.0.0' });
  client.setNotificationHandler(LoggingMessageNotificationSchema, (n) => {
    fs.appendFileSync(process.env.NOTES_FILE, JSON.stringify(n.params) + '\n');
  });
  await client.connect(transport);
  console.log(JSON.stringify({ session: transport.sessionId, protocol: transport.protocolVersion }));
  for (const op of ops) {
    try {
      if (op.op === 'list') {
        const r = await client.listTools();
        console.log(JSON.stringify({ tools: r.tools.map((t) => t.name) }));
      } else {
        // With "progress": the SDK sends a progress token and its timeout ("timeout", ms)
        // restarts at each progress notification.
        let progress = 0;
        const opts = { timeout: op.timeout ?? 60000 };
        if (op.progress) {
          opts.onprogress = () => {
            progress++;
          };
          opts.resetTimeoutOnProgress = true;
        }
        const r = await client.callTool({ name: op.name, arguments: op.arguments }, undefined, opts);
        console.log(JSON.stringify(op.progress ? { result: r, progress } : { result: r }));
      }
    } catch (e) {
      console.log(JSON.stringify({ error: e.message, code: e.code, data: e.data }));
    }
  }
  // MCP_TERMINATE=1: end the session (DELETE) before closing.
  if (process.env.MCP_TERMINATE === '1') await transport.terminateSession();
  await client.close();
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
