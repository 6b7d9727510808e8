// The MySQL client matrix for MariaDB Connector/J (JDBC; tests/mysql_clients.rs): same scenarios
// and output as matrix.py. Compiled at test time against the Debian libmariadb-java jar. The
// connection and the scenario data come as JSON in $TG_MYSQL_MATRIX, read here by a small parser
// (the JDK has none); the text protocol is Statement, the binary protocol PreparedStatement with
// useServerPrepStmts=true; cancel is Statement.cancel().
import java.math.BigDecimal;
import java.security.MessageDigest;
import java.sql.*;
import java.time.*;
import java.time.format.DateTimeFormatter;
import java.util.*;
import java.util.concurrent.atomic.AtomicReference;

public class Matrix {
    static Map<String, Object> cfg;
    static Map<String, Object> conn;
    static List<List<Object>> columns;
    static final DateTimeFormatter DT = DateTimeFormatter.ofPattern("yyyy-MM-dd HH:mm:ss.SSSSSS");

    public static void main(String[] args) throws Exception {
        cfg = (Map<String, Object>) new Json(System.getenv("TG_MYSQL_MATRIX")).value();
        conn = (Map<String, Object>) cfg.get("conn");
        columns = (List<List<Object>>) cfg.get("columns");
        Map<String, Object> out = new LinkedHashMap<>();
        Connection c = connect();
        run(out, "session", () -> session(c));
        run(out, "types_text", () -> types(c, false));
        run(out, "types_binary", () -> types(c, true));
        run(out, "params", () -> params(connect()));
        run(out, "transactions", () -> transactions(connect()));
        run(out, "errors", () -> errors(connect()));
        run(out, "large", () -> large(connect()));
        run(out, "many", Matrix::many);
        run(out, "cancel", Matrix::cancel);
        System.out.println(Json.write(out));
        System.exit(0);
    }

    interface Scenario { Object run() throws Exception; }

    static void run(Map<String, Object> out, String name, Scenario s) {
        try {
            out.put(name, s.run());
        } catch (Throwable e) {
            out.put(name, Map.of("exception", String.valueOf(e)));
        }
    }

    static Connection connect() throws SQLException {
        StringBuilder url = new StringBuilder("jdbc:mariadb://" + conn.get("host") + ":" + conn.get("port")
            + "/" + conn.get("database") + "?useSsl=true&useServerPrepStmts=true"
            + "&serverSslCert=" + conn.get("ca"));
        if (conn.get("p12") != null) {
            url.append("&keyStore=file://").append(conn.get("p12"))
               .append("&keyStorePassword=").append(conn.get("p12_password"))
               .append("&keyStoreType=PKCS12");
        }
        Properties p = new Properties();
        p.setProperty("user", (String) conn.get("user"));
        p.setProperty("password", conn.get("password") == null ? "" : (String) conn.get("password"));
        return DriverManager.getConnection(url.toString(), p);
    }

    static String names() {
        StringJoiner j = new StringJoiner(", ");
        for (List<Object> col : columns) j.add((String) col.get(0));
        return j.toString();
    }

    static String kind(int i) { return (String) columns.get(i).get(1); }

    static List<Object> rowsOf(ResultSet rs) throws Exception {
        List<Object> rows = new ArrayList<>();
        while (rs.next()) {
            List<Object> row = new ArrayList<>();
            for (int i = 0; i < columns.size(); i++) row.add(canon(rs, i + 1, kind(i)));
            rows.add(row);
        }
        return rows;
    }

    static String canon(ResultSet rs, int i, String kind) throws Exception {
        if (rs.getObject(i) == null) return null;
        switch (kind) {
            case "blob": return hex(rs.getBytes(i));
            case "decimal": return rs.getBigDecimal(i).toPlainString();
            case "double": return Double.toString(rs.getDouble(i));
            case "date": return rs.getObject(i, LocalDate.class).toString();
            case "datetime": return rs.getObject(i, LocalDateTime.class).format(DT);
            case "time": return rs.getTime(i).toLocalTime().format(DateTimeFormatter.ofPattern("HH:mm:ss"));
            default: return rs.getString(i);
        }
    }

