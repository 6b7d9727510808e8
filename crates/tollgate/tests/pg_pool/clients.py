"""PostgreSQL drivers through a transaction-pooled resource (tests/pg_pool_clients.rs).

Usage: python clients.py psycopg|asyncpg; the connection and the scenario come as JSON in
$TG_PG_POOL. Several clients at once each run the scenario (see scenario_steps in the Rust test)
and the script prints one JSON object: per client what it saw.
"""
import asyncio
import json
import os
import ssl
import sys

DRIVER = sys.argv[1]
CFG = json.loads(os.environ["TG_PG_POOL"])
C = CFG["conn"]
TABLE = CFG["table"]


def sqlstate(e):
    return getattr(e, "sqlstate", None) or getattr(getattr(e, "diag", None), "sqlstate", None)


# ---- psycopg 3 (libpq): server-side prepared statements with prepare=True ----

def psycopg_client(i):
    import psycopg
    conn = psycopg.connect(host=C["host"], port=C["port"], dbname=C["dbname"], user=C["user"],
                           sslmode="verify-full", sslrootcert=C["ca"], sslcert=C["cert"],
                           sslkey=C["key"], autocommit=True)
    out = {"values": [], "pids": [], "errors": [], "after_error": []}
    q = "SELECT %s::int * 2, pg_backend_pid()"
    for r in range(CFG["rounds"]):
        v, pid = conn.execute(q, (i * 100 + r,), prepare=True).fetchone()
        out["values"].append(v)
        out["pids"].append(pid)
        with conn.transaction():
            for _ in range(2):
                conn.execute(f"INSERT INTO {TABLE} (client, round) VALUES (%s, %s)", (i, r),
                             prepare=True)
        try:
            with conn.transaction():
                conn.execute(f"INSERT INTO {TABLE} (client, round) VALUES (%s, %s)", (i, -1))
                conn.execute("SELECT 1 / %s::int", (0,))
        except psycopg.Error as e:
            out["errors"].append(sqlstate(e))
        try:
            conn.execute("SELECT %s::int / 0", (r,), prepare=True)
        except psycopg.Error as e:
            out["errors"].append(sqlstate(e))
        out["after_error"].append(conn.execute(q, (r,), prepare=True).fetchone()[0])
    out["count"] = conn.execute(f"SELECT count(*) FROM {TABLE} WHERE client = %s",
                                (i,)).fetchone()[0]
    conn.close()
    return out


def run_psycopg():
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(CFG["clients"]) as ex:
        return list(ex.map(psycopg_client, range(CFG["clients"])))


# ---- asyncpg: its statement cache (named statements, the default) and its Pool ----

def tls_context():
    ctx = ssl.create_default_context(cafile=C["ca"])
    ctx.check_hostname = True
    ctx.load_cert_chain(C["cert"], C["key"])
    return ctx


async def asyncpg_client(pool, i):
    import asyncpg
    out = {"values": [], "pids": [], "errors": [], "after_error": []}
    q = "SELECT $1::int * 2, pg_backend_pid()"
    for r in range(CFG["rounds"]):
        # A connection from asyncpg's own pool each round: released with its reset query.
        async with pool.acquire() as conn:
            row = await conn.fetchrow(q, i * 100 + r)
            out["values"].append(row[0])
            out["pids"].append(row[1])
            async with conn.transaction():
                for _ in range(2):
                    await conn.execute(f"INSERT INTO {TABLE} (client, round) VALUES ($1, $2)",
                                       i, r)
            try:
                async with conn.transaction():
                    await conn.execute(f"INSERT INTO {TABLE} (client, round) VALUES ($1, $2)",
                                       i, -1)
                    await conn.fetchval("SELECT 1 / $1::int", 0)
            except asyncpg.PostgresError as e:
                out["errors"].append(e.sqlstate)
            try:
                await conn.fetchval("SELECT $1::int / 0", r)
            except asyncpg.PostgresError as e:
                out["errors"].append(e.sqlstate)
            out["after_error"].append((await conn.fetchrow(q, r))[0])
    async with pool.acquire() as conn:
        out["count"] = await conn.fetchval(f"SELECT count(*) FROM {TABLE} WHERE client = $1", i)
    return out


async def run_asyncpg_async():
    import asyncpg
    n = CFG["clients"]
    pool = await asyncpg.create_pool(host=C["host"], port=C["port"], database=C["dbname"],
                                     user=C["user"], ssl=tls_context(), min_size=n, max_size=n)
    try:
        return await asyncio.gather(*(asyncpg_client(pool, i) for i in range(n)))
    finally:
        await pool.close()


def main():
    clients = run_psycopg() if DRIVER == "psycopg" else asyncio.run(run_asyncpg_async())
    print(json.dumps({"clients": clients}))


main()
