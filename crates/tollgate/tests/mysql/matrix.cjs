// The MySQL client matrix for node mysql2 (tests/mysql_clients.rs): same scenarios and output
// as matrix.py. The connection and the scenario data come as JSON in $TG_MYSQL_MATRIX; mysql2
// is found through NODE_PATH (installed by the test under target/tmp).
'use strict';
const crypto = require('crypto');
const fs = require('fs');
const mysql = require('mysql2/promise');

const CFG = JSON.parse(process.env.TG_MYSQL_MATRIX);
const COLUMNS = CFG.columns;
const NAMES = COLUMNS.map(([name]) => name).join(', ');

function connect() {
  const c = CFG.conn;
  const ssl = { ca: fs.readFileSync(c.ca), rejectUnauthorized: true };
  if (c.cert) {
    ssl.cert = fs.readFileSync(c.cert);
    ssl.key = fs.readFileSync(c.key);
  }
  return mysql.createConnection({
    host: c.host, port: c.port, user: c.user, password: c.password || '', database: c.database,
    ssl, charset: 'UTF8MB4_GENERAL_CI', supportBigNumbers: true, bigNumberStrings: true,
    dateStrings: true, maxPreparedStatements: 64,
  });
}

function canon(value, kind) {
  if (value === null || value === undefined) return null;
  if (kind === 'blob') return Buffer.from(value).toString('hex');
  // mysql2 parses JSON columns itself (MariaDB marks them in the extended metadata).
  if (kind === 'json' && typeof value !== 'string' && !Buffer.isBuffer(value)) {
    return JSON.stringify(value);
  }
  if (kind === 'datetime' && value.length === 19) return value + '.000000';
  if (Buffer.isBuffer(value)) return value.toString('utf8');
  return String(value);
}

function native(text, kind) {
  if (text === null) return null;
  return kind === 'blob' ? Buffer.from(text, 'hex') : text;
}

const rowsOf = (rows) => rows.map((row) => COLUMNS.map(([name, kind]) => canon(row[name], kind)));
const query = (conn, prepared, sql, params) =>
  prepared ? conn.execute(sql, params || []) : conn.query(sql, params);
const errorOf = (e) => ({ code: e.errno, sqlstate: e.sqlState, message: e.message });

async function session(conn) {
  const [rows] = await conn.query(
    "SELECT CURRENT_USER() AS u, DATABASE() AS d, @@character_set_client AS c, " +
    "(SELECT VARIABLE_VALUE FROM information_schema.SESSION_STATUS " +
    "WHERE VARIABLE_NAME = 'SSL_VERSION') AS t");
  return { user: rows[0].u, database: rows[0].d, charset: rows[0].c, tls: rows[0].t };
}

async function types(conn, prepared) {
  const [rows] = await query(conn, prepared, `SELECT ${NAMES} FROM types ORDER BY id`);
  return rowsOf(rows);
}

async function params(conn, prepared) {
  await conn.query('CREATE TEMPORARY TABLE p LIKE types');
  const marks = COLUMNS.map(() => '?').join(', ');
  for (const row of CFG.rows) {
    await query(conn, prepared, `INSERT INTO p (${NAMES}) VALUES (${marks})`,
      row.map((v, i) => native(v, COLUMNS[i][1])));
  }
  const [rows] = await query(conn, prepared, `SELECT ${NAMES} FROM p WHERE id > ? ORDER BY id`, [0]);
  return rowsOf(rows);
}

async function transactions(conn) {
  await conn.query('CREATE TEMPORARY TABLE tx (n INT) ENGINE=InnoDB');
  await conn.beginTransaction();
  await conn.query('INSERT INTO tx VALUES (1)');
  await conn.rollback();
  const [[a]] = await conn.query('SELECT COUNT(*) AS n FROM tx');
  await conn.beginTransaction();
  await conn.query('INSERT INTO tx VALUES (2)');
  await conn.commit();
  const [[b]] = await conn.query('SELECT COALESCE(SUM(n), 0) AS n FROM tx');
  return [Number(a.n), Number(b.n)];
}

