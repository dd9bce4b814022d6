package b4serve.v2;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertTrue;

import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import io.netty.buffer.ByteBuf;
import io.netty.buffer.Unpooled;
import io.netty.channel.embedded.EmbeddedChannel;
import io.netty.handler.codec.http.HttpServerCodec;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.function.BooleanSupplier;
import java.util.function.Consumer;
import org.junit.jupiter.api.Test;

/**
 * The v2 listener's HTTP handling (V2Handler on Netty's own HTTP codec, in an EmbeddedChannel),
 * with a backend that records what reaches it: limits, timeouts, error shapes, hang-ups.
 */
class V2HandlerTest {

    private static final String INFER = "/v2/models/b4/infer";

    /** What a model server would do, recorded; predictions wait until answered by hand. */
    static final class RecordingBackend implements Backend {
        final List<Consumer<V2Api.Reply>> pending = new ArrayList<>();
        final List<BooleanSupplier> waiting = new ArrayList<>();
        final List<byte[]> bodies = new ArrayList<>();
        long bufferedAtQueueing = -1;
        BodyBudget budget;

        @Override
        public boolean authorized(String authorization) {
            return !"Bearer wrong".equals(authorization);
        }

        @Override
        public V2Api.Reply refusedKey() {
            return V2Api.Reply.error(400, "refused");
        }

        @Override
        public V2Api.Reply get(List<String> below, String path) {
            JsonObject body = new JsonObject();
            body.addProperty("path", path);
            return V2Api.Reply.json(200, body);
        }

        @Override
        public long infer(
                V2Api.ModelPath target,
                Map<String, String> headers,
                byte[] body,
                String requestId,
                BooleanSupplier stillWaiting,
                Consumer<V2Api.Reply> answer) {
            bodies.add(body);
            waiting.add(stillWaiting);
            pending.add(answer);
            if (budget != null) {
                bufferedAtQueueing = budget.held();
            }
            return 60_000;
        }
    }

    /** One parsed HTTP answer. */
    static final class Answer {
        final int status;
        final Map<String, String> headers = new LinkedHashMap<>();
        final String body;

        Answer(String raw) {
            int end = raw.indexOf("\r\n\r\n");
            String[] lines = raw.substring(0, end).split("\r\n");
            status = Integer.parseInt(lines[0].split(" ")[1]);
            for (String line : Arrays.asList(lines).subList(1, lines.length)) {
                int colon = line.indexOf(':');
                headers.put(
                        line.substring(0, colon).toLowerCase(Locale.ROOT),
                        line.substring(colon + 1).trim());
            }
            body = raw.substring(end + 4);
        }

        JsonObject json() {
            return JsonParser.parseString(body).getAsJsonObject();
        }
    }

    final RecordingBackend backend = new RecordingBackend();

    V2Handler.Shared shared(long buffered, int requests, long readMillis, int maxBody) {
        V2Settings settings = new V2Settings(readMillis, readMillis, buffered, requests, maxBody);
        V2Handler.Shared shared = new V2Handler.Shared(settings, backend, Runnable::run);
        backend.budget = shared.budget;
        return shared;
    }

    V2Handler.Shared roomy() {
        return shared(64 << 20, 8, 60_000, 16 << 20);
    }

    static EmbeddedChannel connect(V2Handler.Shared shared) {
        V2Handler handler = new V2Handler(shared);
        return new EmbeddedChannel(
                new V2Listener.Arrivals(handler), new HttpServerCodec(4096, 8192, 65536), handler);
    }

    static void send(EmbeddedChannel channel, String text) {
        send(channel, text.getBytes(StandardCharsets.ISO_8859_1));
    }

    static void send(EmbeddedChannel channel, byte[] bytes) {
        channel.writeInbound(Unpooled.wrappedBuffer(bytes));
        channel.runPendingTasks();
    }

    static V2Api.Reply reply(int status, String json) {
        return new V2Api.Reply(
                status, "application/json", null, json.getBytes(StandardCharsets.UTF_8));
    }

    static String request(String method, String path, String headers, int length) {
        return method + " " + path + " HTTP/1.1\r\nHost: x\r\n" + headers
                + (length >= 0 ? "Content-Length: " + length + "\r\n" : "") + "\r\n";
    }

    /** The answers written so far, parsed (null if none). */
    static Answer answer(EmbeddedChannel channel) {
        channel.runPendingTasks();
        StringBuilder raw = new StringBuilder();
        ByteBuf written;
        while ((written = channel.readOutbound()) != null) {
            raw.append(written.toString(StandardCharsets.UTF_8));
            written.release();
        }
        return raw.length() == 0 ? null : new Answer(raw.toString());
    }

