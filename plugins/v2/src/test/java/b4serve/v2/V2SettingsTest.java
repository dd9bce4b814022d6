package b4serve.v2;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;

import java.util.Collections;
import java.util.Map;
import java.util.Properties;
import org.junit.jupiter.api.Test;

/** The listener's limits come from config.properties only, env winning as TS_* variables do. */
class V2SettingsTest {

    static Properties config(boolean envWins) {
        Properties config = new Properties();
        config.setProperty("enable_envvars_config", String.valueOf(envWins));
        config.setProperty("b4_v2_read_timeout_s", "60");
        config.setProperty("b4_v2_idle_timeout_s", "30");
        config.setProperty("b4_v2_max_buffered_bytes", "134217728");
        config.setProperty("b4_v2_max_requests", "512");
        return config;
    }

    @Test
    void theKeysAreReadAndEnvWinsOnlyWhereTheConfigLetsIt() {
        Map<String, String> env = Collections.singletonMap("B4_V2_READ_TIMEOUT_S", "20");
        V2Settings closed = V2Settings.from(config(false), env, 1000);
        assertEquals(60_000, closed.readTimeoutMillis);
        assertEquals(30_000, closed.idleTimeoutMillis);
        assertEquals(134217728, closed.maxBufferedBytes);
        assertEquals(512, closed.maxRequests);
        assertEquals(1000, closed.maxBodyBytes);
        assertEquals(20_000, V2Settings.from(config(true), env, 1000).readTimeoutMillis);
    }

    @Test
    void aMissingOrUnreadableKeyIsNamed() {
        Properties missing = config(false);
        missing.remove("b4_v2_max_buffered_bytes");
        IllegalArgumentException absent =
                assertThrows(
                        IllegalArgumentException.class,
                        () -> V2Settings.from(missing, Collections.emptyMap(), 1000));
        assertEquals(
                "b4_v2_max_buffered_bytes is not set: the v2 listener needs it in"
                        + " config.properties",
                absent.getMessage());
        Properties zero = config(false);
        zero.setProperty("b4_v2_max_requests", "0");
        IllegalArgumentException bad =
                assertThrows(
                        IllegalArgumentException.class,
                        () -> V2Settings.from(zero, Collections.emptyMap(), 1000));
        assertEquals("b4_v2_max_requests must be a positive integer, not 0", bad.getMessage());
    }
}