    static void bind(PreparedStatement ps, int i, String v, String kind) throws Exception {
        if (v == null) { ps.setNull(i, Types.VARCHAR); return; }
        switch (kind) {
            case "int": ps.setBigDecimal(i, new BigDecimal(v)); break;
            case "decimal": ps.setBigDecimal(i, new BigDecimal(v)); break;
            case "double": ps.setDouble(i, Double.parseDouble(v)); break;
            case "date": ps.setObject(i, LocalDate.parse(v)); break;
            case "datetime": ps.setObject(i, LocalDateTime.parse(v, DT)); break;
            case "time": ps.setObject(i, LocalTime.parse(v)); break;
            case "blob": ps.setBytes(i, unhex(v)); break;
            default: ps.setString(i, v);
        }
    }

    static Object session(Connection c) throws Exception {
        try (Statement s = c.createStatement(); ResultSet rs = s.executeQuery(
                "SELECT CURRENT_USER(), DATABASE(), @@character_set_client, "
                + "(SELECT VARIABLE_VALUE FROM information_schema.SESSION_STATUS "
                + "WHERE VARIABLE_NAME = 'SSL_VERSION')")) {
            rs.next();
            Map<String, Object> m = new LinkedHashMap<>();
            m.put("user", rs.getString(1));
            m.put("database", rs.getString(2));
            m.put("charset", rs.getString(3));
            m.put("tls", rs.getString(4));
            return m;
        }
    }

    static Object types(Connection c, boolean prepared) throws Exception {
        String sql = "SELECT " + names() + " FROM types ORDER BY id";
        if (prepared) {
            try (PreparedStatement ps = c.prepareStatement(sql)) { return rowsOf(ps.executeQuery()); }
        }
        try (Statement s = c.createStatement()) { return rowsOf(s.executeQuery(sql)); }
    }

    static Object params(Connection c) throws Exception {
        try (Statement s = c.createStatement()) { s.execute("CREATE TEMPORARY TABLE p LIKE types"); }
        StringJoiner marks = new StringJoiner(", ");
        for (int i = 0; i < columns.size(); i++) marks.add("?");
        try (PreparedStatement ps = c.prepareStatement("INSERT INTO p (" + names() + ") VALUES (" + marks + ")")) {
            for (Object r : (List<Object>) cfg.get("rows")) {
                List<Object> row = (List<Object>) r;
                for (int i = 0; i < row.size(); i++) bind(ps, i + 1, (String) row.get(i), kind(i));
                ps.executeUpdate();
            }
        }
        try (PreparedStatement ps = c.prepareStatement("SELECT " + names() + " FROM p WHERE id > ? ORDER BY id")) {
            ps.setInt(1, 0);
            return rowsOf(ps.executeQuery());
        }
    }

    static long scalar(Connection c, String sql) throws SQLException {
        try (Statement s = c.createStatement(); ResultSet rs = s.executeQuery(sql)) {
            rs.next();
            return rs.getLong(1);
        }
    }

    static Object transactions(Connection c) throws Exception {
        try (Statement s = c.createStatement()) {
            s.execute("CREATE TEMPORARY TABLE tx (n INT) ENGINE=InnoDB");
            c.setAutoCommit(false);
            s.execute("INSERT INTO tx VALUES (1)");
            c.rollback();
            long a = scalar(c, "SELECT COUNT(*) FROM tx");
            s.execute("INSERT INTO tx VALUES (2)");
            c.commit();
            long b = scalar(c, "SELECT COALESCE(SUM(n), 0) FROM tx");
            return List.of(a, b);
        }
    }