async function errors(conn) {
  const found = [];
  await conn.query('CREATE TEMPORARY TABLE uq (k INT PRIMARY KEY)');
  await conn.query('INSERT INTO uq VALUES (1)');
  for (const sql of ['SELEC 1', 'INSERT INTO uq VALUES (1)', 'SELECT * FROM no_such_table']) {
    try {
      await conn.query(sql);
      found.push({ 'no error': sql });
    } catch (e) {
      found.push(errorOf(e));
    }
  }
  const [[row]] = await conn.query("SELECT 'still usable' AS s");
  found.push(row.s);
  return found;
}

async function large(conn, prepared) {
  const size = CFG.large_bytes;
  const blob = Buffer.alloc(size);
  for (let i = 0; i < size; i++) blob[i] = i % 251;
  await conn.query('CREATE TEMPORARY TABLE big (b LONGBLOB)');
  await query(conn, prepared, 'INSERT INTO big VALUES (?)', [blob]);
  const [[row]] = await query(conn, prepared, 'SELECT b, LENGTH(b) AS len, SHA2(b, 256) AS sha FROM big');
  const [[rep]] = await conn.query(`SELECT REPEAT('x', ${size}) AS r`);
  const sha = (b) => crypto.createHash('sha256').update(b).digest('hex');
  return {
    sent_sha256: sha(blob), server_length: Number(row.len), server_sha256: String(row.sha),
    received_length: row.b.length, received_sha256: sha(row.b), repeat_length: rep.r.length,
  };
}

async function many() {
  const conns = await Promise.all(Array.from({ length: CFG.many }, connect));
  const ids = new Set();
  for (const conn of conns) {
    const [[row]] = await conn.query('SELECT 1 + 1 AS two');
    if (Number(row.two) !== 2) throw new Error('1 + 1 != 2');
    ids.add(conn.threadId);
  }
  await Promise.all(conns.map((c) => c.end()));
  return { connections: conns.length, distinct_thread_ids: ids.size };
}

async function cancel() {
  const victim = await connect();
  const killer = await connect();
  const result = {};
  const sleeping = victim.query(`SELECT SLEEP(${CFG.cancel_sleep}) AS s, '${CFG.cancel_marker}' AS m`)
    .then(([[row]]) => { result.sleep = Number(row.s); }, (e) => { result.error = errorOf(e); });
  for (;;) { // the query is running once the server lists it
    const [[row]] = await killer.query(
      'SELECT COUNT(*) AS n FROM information_schema.PROCESSLIST WHERE INFO LIKE ? AND INFO NOT LIKE ?',
      [`%${CFG.cancel_marker}%`, '%PROCESSLIST%']);
    if (Number(row.n) > 0) break;
  }
  await killer.query(`KILL QUERY ${victim.threadId}`);
  await sleeping;
  const [[row]] = await victim.query("SELECT 'after cancel' AS a");
  result.after = row.a;
  await victim.end();
  await killer.end();
  return result;
}

async function run(out, name, fn) {
  try {
    out[name] = await fn();
  } catch (e) {
    out[name] = { exception: String(e && e.stack || e) };
  }
}

(async () => {
  const out = {};
  const conn = await connect();
  await run(out, 'session', () => session(conn));
  await run(out, 'types_text', () => types(conn, false));
  await run(out, 'types_binary', () => types(conn, true));
  await run(out, 'params', () => params(conn, true));
  await run(out, 'transactions', async () => transactions(await connect()));
  await run(out, 'errors', async () => errors(await connect()));
  await run(out, 'large', async () => large(await connect(), true));
  await run(out, 'many', many);
  await run(out, 'cancel', cancel);
  console.log(JSON.stringify(out));
  process.exit(0);
})().catch((e) => { console.error(e); process.exit(1); });
