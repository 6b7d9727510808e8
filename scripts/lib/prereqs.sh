# Sourced by scripts/demo and scripts/test: installs the Debian/Ubuntu packages a command needs
# when they are missing (as root, or through sudo), or says exactly what to install.
#
#   need_build_tools     a C compiler and libclang: `ring`, the bundled SQLite and pg_query
#                        (tollgate-policy's SQL parser, whose bindings bindgen makes) build C;
#                        pkg-config, libxml2-dev, libxmlsec1-dev and libssl-dev: samael (the
#                        SAML library of tollgate-identity) links libxmlsec1 for XML signatures
#   need_postgres        PostgreSQL server binaries (initdb, pg_ctl), psql and pgbench
#   need_test_tools      openssl, python3 and python3-httpx (certificates and clients made by
#                        the tests), node and npm (the OpenID provider of tests/oidc.rs, the
#                        reference MCP SDK of tests/mcp.rs), chromium and chromium-driver (the
#                        browser of tests/console.rs), xmlsec1 (pysaml2, the SAML IdP of
#                        tests/saml.rs, signs with it)
#   need_mariadb         MariaDB server binaries (mariadbd, mariadb-install-db) and the mariadb
#                        client: the throwaway TLS MariaDB of the MySQL tests and the demo
#   need_mysql_clients   what the MySQL client matrix (tests/mysql_clients.rs) runs besides the
#                        mariadb client: a JDK and MariaDB Connector/J (libmariadb-java), and
#                        python3 venv (PyMySQL, mysql-connector-python and node mysql2 are
#                        installed by the tests under target/tmp)
#   need_pg_clients      what the PostgreSQL driver tests (tests/pg_pool_clients.rs) run: a JDK and
#                        the PostgreSQL JDBC driver (libpostgresql-jdbc-java), python3 venv
#                        (psycopg and asyncpg are installed by pip, node-pg by npm, under
#                        target/tmp)
#   need_sysbench        sysbench, for scripts/bench-mysql
#   need_haproxy         HAProxy (TCP mode), the load balancer of scripts/bench-replicas
#   need_python_httpx    httpx for a python3 on PATH that is not the system's (after install)
#   need_python_pysaml2  pysaml2 (PyPI) for the python3 on PATH: the IdP of tests/saml.rs
#   install_needed       installs what the calls above found missing
#   need_cargo           fails with a hint when there is no Rust toolchain

missing=()

need_build_tools() {
  command -v cc >/dev/null 2>&1 || missing+=(gcc libc6-dev)
  # libclang-dev: the library bindgen loads and the headers it parses with.
  [ -n "${LIBCLANG_PATH:-}" ] || ls /usr/lib/llvm-*/lib/libclang.so >/dev/null 2>&1 || missing+=(libclang-dev)
  # samael's xmlsec feature: bindgen over libxmlsec1's headers, found with pkg-config.
  command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
  pkg-config --exists libxml-2.0 2>/dev/null || missing+=(libxml2-dev)
  pkg-config --exists xmlsec1 2>/dev/null || missing+=(libxmlsec1-dev)
  pkg-config --exists openssl 2>/dev/null || missing+=(libssl-dev)
}

need_postgres() {
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
  ls /usr/lib/postgresql/*/bin/pgbench >/dev/null 2>&1 || missing+=(postgresql-contrib)
  command -v psql >/dev/null 2>&1 || missing+=(postgresql-client)
}

need_test_tools() {
  command -v openssl >/dev/null 2>&1 || missing+=(openssl)
  command -v python3 >/dev/null 2>&1 || missing+=(python3)
  # httpx: the Python client of the HTTP resource tests (tests/http_attacks.rs).
  /usr/bin/python3 -c 'import httpx' >/dev/null 2>&1 || missing+=(python3-httpx)
  # node and npm: tests/oidc.rs runs npm oidc-provider, tests/mcp.rs the MCP SDK (installed by
  # the tests under target/).
  command -v node >/dev/null 2>&1 || missing+=(nodejs)
  command -v npm >/dev/null 2>&1 || missing+=(npm)
  # A real browser for the web console tests, driven over WebDriver (tests/console.rs).
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
  command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
  # The SAML IdP of tests/saml.rs (pysaml2) signs and verifies with the xmlsec1 program.
  command -v xmlsec1 >/dev/null 2>&1 || missing+=(xmlsec1)
}

need_mariadb() {
  { [ -x /usr/sbin/mariadbd ] || command -v mariadbd >/dev/null 2>&1; } || missing+=(mariadb-server)
  command -v mariadb-install-db >/dev/null 2>&1 || missing+=(mariadb-server)
  command -v mariadb >/dev/null 2>&1 || missing+=(mariadb-client)
}

need_mysql_clients() {
  command -v javac >/dev/null 2>&1 || missing+=(default-jdk-headless)
  ls /usr/share/java/mariadb-java-client.jar >/dev/null 2>&1 || missing+=(libmariadb-java)
  python3 -c 'import ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
}

need_pg_clients() {
  command -v javac >/dev/null 2>&1 || missing+=(default-jdk-headless)
  ls /usr/share/java/postgresql.jar >/dev/null 2>&1 || missing+=(libpostgresql-jdbc-java)
  python3 -c 'import ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
}

need_sysbench() {
  command -v sysbench >/dev/null 2>&1 || missing+=(sysbench)
}

need_haproxy() {
  { command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ]; } || missing+=(haproxy)
}

# After install_needed: a python3 first on PATH that is not the system's (pyenv, a venv) gets
# httpx from pip; the tests fall back to /usr/bin/python3 when that fails.
need_python_httpx() {
  python3 -c 'import httpx' >/dev/null 2>&1 && return 0
  python3 -m pip install --quiet httpx >/dev/null 2>&1 \
    || echo "note: $(command -v python3) cannot import httpx; the tests use /usr/bin/python3" >&2
}

# After install_needed: pysaml2 for the python3 on PATH (tests/saml.rs also installs it when
# missing, for runs that do not come through scripts/test).
need_python_pysaml2() {
  python3 -c 'import saml2' >/dev/null 2>&1 && return 0
  python3 -m pip install --quiet pysaml2 >/dev/null 2>&1 \
    || echo "note: $(command -v python3) cannot import saml2 (pip install pysaml2); tests/saml.rs will fail" >&2
}

install_needed() {
  [ ${#missing[@]} -gt 0 ] || return 0
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "tollgate needs: ${missing[*]} (Debian/Ubuntu package names). Install them and re-run." >&2
    exit 1
  fi
  local sudo=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
      echo "missing packages: ${missing[*]}; as root run: apt-get update && apt-get install -y ${missing[*]}" >&2
      exit 1
    fi
  fi
  echo "installing: ${missing[*]}" >&2
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
  missing=()
}

need_cargo() {
  if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo not found: install a Rust toolchain (https://rustup.rs) and re-run." >&2
    exit 1
  fi
}
