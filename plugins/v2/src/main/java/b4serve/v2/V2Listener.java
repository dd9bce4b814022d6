package b4serve.v2;

import com.google.gson.JsonObject;
import com.sun.net.httpserver.Headers;
import com.sun.net.httpserver.HttpExchange;
import com.sun.net.httpserver.HttpServer;
import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.io.InputStream;
import java.io.OutputStream;
import java.net.InetSocketAddress;
import java.net.URI;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.UUID;
import java.util.concurrent.SynchronousQueue;
import java.util.concurrent.ThreadPoolExecutor;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicBoolean;
import java.util.concurrent.atomic.AtomicInteger;
import org.pytorch.serve.util.ConfigManager;
import org.pytorch.serve.util.TokenAuthorization;
import org.pytorch.serve.util.TokenAuthorization.TokenType;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * The v2 REST API on a port of its own, in TorchServe's JVM: {@code GET /v2},
 * {@code /v2/health/{live,ready}}, {@code /v2/models/{m}[/versions/{v}][/ready]} and {@code POST
 * .../infer}, all from {@link V2Api}.
 *
 * <p>Its address is {@code b4_v2_address} in config.properties, e.g. {@code http://0.0.0.0:8080},
 * or env {@code B4_V2_ADDRESS} where {@code enable_envvars_config=true} (as for TorchServe's TS_*
 * settings); neither set: no listener. Token authorization, when
 * TorchServe's is on, takes TorchServe's inference key, refused as TorchServe refuses it (400
 * InvalidKeyException), so clients renew keys the same way. Requests are logged in TorchServe's
 * access log, in its format.
 */
final class V2Listener {

    private static final Logger log = LoggerFactory.getLogger(V2Listener.class);
    private static final Logger access = LoggerFactory.getLogger("ACCESS_LOG");
    private static final AtomicBoolean STARTED = new AtomicBoolean();
    // A thread per request in flight (infer blocks on its batch): health checks never queue
    // behind predictions. TorchServe's job queue bounds predictions; past the cap, the accepting
    // thread runs the request itself, which stops it accepting more.
    private static final int MAX_THREADS = 512;

    private V2Listener() {}

    static void startOnce() {
        String address = address(ConfigManager.getInstance().getConfiguration());
        if (address == null || address.isEmpty() || !STARTED.compareAndSet(false, true)) {
            return;
        }
        URI uri = URI.create(address);
        if (!"http".equals(uri.getScheme()) || uri.getPort() < 0) {
            throw new IllegalArgumentException(
                    "b4_v2_address must be http://HOST:PORT (TLS belongs at the edge), not "
                            + address);
        }
        try {
            HttpServer server =
                    HttpServer.create(new InetSocketAddress(uri.getHost(), uri.getPort()), 128);
            server.createContext("/v2", V2Listener::handle);
            server.createContext(
                    "/",
                    exchange ->
                            reply(exchange, V2Api.notFound(path(exchange)), System.nanoTime()));
            server.setExecutor(executor());
            server.start();
            log.info("v2 REST API (b4serve plugin) listening on {}", address);
        } catch (IOException e) {
            // TorchServe would go on without it: fail the start, as a taken port fails TorchServe
            throw new IllegalStateException("cannot listen on " + address + ": " + e.getMessage(), e);
        }
    }

    /** b4_v2_address, or B4_V2_ADDRESS where the config lets env vars win, as TS_* ones do. */
    static String address(Properties config) {
        String fromEnv = System.getenv("B4_V2_ADDRESS");
        boolean envWins = Boolean.parseBoolean(config.getProperty("enable_envvars_config", "false"));
        if (envWins && fromEnv != null && !fromEnv.isEmpty()) {
            return fromEnv;
        }
        return config.getProperty("b4_v2_address");
    }

    private static ThreadPoolExecutor executor() {
        AtomicInteger count = new AtomicInteger();
        ThreadPoolExecutor executor =
                new ThreadPoolExecutor(
                        0,
                        MAX_THREADS,
                        60,
                        TimeUnit.SECONDS,
                        new SynchronousQueue<>(),
                        runnable -> {
                            Thread thread = new Thread(runnable, "b4-v2-" + count.incrementAndGet());
                            thread.setDaemon(true);
                            return thread;
                        },
                        new ThreadPoolExecutor.CallerRunsPolicy());
        return executor;
    }

    private static void handle(HttpExchange exchange) throws IOException {
        long started = System.nanoTime();
        V2Api.Reply reply;
        try {
            reply = answer(exchange);
        } catch (RuntimeException | IOException e) {
            log.error("v2 request {} failed", path(exchange), e);
            reply = V2Api.Reply.error(500, "internal error: " + e);
        }
        reply(exchange, reply, started);
    }

    private static V2Api.Reply answer(HttpExchange exchange) throws IOException {
        String path = path(exchange);
        if (TokenAuthorization.isEnabled() && !authorized(exchange.getRequestHeaders())) {
            return refusedKey();
        }
        if (!path.equals("/v2") && !path.startsWith("/v2/")) { // (the context matches "/v2x")
            return V2Api.notFound(path);
        }
        List<String> below = V2Api.below(path);
        String method = exchange.getRequestMethod();
        V2Api.ModelPath target = V2Api.ModelPath.parse(below);
        if ("POST".equals(method) && target != null && "infer".equals(target.action)) {
            int limit = ConfigManager.getInstance().getMaxRequestSize();
            byte[] body = readAtMost(exchange.getRequestBody(), limit);
            if (body == null) {
                return V2Api.Reply.error(
                        413, "request body larger than max_request_size (" + limit + " bytes)");
            }
            return V2Api.infer(
                    target,
                    headers(exchange.getRequestHeaders()),
                    body,
                    exchange.getRequestHeaders().getFirst("Content-Type"));
        }
        if ("GET".equals(method) || "HEAD".equals(method)) {
            return V2Api.get(below, path);
        }
        return V2Api.Reply.error(
                405, method + " is not a v2 method here: GET health and metadata, POST .../infer");
    }

    private static boolean authorized(Headers headers) {
        String bearer = headers.getFirst("Authorization");
        if (bearer == null) {
            return false;
        }
        String token = TokenAuthorization.parseTokenFromBearerTokenHeader(bearer);
        return TokenAuthorization.checkTokenAuthorization(token, TokenType.INFERENCE);
    }

    /** The body, or null if it is longer than {@code limit} bytes. */
    private static byte[] readAtMost(InputStream stream, int limit) throws IOException {
        ByteArrayOutputStream body = new ByteArrayOutputStream();
        byte[] chunk = new byte[1 << 16];
        try (InputStream in = stream) {
            int read;
            while ((read = in.read(chunk)) != -1) {
                if (body.size() + read > limit) {
                    return null;
                }
                body.write(chunk, 0, read);
            }
        }
        return body.toByteArray();
    }

    private static Map<String, String> headers(Headers headers) {
        Map<String, String> first = new LinkedHashMap<>();
        headers.forEach((name, values) -> first.put(name, values.isEmpty() ? "" : values.get(0)));
        return first;
    }

    private static String path(HttpExchange exchange) {
        return exchange.getRequestURI().getPath();
    }

    private static void reply(HttpExchange exchange, V2Api.Reply reply, long started)
            throws IOException {
        Headers headers = exchange.getResponseHeaders();
        reply.headers.forEach(headers::set);
        if (reply.contentType != null && !reply.contentType.isEmpty()) {
            headers.set("Content-Type", reply.contentType);
        }
        headers.set("x-request-id", UUID.randomUUID().toString());
        boolean head = "HEAD".equals(exchange.getRequestMethod());
        boolean empty = head || reply.body.length == 0;
        exchange.sendResponseHeaders(reply.status, empty ? -1 : reply.body.length); // 0: chunked
        if (!empty) {
            try (OutputStream out = exchange.getResponseBody()) {
                out.write(reply.body);
            }
        }
        exchange.close();
        access.info(
                "{} \"{} {} {}\" {} {}",
                exchange.getRemoteAddress(),
                exchange.getRequestMethod(),
                exchange.getRequestURI(),
                exchange.getProtocol(),
                reply.status,
                TimeUnit.NANOSECONDS.toMillis(System.nanoTime() - started));
    }

    /** TorchServe's own answer to a missing, wrong or expired key: what clients renew on. */
    private static V2Api.Reply refusedKey() {
        String message =
                "Token Authorization failed. Token either incorrect, expired, or not provided"
                        + " correctly";
        JsonObject body = new JsonObject();
        body.addProperty("error", message);
        body.addProperty("code", 400);
        body.addProperty("type", "InvalidKeyException");
        body.addProperty("message", message);
        return V2Api.Reply.json(400, body);
    }
}