    static Object errors(Connection c) throws Exception {
        List<Object> found = new ArrayList<>();
        try (Statement s = c.createStatement()) {
            s.execute("CREATE TEMPORARY TABLE uq (k INT PRIMARY KEY)");
            s.execute("INSERT INTO uq VALUES (1)");
            for (String sql : List.of("SELEC 1", "INSERT INTO uq VALUES (1)", "SELECT * FROM no_such_table")) {
                try {
                    s.execute(sql);
                    found.add(Map.of("no error", sql));
                } catch (SQLException e) {
                    Map<String, Object> m = new LinkedHashMap<>();
                    m.put("code", e.getErrorCode());
                    m.put("sqlstate", e.getSQLState());
                    m.put("message", e.getMessage());
                    found.add(m);
                }
            }
            try (ResultSet rs = s.executeQuery("SELECT 'still usable'")) {
                rs.next();
                found.add(rs.getString(1));
            }
        }
        return found;
    }

    static Object large(Connection c) throws Exception {
        int size = ((Number) cfg.get("large_bytes")).intValue();
        byte[] blob = new byte[size];
        for (int i = 0; i < size; i++) blob[i] = (byte) (i % 251);
        try (Statement s = c.createStatement()) { s.execute("CREATE TEMPORARY TABLE big (b LONGBLOB)"); }
        try (PreparedStatement ps = c.prepareStatement("INSERT INTO big VALUES (?)")) {
            ps.setBytes(1, blob);
            ps.executeUpdate();
        }
        Map<String, Object> m = new LinkedHashMap<>();
        m.put("sent_sha256", sha256(blob));
        try (PreparedStatement ps = c.prepareStatement("SELECT b, LENGTH(b), SHA2(b, 256) FROM big");
             ResultSet rs = ps.executeQuery()) {
            rs.next();
            byte[] back = rs.getBytes(1);
            m.put("server_length", rs.getLong(2));
            m.put("server_sha256", rs.getString(3));
            m.put("received_length", back.length);
            m.put("received_sha256", sha256(back));
        }
        try (Statement s = c.createStatement(); ResultSet rs = s.executeQuery("SELECT REPEAT('x', " + size + ")")) {
            rs.next();
            m.put("repeat_length", rs.getString(1).length());
        }
        return m;
    }

    static Object many() throws Exception {
        int n = ((Number) cfg.get("many")).intValue();
        List<Connection> conns = new ArrayList<>();
        Set<Long> ids = new HashSet<>();
        for (int i = 0; i < n; i++) conns.add(connect());
        for (Connection c : conns) {
            if (scalar(c, "SELECT 1 + 1") != 2) throw new IllegalStateException("1 + 1 != 2");
            ids.add(scalar(c, "SELECT CONNECTION_ID()"));
        }
        for (Connection c : conns) c.close();
        return Map.of("connections", n, "distinct_thread_ids", ids.size());
    }

    static Object cancel() throws Exception {
        String marker = (String) cfg.get("cancel_marker");
        Connection victim = connect();
        Connection watcher = connect();
        Statement sleeping = victim.createStatement();
        Map<String, Object> result = new LinkedHashMap<>();
        Thread worker = new Thread(() -> {
            try (ResultSet rs = sleeping.executeQuery("SELECT SLEEP(" + cfg.get("cancel_sleep") + "), '" + marker + "'")) {
                rs.next();
                result.put("sleep", rs.getLong(1));
            } catch (SQLException e) {
                Map<String, Object> m = new LinkedHashMap<>();
                m.put("code", e.getErrorCode());
                m.put("sqlstate", e.getSQLState());
                m.put("message", e.getMessage());
                result.put("error", m);
            }
        });
        worker.start();
        try (PreparedStatement ps = watcher.prepareStatement(
                "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE INFO LIKE ? AND INFO NOT LIKE ?")) {
            ps.setString(1, "%" + marker + "%");
            ps.setString(2, "%PROCESSLIST%");
            for (;;) { // the query is running once the server lists it
                try (ResultSet rs = ps.executeQuery()) {
                    rs.next();
                    if (rs.getLong(1) > 0) break;
                }
            }
        }
        sleeping.cancel();
        worker.join();
        try (Statement s = victim.createStatement(); ResultSet rs = s.executeQuery("SELECT 'after cancel'")) {
            rs.next();
            result.put("after", rs.getString(1));
        }
        return result;
    }

