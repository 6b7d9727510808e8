// node-postgres (`pg`) through a transaction-pooled resource (tests/pg_pool_clients.rs): named
// queries (prepared once per connection, then only bound), transactions, errors and recovery,
// with several clients at once. Input JSON in $TG_PG_POOL; prints what each client saw.
const fs = require("fs");
const { Client } = require("pg");

const cfg = JSON.parse(process.env.TG_PG_POOL);
const c = cfg.conn;
const table = cfg.table;

async function client(i) {
  const conn = new Client({
    host: c.host, port: c.port, database: c.dbname, user: c.user,
    ssl: {
      ca: fs.readFileSync(c.ca), cert: fs.readFileSync(c.cert), key: fs.readFileSync(c.key),
      rejectUnauthorized: true, servername: c.host,
    },
  });
  await conn.connect();
  const out = { values: [], pids: [], errors: [], after_error: [] };
  const doubled = (v) => ({
    name: "doubled", text: "SELECT $1::int * 2 AS v, pg_backend_pid() AS pid", values: [v],
  });
  const insert = (r) => ({
    name: "insert", text: `INSERT INTO ${table} (client, round) VALUES ($1, $2)`, values: [i, r],
  });
  for (let r = 0; r < cfg.rounds; r++) {
    const row = (await conn.query(doubled(i * 100 + r))).rows[0];
    out.values.push(row.v);
    out.pids.push(row.pid);
    await conn.query("BEGIN");
    await conn.query(insert(r));
    await conn.query(insert(r));
    await conn.query("COMMIT");
    try {
      await conn.query("BEGIN");
      await conn.query(insert(-1));
      await conn.query({ name: "div", text: "SELECT 1 / $1::int", values: [0] });
    } catch (e) {
      out.errors.push(e.code);
      await conn.query("ROLLBACK");
    }
    try {
      await conn.query({ name: "div0", text: "SELECT $1::int / 0", values: [r] });
    } catch (e) {
      out.errors.push(e.code);
    }
    out.after_error.push((await conn.query(doubled(r))).rows[0].v);
  }
  const count = await conn.query(`SELECT count(*)::int AS n FROM ${table} WHERE client = $1`, [i]);
  out.count = count.rows[0].n;
  await conn.end();
  return out;
}

(async () => {
  const clients = await Promise.all([...Array(cfg.clients).keys()].map(client));
  console.log(JSON.stringify({ clients }));
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
