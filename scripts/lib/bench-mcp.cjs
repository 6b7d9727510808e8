// MCP benchmark driver (scripts/bench-mcp): tool calls per second and latency with the
// reference SDK client, straight to an MCP server and through the gateway, in the same run.
// Each of CONCURRENCY clients opens its own MCP session and calls `echo` in a loop for
// SECONDS (after WARMUP seconds not counted); the two targets alternate for ROUNDS rounds and
// the medians are compared. Prints a table, or JSON with --json.
//   env: DIRECT_URL, DIRECT_AUTH (the header value the server wants), GATEWAY_URL,
//        GATEWAY_TOKEN, NODE_EXTRA_CA_CERTS, MCP_BENCH_SECONDS, MCP_BENCH_WARMUP,
//        MCP_BENCH_ROUNDS, MCP_BENCH_CONCURRENCY (a list)
const { Client } = require('@modelcontextprotocol/sdk/client/index.js');
const { StreamableHTTPClientTransport } = require('@modelcontextprotocol/sdk/client/streamableHttp.js');

const env = (k, d) => process.env[k] ?? d;
const seconds = Number(env('MCP_BENCH_SECONDS', '5'));
const warmup = Number(env('MCP_BENCH_WARMUP', '1'));
const rounds = Number(env('MCP_BENCH_ROUNDS', '3'));
const levels = env('MCP_BENCH_CONCURRENCY', '1,8').split(',').map(Number);
const json = process.argv.includes('--json');

const targets = {
  direct: { url: env('DIRECT_URL'), auth: env('DIRECT_AUTH') },
  gateway: { url: env('GATEWAY_URL'), auth: `Bearer ${env('GATEWAY_TOKEN')}` },
};

async function connect(t) {
  const transport = new StreamableHTTPClientTransport(new URL(t.url), {
    requestInit: { headers: { Authorization: t.auth } },
  });
  const client = new Client({ name: 'bench', version: '1' });
  await client.connect(transport);
  return client;
}

async function worker(client, until, warmUntil, lat) {
  let n = 0;
  while (Date.now() < until) {
    const t0 = process.hrtime.bigint();
    const r = await client.callTool({ name: 'echo', arguments: { text: 'ping' } });
    if (r.content?.[0]?.text !== 'ping') throw new Error(`unexpected answer: ${JSON.stringify(r)}`);
    if (Date.now() >= warmUntil) {
      lat.push(Number(process.hrtime.bigint() - t0) / 1e6);
      n++;
    }
  }
  return n;
}

async function measure(t, c) {
  const clients = await Promise.all(Array.from({ length: c }, () => connect(t)));
  const warmUntil = Date.now() + warmup * 1000;
  const until = warmUntil + seconds * 1000;
  const lat = [];
  const counts = await Promise.all(clients.map((cl) => worker(cl, until, warmUntil, lat)));
  await Promise.all(clients.map((cl) => cl.close()));
  lat.sort((a, b) => a - b);
  const q = (p) => lat[Math.min(lat.length - 1, Math.floor(p * lat.length))];
  return { rate: counts.reduce((a, b) => a + b, 0) / seconds, p50: q(0.5), p99: q(0.99) };
}

const median = (v) => [...v].sort((a, b) => a - b)[Math.floor(v.length / 2)];

async function main() {
  const out = [];
  for (const c of levels) {
    const runs = { direct: [], gateway: [] };
    for (let r = 0; r < rounds; r++) {
      for (const name of ['direct', 'gateway']) {
        runs[name].push(await measure(targets[name], c));
      }
    }
    const m = (name, k) => median(runs[name].map((x) => x[k]));
    out.push({
      concurrency: c,
      direct: { calls_per_s: m('direct', 'rate'), p50_ms: m('direct', 'p50'), p99_ms: m('direct', 'p99') },
      gateway: { calls_per_s: m('gateway', 'rate'), p50_ms: m('gateway', 'p50'), p99_ms: m('gateway', 'p99') },
      ratio: m('gateway', 'rate') / m('direct', 'rate'),
      added_p50_ms: m('gateway', 'p50') - m('direct', 'p50'),
    });
  }
  if (json) {
    console.log(JSON.stringify({ seconds, warmup, rounds, results: out }, null, 2));
    return;
  }
  console.log(`MCP tools/call (echo), reference SDK client and server, ${rounds} rounds of ${seconds}s (medians)`);
  console.log('clients  direct calls/s  gateway calls/s  gateway/direct  p50 direct  p50 gateway  added p50');
  for (const r of out) {
    console.log(
      `${String(r.concurrency).padStart(7)}  ${r.direct.calls_per_s.toFixed(0).padStart(14)}  ${r.gateway.calls_per_s
        .toFixed(0)
        .padStart(15)}  ${r.ratio.toFixed(2).padStart(14)}  ${r.direct.p50_ms.toFixed(2).padStart(8)}ms  ${r.gateway.p50_ms
        .toFixed(2)
        .padStart(9)}ms  ${r.added_p50_ms.toFixed(2).padStart(7)}ms`,
    );
  }
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
