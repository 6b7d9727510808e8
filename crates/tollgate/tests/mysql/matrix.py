"""The MySQL client matrix for PyMySQL and mysql-connector-python (tests/mysql_clients.rs).

Usage: python matrix.py pymysql|connector; the connection and the scenario data come as JSON in
$TG_MYSQL_MATRIX. Prints one JSON object: scenario name -> what the driver saw, values in the
canonical text forms the Rust test compares (ints and decimals as digits, dates ISO, blobs hex,
JSON columns as the text the driver returned, NULL as null).
"""
import datetime
import decimal
import hashlib
import json
import os
import sys
import threading

DRIVER = sys.argv[1]
CFG = json.loads(os.environ["TG_MYSQL_MATRIX"])
COLUMNS = CFG["columns"]  # name, kind
if DRIVER == "pymysql":
    import pymysql as db_api
else:
    import mysql.connector as db_api


def connect(**extra):
    c = CFG["conn"]
    if DRIVER == "pymysql":
        # ssl_verify_identity implies verifying the chain against ssl_ca.
        return db_api.connect(host=c["host"], port=c["port"], user=c["user"],
                              password=c.get("password") or "", database=c["database"],
                              ssl_ca=c["ca"], ssl_cert=c.get("cert"), ssl_key=c.get("key"),
                              ssl_verify_identity=True, charset="utf8mb4",
                              max_allowed_packet=64 << 20, **extra)
    args = dict(host=c["host"], port=c["port"], user=c["user"], password=c.get("password") or "",
                database=c["database"], ssl_ca=c["ca"], ssl_verify_cert=True,
                ssl_verify_identity=True, charset="utf8mb4", use_pure=True)
    if c.get("cert"):
        args.update(ssl_cert=c["cert"], ssl_key=c["key"])
    args.update(extra)
    return db_api.connect(**args)


def thread_id(conn):
    return conn.thread_id() if DRIVER == "pymysql" else conn.connection_id


def canon(value, kind):
    if value is None:
        return None
    if kind == "blob":
        return bytes(value).hex()
    if kind == "json":
        return value.decode() if isinstance(value, (bytes, bytearray)) else value
    if kind == "datetime":
        return value.strftime("%Y-%m-%d %H:%M:%S.%f")
    if kind == "time":
        secs = int(value.total_seconds())
        return "%02d:%02d:%02d" % (secs // 3600, secs // 60 % 60, secs % 60)
    if isinstance(value, (bytes, bytearray)):
        return value.decode()
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, decimal.Decimal):
        return format(value, "f")
    return str(value)


def native(text, kind):
    if text is None:
        return None
    return {
        "int": int,
        "decimal": decimal.Decimal,
        "double": float,
        "date": datetime.date.fromisoformat,
        "datetime": lambda t: datetime.datetime.strptime(t, "%Y-%m-%d %H:%M:%S.%f"),
        "time": lambda t: datetime.timedelta(
            hours=int(t[:2]), minutes=int(t[3:5]), seconds=int(t[6:8])),
        "blob": bytes.fromhex,
    }.get(kind, lambda t: t)(text)


def rows_of(cursor):
    return [[canon(v, COLUMNS[i][1]) for i, v in enumerate(row)] for row in cursor.fetchall()]


def cursor(conn, prepared):
    return conn.cursor(prepared=True) if prepared else conn.cursor()


def error_of(e):
    code = e.args[0] if DRIVER == "pymysql" else e.errno
    state = None if DRIVER == "pymysql" else e.sqlstate
    return {"code": code, "sqlstate": state, "message": str(e)}


def run(out, name, fn):
    try:
        out[name] = fn()
    except Exception as e:  # the Rust test prints what failed
        out[name] = {"exception": repr(e)}


def session(conn):
    cur = conn.cursor()
    cur.execute("SELECT CURRENT_USER(), DATABASE(), @@character_set_client, "
                "(SELECT VARIABLE_VALUE FROM information_schema.SESSION_STATUS "
                "WHERE VARIABLE_NAME = 'SSL_VERSION')")
    user, database, charset, tls = cur.fetchone()
    return {"user": user, "database": database, "charset": charset, "tls": tls}


def types(conn, prepared):
    cur = cursor(conn, prepared)
    cur.execute("SELECT %s FROM types ORDER BY id" % ", ".join(c for c, _ in COLUMNS))
    return rows_of(cur)


def params(conn, prepared):
    names = ", ".join(c for c, _ in COLUMNS)
    cur = conn.cursor()
    cur.execute("CREATE TEMPORARY TABLE p LIKE types")
    cur = cursor(conn, prepared)
    marks = ", ".join(["%s"] * len(COLUMNS))
    for row in CFG["rows"]:
        cur.execute("INSERT INTO p (%s) VALUES (%s)" % (names, marks),
                    [native(v, COLUMNS[i][1]) for i, v in enumerate(row)])
    conn.commit()
    cur.execute("SELECT %s FROM p WHERE id > %%s ORDER BY id" % names, (0,))
    return rows_of(cur)