    @Test
    void healthIsAnsweredWhilePredictionsFillTheirLimit() {
        V2Handler.Shared shared = shared(64 << 20, 2, 60_000, 1 << 20);
        for (int i = 0; i < 2; i++) {
            send(connect(shared), request("POST", INFER, "", 2) + "{}");
        }
        assertEquals(2, backend.pending.size());
        EmbeddedChannel third = connect(shared);
        send(third, request("POST", INFER, "", 2) + "{}");
        Answer refused = answer(third);
        assertEquals(503, refused.status);
        assertEquals("1", refused.headers.get("retry-after"));
        assertTrue(refused.json().get("error").getAsString().contains("b4_v2_max_requests"));
        for (String path : new String[] {"/v2/health/live", "/v2/health/ready", "/v2/models/b4"}) {
            EmbeddedChannel health = connect(shared);
            send(health, request("GET", path, "", -1));
            Answer ok = answer(health);
            assertEquals(200, ok.status, path);
            assertEquals(path, ok.json().get("path").getAsString());
        }
    }

    @Test
    void aPredictionIsAnsweredWhenItsReplyComesAndTheConnectionStaysOpen() {
        EmbeddedChannel channel = connect(roomy());
        String json = "Content-Type: application/json\r\n";
        send(channel, request("POST", INFER, json, 13) + "{\"inputs\":[]}");
        assertNull(answer(channel)); // waiting for the worker: no thread held, nothing written
        assertEquals("{\"inputs\":[]}", new String(backend.bodies.get(0), StandardCharsets.UTF_8));
        assertEquals(0, backend.budget.held()); // queued: the job queue's memory, not the buffer's
        backend.pending.get(0).accept(reply(200, "{\"a\":1}"));
        Answer ok = answer(channel);
        assertEquals(200, ok.status);
        assertEquals("{\"a\":1}", ok.body);
        assertTrue(channel.isOpen());
        assertEquals(36, ok.headers.get("x-request-id").length());
    }

    @Test
    void wrongMethodsGet405WithAllowAndUnknownPaths404InTheErrorShape() {
        V2Handler.Shared shared = roomy();
        String[][] cases = {
            {"GET", INFER, "405", "POST"},
            {"PUT", "/v2/health/live", "405", "GET, HEAD"},
            {"DELETE", "/v2/models/b4/versions/1", "405", "GET, HEAD"},
            {"GET", "/v2/nothing", "404", null},
            {"GET", "/metrics", "404", null},
        };
        for (String[] c : cases) {
            EmbeddedChannel channel = connect(shared);
            send(channel, request(c[0], c[1], "", -1));
            Answer refused = answer(channel);
            assertEquals(Integer.parseInt(c[2]), refused.status, c[0] + " " + c[1]);
            assertEquals(c[3], refused.headers.get("allow"), c[0] + " " + c[1]);
            assertTrue(refused.json().has("error"));
            assertTrue(channel.isOpen()); // no body came: the connection goes on
        }
        EmbeddedChannel key = connect(shared);
        send(key, request("GET", "/v2/health/live", "Authorization: Bearer wrong\r\n", -1));
        assertEquals(400, answer(key).status);
    }

    @Test
    void aBodyDeclaredOverTheLimitGets413BeforeItIsRead() {
        EmbeddedChannel channel = connect(shared(64 << 20, 8, 60_000, 1000));
        send(channel, request("POST", INFER, "", 1001) + "x");
        Answer refused = answer(channel);
        assertEquals(413, refused.status);
        assertEquals("close", refused.headers.get("connection"));
        assertTrue(refused.json().get("error").getAsString().contains("max_request_size (1000"));
        assertTrue(backend.bodies.isEmpty());
    }

    @Test
    void aChunkedBodyGrowingOverTheLimitGets413() {
        EmbeddedChannel channel = connect(shared(64 << 20, 8, 60_000, 1000));
        send(channel, request("POST", INFER, "Transfer-Encoding: chunked\r\n", -1));
        send(channel, "3e8\r\n" + "x".repeat(1000) + "\r\n");
        assertNull(answer(channel));
        send(channel, "1\r\nx\r\n");
        assertEquals(413, answer(channel).status);
        assertEquals(0, backend.budget.held());
    }

    @Test
    void largeBodiesLeaveAQuarterOfTheBufferForSmallOnesAndGet503BeyondIt() {
        V2Handler.Shared shared = shared(16 << 20, 64, 60_000, 16 << 20);
        EmbeddedChannel first = connect(shared);
        send(first, request("POST", INFER, "", 8 << 20));
        send(first, new byte[7 << 20]); // holds its declared 8 MiB (of 12 for large bodies)
        assertEquals(8 << 20, shared.budget.held());
        EmbeddedChannel second = connect(shared);
        send(second, request("POST", INFER, "", 6 << 20));
        send(second, new byte[2 << 20]); // would take 8 + 6
        Answer refused = answer(second);
        assertEquals(503, refused.status);
        assertTrue(refused.json().get("error").getAsString().contains("b4_v2_max_buffered_bytes"));
        EmbeddedChannel small = connect(shared);
        send(small, request("POST", INFER, "", 1 << 20));
        send(small, new byte[1 << 20]);
        assertNull(answer(small));
        assertEquals(1, backend.bodies.size()); // the small one, queued
        assertNull(answer(first)); // still arriving, unharmed
    }

