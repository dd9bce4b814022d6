package b4serve.v2;

import java.util.Map;
import java.util.Properties;

/**
 * The v2 listener's limits, from config.properties (their one home: the listener refuses to
 * start without them). Where {@code enable_envvars_config=true}, env {@code B4_V2_<KEY>} wins
 * over key {@code b4_v2_<key>}, as TorchServe's TS_* variables win over its keys.
 */
final class V2Settings {

    static final String READ_TIMEOUT = "b4_v2_read_timeout_s";
    static final String IDLE_TIMEOUT = "b4_v2_idle_timeout_s";
    static final String BUFFERED_BYTES = "b4_v2_max_buffered_bytes";
    static final String REQUESTS = "b4_v2_max_requests";

    /** A request's line, headers and body must all arrive within this, else 408. */
    final long readTimeoutMillis;
    /** A kept-alive connection with no request in progress is closed after this. */
    final long idleTimeoutMillis;
    /** Bytes of bodies being received at once, all connections together; beyond: 503. */
    final long maxBufferedBytes;
    /** Requests being received or answered at once; beyond: 503. */
    final int maxRequests;
    /** TorchServe's max_request_size: a larger body gets 413. */
    final int maxBodyBytes;

    V2Settings(
            long readTimeoutMillis,
            long idleTimeoutMillis,
            long maxBufferedBytes,
            int maxRequests,
            int maxBodyBytes) {
        this.readTimeoutMillis = readTimeoutMillis;
        this.idleTimeoutMillis = idleTimeoutMillis;
        this.maxBufferedBytes = maxBufferedBytes;
        this.maxRequests = maxRequests;
        this.maxBodyBytes = maxBodyBytes;
    }

    /** The settings of a config (and env); IllegalArgumentException naming a missing key. */
    static V2Settings from(Properties config, Map<String, String> env, int maxBodyBytes) {
        return new V2Settings(
                1000L * positive(config, env, READ_TIMEOUT),
                1000L * positive(config, env, IDLE_TIMEOUT),
                positive(config, env, BUFFERED_BYTES),
                (int) Math.min(Integer.MAX_VALUE, positive(config, env, REQUESTS)),
                maxBodyBytes);
    }

    /** b4_v2_{name}, or B4_V2_{NAME} where the config lets env vars win. */
    static String value(Properties config, Map<String, String> env, String key) {
        boolean envWins =
                Boolean.parseBoolean(config.getProperty("enable_envvars_config", "false"));
        String fromEnv = env.get(key.toUpperCase(java.util.Locale.ROOT));
        if (envWins && fromEnv != null && !fromEnv.isEmpty()) {
            return fromEnv;
        }
        return config.getProperty(key);
    }

    private static long positive(Properties config, Map<String, String> env, String key) {
        String text = value(config, env, key);
        if (text == null || text.trim().isEmpty()) {
            throw new IllegalArgumentException(
                    key + " is not set: the v2 listener needs it in config.properties");
        }
        try {
            long parsed = Long.parseLong(text.trim());
            if (parsed > 0) {
                return parsed;
            }
        } catch (NumberFormatException e) {
            // answered below with the key's name
        }
        throw new IllegalArgumentException(key + " must be a positive integer, not " + text);
    }
}