def transactions(conn):
    cur = conn.cursor()
    cur.execute("CREATE TEMPORARY TABLE tx (n INT) ENGINE=InnoDB")
    if DRIVER == "pymysql":
        conn.autocommit(False)
    else:
        conn.autocommit = False
    cur.execute("INSERT INTO tx VALUES (1)")
    conn.rollback()
    cur.execute("SELECT COUNT(*) FROM tx")
    after_rollback = cur.fetchone()[0]
    cur.execute("INSERT INTO tx VALUES (2)")
    conn.commit()
    cur.execute("SELECT COALESCE(SUM(n), 0) FROM tx")
    after_commit = int(cur.fetchone()[0])
    return [after_rollback, after_commit]


def errors(conn):
    found = []
    cur = conn.cursor()
    cur.execute("CREATE TEMPORARY TABLE uq (k INT PRIMARY KEY)")
    cur.execute("INSERT INTO uq VALUES (1)")
    for sql in ["SELEC 1", "INSERT INTO uq VALUES (1)", "SELECT * FROM no_such_table"]:
        try:
            cur.execute(sql)
            found.append({"no error": sql})
        except db_api.Error as e:
            found.append(error_of(e))
    cur.execute("SELECT 'still usable'")
    found.append(cur.fetchone()[0])
    return found


def large(conn, prepared):
    size = CFG["large_bytes"]
    blob = bytes(i % 251 for i in range(size))
    cur = conn.cursor()
    cur.execute("CREATE TEMPORARY TABLE big (b LONGBLOB)")
    cur = cursor(conn, prepared)
    cur.execute("INSERT INTO big VALUES (%s)", (blob,))
    conn.commit()
    # Read back over the text protocol: mysql-connector-python's pure binary-row reader
    # cannot parse a row split over several packets (struct.error), a driver limitation.
    cur = conn.cursor()
    cur.execute("SELECT b, LENGTH(b), SHA2(b, 256) FROM big")
    back, server_len, server_sha = cur.fetchone()
    back = bytes(back)
    cur.execute("SELECT REPEAT('x', %s)" % size)
    repeated = cur.fetchone()[0]
    return {"sent_sha256": hashlib.sha256(blob).hexdigest(),
            "server_length": int(server_len),
            "server_sha256": server_sha if isinstance(server_sha, str) else server_sha.decode(),
            "received_length": len(back),
            "received_sha256": hashlib.sha256(back).hexdigest(),
            "repeat_length": len(repeated)}


def many():
    n = CFG["many"]
    conns = [connect() for _ in range(n)]
    ids = set()
    for conn in conns:
        cur = conn.cursor()
        cur.execute("SELECT 1 + 1")
        assert cur.fetchone()[0] == 2
        ids.add(thread_id(conn))
    for conn in conns:
        conn.close()
    return {"connections": n, "distinct_thread_ids": len(ids)}


def cancel():
    marker = CFG["cancel_marker"]
    victim = connect()
    killer = connect()
    result = {}

    def sleep():
        cur = victim.cursor()
        try:
            cur.execute("SELECT SLEEP(%s), '%s'" % (CFG["cancel_sleep"], marker))
            result["sleep"] = int(cur.fetchone()[0])
        except db_api.Error as e:
            result["error"] = error_of(e)

    worker = threading.Thread(target=sleep)
    worker.start()
    kcur = killer.cursor()
    while True:  # the query is running once the server lists it
        kcur.execute("SELECT COUNT(*) FROM information_schema.PROCESSLIST "
                     "WHERE INFO LIKE %s AND INFO NOT LIKE %s",
                     ("%" + marker + "%", "%PROCESSLIST%"))
        if kcur.fetchone()[0] > 0:
            break
    kcur.execute("KILL QUERY %d" % thread_id(victim))
    worker.join()
    cur = victim.cursor()
    cur.execute("SELECT 'after cancel'")
    result["after"] = cur.fetchone()[0]
    return result


def main():
    out = {}
    conn = connect()
    prepared = DRIVER == "connector"  # PyMySQL has no server-side prepared statements
    run(out, "session", lambda: session(conn))
    run(out, "types_text", lambda: types(conn, False))
    if prepared:
        run(out, "types_binary", lambda: types(conn, True))
    run(out, "params", lambda: params(conn, prepared))
    run(out, "transactions", lambda: transactions(connect()))
    run(out, "errors", lambda: errors(connect()))
    run(out, "large", lambda: large(connect(), prepared))
    run(out, "many", many)
    run(out, "cancel", cancel)
    print(json.dumps(out))


main()