    static String sha256(byte[] b) throws Exception {
        return hex(MessageDigest.getInstance("SHA-256").digest(b));
    }

    static String hex(byte[] b) {
        StringBuilder sb = new StringBuilder();
        for (byte x : b) sb.append(String.format("%02x", x));
        return sb.toString();
    }

    static byte[] unhex(String s) {
        byte[] b = new byte[s.length() / 2];
        for (int i = 0; i < b.length; i++) b[i] = (byte) Integer.parseInt(s.substring(2 * i, 2 * i + 2), 16);
        return b;
    }

    /** Just enough JSON: objects, arrays, strings, integers, null. */
    static final class Json {
        final String s;
        int i;

        Json(String s) { this.s = s; }

        Object value() {
            skip();
            char c = s.charAt(i);
            if (c == '{') {
                Map<String, Object> m = new LinkedHashMap<>();
                i++;
                skip();
                if (s.charAt(i) == '}') { i++; return m; }
                for (;;) {
                    skip();
                    String k = (String) value();
                    skip();
                    i++; // ':'
                    m.put(k, value());
                    skip();
                    if (s.charAt(i++) == '}') return m;
                }
            }
            if (c == '[') {
                List<Object> l = new ArrayList<>();
                i++;
                skip();
                if (s.charAt(i) == ']') { i++; return l; }
                for (;;) {
                    l.add(value());
                    skip();
                    if (s.charAt(i++) == ']') return l;
                }
            }
            if (c == '"') {
                StringBuilder sb = new StringBuilder();
                i++;
                for (;;) {
                    char ch = s.charAt(i++);
                    if (ch == '"') return sb.toString();
                    if (ch == '\\') {
                        char e = s.charAt(i++);
                        switch (e) {
                            case 'n': sb.append('\n'); break;
                            case 't': sb.append('\t'); break;
                            case 'r': sb.append('\r'); break;
                            case 'b': sb.append('\b'); break;
                            case 'f': sb.append('\f'); break;
                            case 'u': sb.append((char) Integer.parseInt(s.substring(i, i + 4), 16)); i += 4; break;
                            default: sb.append(e);
                        }
                    } else {
                        sb.append(ch);
                    }
                }
            }
            if (s.startsWith("null", i)) { i += 4; return null; }
            if (s.startsWith("true", i)) { i += 4; return true; }
            if (s.startsWith("false", i)) { i += 5; return false; }
            int start = i;
            while (i < s.length() && "-+.eE0123456789".indexOf(s.charAt(i)) >= 0) i++;
            return Long.parseLong(s.substring(start, i));
        }

        void skip() {
            while (i < s.length() && Character.isWhitespace(s.charAt(i))) i++;
        }

        static String write(Object o) {
            if (o == null) return "null";
            if (o instanceof String) {
                StringBuilder sb = new StringBuilder("\"");
                for (char c : ((String) o).toCharArray()) {
                    if (c == '"' || c == '\\') sb.append('\\').append(c);
                    else if (c < 0x20) sb.append(String.format("\\u%04x", (int) c));
                    else sb.append(c);
                }
                return sb.append('"').toString();
            }
            if (o instanceof Map) {
                StringJoiner j = new StringJoiner(",", "{", "}");
                for (Map.Entry<?, ?> e : ((Map<?, ?>) o).entrySet()) j.add(write(e.getKey()) + ":" + write(e.getValue()));
                return j.toString();
            }
            if (o instanceof List) {
                StringJoiner j = new StringJoiner(",", "[", "]");
                for (Object x : (List<?>) o) j.add(write(x));
                return j.toString();
            }
            return String.valueOf(o);
        }
    }
}