    @Test
    void aBodyHoldsOnlyWhatArrivedNotWhatItDeclares() {
        V2Handler.Shared shared = roomy();
        List<EmbeddedChannel> slow = new ArrayList<>();
        for (int i = 0; i < 100; i++) {
            EmbeddedChannel channel = connect(shared);
            send(channel, request("POST", INFER, "", 16 << 20) + "x");
            slow.add(channel);
        }
        assertEquals(100L * 4096, shared.budget.held());
        slow.forEach(EmbeddedChannel::close);
        assertEquals(0, shared.budget.held());
    }

    @Test
    void aSlowRequestGets408AndAnIdleConnectionCloses() throws InterruptedException {
        V2Handler.Shared shared = shared(64 << 20, 8, 50, 1 << 20);
        EmbeddedChannel slow = connect(shared);
        EmbeddedChannel idle = connect(shared);
        send(slow, request("POST", INFER, "", 100) + "partial");
        Thread.sleep(120);
        slow.runScheduledPendingTasks();
        idle.runScheduledPendingTasks();
        Answer late = answer(slow);
        assertEquals(408, late.status);
        assertTrue(late.json().get("error").getAsString().contains("b4_v2_read_timeout_s"));
        assertFalse(slow.isOpen());
        assertNull(answer(idle)); // nothing asked, nothing answered: closed
        assertFalse(idle.isOpen());
        assertEquals(0, shared.budget.held());
    }

    @Test
    void malformedRequestsGet4xxJsonAndClose() {
        EmbeddedChannel garbage = connect(roomy());
        send(garbage, "GET /v2 HTTP/1.1\r\nContent-Length: banana\r\n\r\n");
        Answer bad = answer(garbage);
        assertEquals(400, bad.status);
        assertTrue(bad.json().has("error"));
        assertFalse(garbage.isOpen());
        EmbeddedChannel long_ = connect(roomy());
        send(long_, "GET /v2/" + "a".repeat(5000) + " HTTP/1.1\r\n\r\n");
        Answer tooLong = answer(long_);
        assertEquals(431, tooLong.status);
        assertTrue(tooLong.json().has("error"));
    }

    @Test
    void workerErrorsGetTheErrorFieldAndServerErrorsLoseTheirDetail() {
        EmbeddedChannel channel = connect(roomy());
        send(channel, request("POST", INFER, "", 0));
        String workers = "{\"code\":400,\"type\":\"InvalidInput\",\"message\":\"expected bytes\"}";
        backend.pending.get(0).accept(reply(400, workers));
        JsonObject bad = answer(channel).json();
        assertEquals("expected bytes", bad.get("error").getAsString());
        assertEquals("InvalidInput", bad.get("type").getAsString());
        send(channel, request("POST", INFER, "", 0));
        backend.pending.get(1).accept(V2Api.Reply.error(500, "NullPointerException at Secret.x"));
        Answer failed = answer(channel);
        assertEquals(500, failed.status);
        assertFalse(failed.body.contains("Secret"));
        String shown = failed.json().get("error").getAsString();
        assertTrue(shown.contains(failed.headers.get("x-request-id")), shown);
    }

    @Test
    void aClientThatHangsUpStopsWaitingAndFreesItsPlace() {
        V2Handler.Shared shared = shared(64 << 20, 1, 60_000, 1 << 20);
        EmbeddedChannel gone = connect(shared);
        send(gone, request("POST", INFER, "", 2) + "{}");
        assertTrue(backend.waiting.get(0).getAsBoolean());
        gone.close();
        assertFalse(backend.waiting.get(0).getAsBoolean()); // its job expires in TorchServe
        backend.pending.get(0).accept(V2Api.Reply.error(503, "late")); // dropped, no error
        EmbeddedChannel next = connect(shared);
        send(next, request("POST", INFER, "", 2) + "{}");
        assertEquals(2, backend.pending.size()); // the only place was given back
    }

    @Test
    void aHungUpClientsInputExpiresForTorchServe() {
        boolean[] open = {true};
        WatchedInput input = new WatchedInput("id", () -> open[0]);
        assertEquals(Long.MAX_VALUE, input.getClientExpireTS());
        open[0] = false;
        assertTrue(input.getClientExpireTS() < System.currentTimeMillis());
    }
}
