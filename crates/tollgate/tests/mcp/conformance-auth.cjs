// Preloaded (node --require) into the @modelcontextprotocol/conformance CLI: its server
// scenarios send no credential and it has no option for one, so every request of this
// process to MCP_URL's origin carries the agent's service token as a bearer token. Requests
// to any other origin are left as they are.
'use strict';
const origin = new URL(process.env.MCP_URL).origin;
const bearer = `Bearer ${process.env.MCP_TOKEN}`;
const fetchOf = globalThis.fetch;
globalThis.fetch = (input, init = {}) => {
  const request = input instanceof Request ? input : null;
  if (new URL(request ? request.url : input).origin !== origin) return fetchOf(input, init);
  const headers = new Headers(init.headers ?? request?.headers);
  headers.set('authorization', bearer);
  return fetchOf(input, { ...init, headers });
};
