// The PostgreSQL JDBC driver through a transaction-pooled resource (tests/pg_pool_clients.rs):
// server-prepared statements (prepareThreshold=1: named from the first execution), transactions
// with autocommit off, errors and recovery, several clients at once on their own threads.
// The clients connect with the driver's defaults: pgjdbc then sets extra_float_digits and
// application_name with session-level SETs after connecting, which the gateway carries to every
// connection a client's transactions run on (each round checks them). Reads the flat settings it
// needs from system properties; prints what each client saw as JSON.
import java.sql.*;
import java.util.*;
import java.util.concurrent.*;

public class Clients {
    static String prop(String k) { return System.getProperty("tg." + k); }

    static Connection connect() throws SQLException {
        Properties p = new Properties();
        p.setProperty("user", prop("user"));
        p.setProperty("ssl", "true");
        p.setProperty("sslmode", "verify-full");
        p.setProperty("sslrootcert", prop("ca"));
        p.setProperty("sslcert", prop("cert"));
        p.setProperty("sslkey", prop("pk8"));
        p.setProperty("prepareThreshold", "1");
        String url = "jdbc:postgresql://" + prop("host") + ":" + prop("port") + "/" + prop("dbname");
        return DriverManager.getConnection(url, p);
    }

    static String client(int i, int rounds, String table) throws SQLException {
        List<String> values = new ArrayList<>(), pids = new ArrayList<>(),
            errors = new ArrayList<>(), after = new ArrayList<>(), settings = new ArrayList<>();
        long count;
        try (Connection c = connect()) {
            PreparedStatement doubled = c.prepareStatement("SELECT ?::int * 2, pg_backend_pid()");
            PreparedStatement insert =
                c.prepareStatement("INSERT INTO " + table + " (client, round) VALUES (?, ?)");
            PreparedStatement div = c.prepareStatement("SELECT ?::int / 0");
            for (int r = 0; r < rounds; r++) {
                doubled.setInt(1, i * 100 + r);
                try (ResultSet rs = doubled.executeQuery()) {
                    rs.next();
                    values.add(Integer.toString(rs.getInt(1)));
                    pids.add(Integer.toString(rs.getInt(2)));
                }
                c.setAutoCommit(false);
                for (int k = 0; k < 2; k++) {
                    insert.setInt(1, i);
                    insert.setInt(2, r);
                    insert.executeUpdate();
                }
                c.commit();
                try {
                    insert.setInt(1, i);
                    insert.setInt(2, -1);
                    insert.executeUpdate();
                    div.setInt(1, 1);
                    div.executeQuery();
                } catch (SQLException e) {
                    errors.add('"' + e.getSQLState() + '"');
                    c.rollback();
                }
                c.setAutoCommit(true);
                try {
                    div.setInt(1, r);
                    div.executeQuery();
                } catch (SQLException e) {
                    errors.add('"' + e.getSQLState() + '"');
                }
                doubled.setInt(1, r);
                try (ResultSet rs = doubled.executeQuery()) {
                    rs.next();
                    after.add(Integer.toString(rs.getInt(1)));
                }
                try (Statement st = c.createStatement();
                     ResultSet rs = st.executeQuery("SELECT current_setting('extra_float_digits')"
                         + " || '|' || current_setting('application_name')")) {
                    rs.next();
                    settings.add('"' + rs.getString(1) + '"');
                }
            }
            try (PreparedStatement q =
                     c.prepareStatement("SELECT count(*) FROM " + table + " WHERE client = ?")) {
                q.setInt(1, i);
                try (ResultSet rs = q.executeQuery()) {
                    rs.next();
                    count = rs.getLong(1);
                }
            }
        }
        return "{\"values\":" + values + ",\"pids\":" + pids + ",\"errors\":" + errors
            + ",\"after_error\":" + after + ",\"settings\":" + settings + ",\"count\":" + count
            + "}";
    }

    public static void main(String[] args) throws Exception {
        int n = Integer.parseInt(prop("clients")), rounds = Integer.parseInt(prop("rounds"));
        String table = prop("table");
        ExecutorService ex = Executors.newFixedThreadPool(n);
        List<Future<String>> all = new ArrayList<>();
        for (int i = 0; i < n; i++) {
            final int id = i;
            all.add(ex.submit(() -> client(id, rounds, table)));
        }
        List<String> out = new ArrayList<>();
        try {
            for (Future<String> f : all) out.add(f.get());
        } finally {
            ex.shutdown();
        }
        System.out.println("{\"clients\":" + out + "}");
    }
}
