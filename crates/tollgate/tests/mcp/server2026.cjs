// A stateless MCP server (protocol revision 2026-07-28) made with the reference SDK's v2
// (`@modelcontextprotocol/server`, createMcpHandler), served over HTTPS with the test PKI's
// certificate, for tests/mcp.rs. Like server.cjs it answers only requests carrying the
// credential the gateway injects (EXPECT_AUTH), appends each tool call it runs to CALLS_FILE
// and prints {"port": N} once listening.
const https = require('node:https');
const fs = require('node:fs');
const { McpServer, createMcpHandler } = require('@modelcontextprotocol/server');
const { z } = require('zod');

function ran(tool, args) {
  fs.appendFileSync(process.env.CALLS_FILE, JSON.stringify({ tool, args }) + '\n');
}

function factory() {
  const server = new McpServer({ name: 'tickets-2026', version: '1.0.0' });
  server.registerTool(
    'lookup_customer',
    { description: 'Look a customer up by id', inputSchema: z.object({ id: z.string() }) },
    async ({ id }) => {
      ran('lookup_customer', { id });
      return { content: [{ type: 'text', text: `Customer ${id}: Ada Lovelace <ada@example.com>` }] };
    },
  );
  server.registerTool(
    'delete_ticket',
    { description: 'Delete a ticket', inputSchema: z.object({ project: z.string(), id: z.string() }) },
    async (args) => {
      ran('delete_ticket', args);
      return { content: [{ type: 'text', text: `deleted ${args.project}/${args.id}` }] };
    },
  );
  server.registerTool(
    'echo',
    { description: 'Echo a text back', inputSchema: z.object({ text: z.string() }) },
    async ({ text }) => {
      ran('echo', { text });
      return { content: [{ type: 'text', text }] };
    },
  );
  return server;
}

const handler = createMcpHandler(factory);
const [cert, key] = [process.env.TLS_CERT, process.env.TLS_KEY].map((p) => fs.readFileSync(p));
const srv = https.createServer({ cert, key }, async (req, res) => {
  try {
    if (req.headers.authorization !== process.env.EXPECT_AUTH) {
      res.writeHead(401, { 'content-type': 'text/plain' }).end('missing or wrong credential');
      return;
    }
    const chunks = [];
    for await (const c of req) chunks.push(c);
    const headers = new Headers();
    for (const [k, v] of Object.entries(req.headers)) {
      for (const one of Array.isArray(v) ? v : [v]) headers.append(k, one);
    }
    const request = new Request(`https://localhost${req.url}`, {
      method: req.method,
      headers,
      body: req.method === 'GET' || req.method === 'HEAD' ? undefined : Buffer.concat(chunks),
    });
    const r = await handler.fetch(request);
    res.writeHead(r.status, Object.fromEntries(r.headers));
    if (r.body) for await (const chunk of r.body) res.write(chunk);
    res.end();
  } catch (e) {
    console.error(e);
    if (!res.headersSent) res.writeHead(500).end(String(e));
  }
});
srv.listen(0, '127.0.0.1', () => {
  console.log(JSON.stringify({ port: srv.address().port }));
});
