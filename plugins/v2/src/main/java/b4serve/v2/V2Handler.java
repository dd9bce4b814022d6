package b4serve.v2;

import io.netty.buffer.Unpooled;
import io.netty.channel.Channel;
import io.netty.channel.ChannelFutureListener;
import io.netty.channel.ChannelHandlerContext;
import io.netty.channel.ChannelInboundHandlerAdapter;
import io.netty.channel.socket.DuplexChannel;
import io.netty.handler.codec.TooLongFrameException;
import io.netty.handler.codec.http.DefaultFullHttpResponse;
import io.netty.handler.codec.http.FullHttpResponse;
import io.netty.handler.codec.http.HttpContent;
import io.netty.handler.codec.http.HttpHeaderNames;
import io.netty.handler.codec.http.HttpHeaderValues;
import io.netty.handler.codec.http.HttpRequest;
import io.netty.handler.codec.http.HttpResponseStatus;
import io.netty.handler.codec.http.HttpUtil;
import io.netty.handler.codec.http.HttpVersion;
import io.netty.handler.codec.http.LastHttpContent;
import io.netty.handler.codec.http.QueryStringDecoder;
import io.netty.util.ReferenceCountUtil;
import io.netty.util.concurrent.ScheduledFuture;
import java.io.IOException;
import java.util.Arrays;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.UUID;
import java.util.concurrent.Executor;
import java.util.concurrent.RejectedExecutionException;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicInteger;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * One connection of the v2 listener: reads requests as they arrive (never blocking its I/O
 * thread), answers health at once, hands metadata to a small pool and predictions to
 * TorchServe's job queue, and writes each answer when it comes.
 *
 * <p>Limits (config.properties, {@link V2Settings}): a request must arrive whole within the read
 * timeout (else 408, and the connection closes); a kept-alive connection idle that long closes;
 * a body over max_request_size gets 413, one that would take the bodies being received past
 * b4_v2_max_buffered_bytes gets 503, as does a prediction past b4_v2_max_requests waiting for
 * its answer (a request still arriving holds only the bytes it sent).
 * A request refused before its body arrived is answered at once, then the rest of its body is
 * read and dropped (until the read timeout) before the connection closes, so the client reads
 * the answer instead of a reset.
 */
final class V2Handler extends ChannelInboundHandlerAdapter {

    private static final Logger log = LoggerFactory.getLogger(V2Handler.class);
    private static final Logger access = LoggerFactory.getLogger("ACCESS_LOG");
    private static final List<String> LIVE = Arrays.asList("health", "live");
    private static final List<String> READY = Arrays.asList("health", "ready");
    // After a 408, how long the rest of a slow body is read and dropped before the close: a
    // close with unread bytes resets the connection, and the client may lose the answer.
    private static final long LINGER_MILLIS = 2000;

    /** What every connection of one listener shares. */
    static final class Shared {
        final V2Settings settings;
        final BodyBudget budget;
        final Backend backend;
        final Executor metadata;
        final AtomicInteger requests = new AtomicInteger();

        Shared(V2Settings settings, Backend backend, Executor metadata) {
            this.settings = settings;
            this.budget = new BodyBudget(settings.maxBufferedBytes);
            this.backend = backend;
            this.metadata = metadata;
        }
    }

    private enum State {
        IDLE, // between requests
        READING, // a request is arriving
        ANSWERING, // the request is whole; its answer is awaited
        CLOSING // answered before its body arrived: the rest is dropped, then the close
    }

    /** One request: what it asked and what it holds. */
    private static final class Exchange {
        final String id = UUID.randomUUID().toString();
        final long started = System.nanoTime();
        final HttpRequest request;
        final String path;
        final boolean keepAlive;
        V2Api.ModelPath infer; // set for a prediction
        BodyBuffer body; // a prediction's body while it arrives
        boolean holdsSlot; // a prediction queued or answered: counted in Shared.requests
        V2Api.Reply early; // decided from the headers, sent once the (empty) body is read
        boolean answered;
        boolean pipelined; // another request came before this one was answered

        Exchange(HttpRequest request) {
            this.request = request;
            this.path = new QueryStringDecoder(request.uri()).path();
            this.keepAlive = HttpUtil.isKeepAlive(request);
        }
    }

    private final Shared shared;
    private ChannelHandlerContext ctx;
    private State state = State.IDLE;
    private Exchange exchange;
    private ScheduledFuture<?> readTimer;
    private ScheduledFuture<?> answerTimer;

    V2Handler(Shared shared) {
        this.shared = shared;
    }

    @Override
    public void channelActive(ChannelHandlerContext ctx) throws Exception {
        this.ctx = ctx;
        armReadTimer(shared.settings.idleTimeoutMillis);
        super.channelActive(ctx);
    }

    /** Bytes came (seen before the HTTP decoder): a request's read timeout starts there. */
    void bytesArrived() {
        if (state == State.IDLE && ctx != null) {
            state = State.READING;
            armReadTimer(shared.settings.readTimeoutMillis);
        }
    }

    @Override
    public void channelRead(ChannelHandlerContext ctx, Object msg) {
        try {
            if (msg instanceof HttpRequest) {
                onRequest((HttpRequest) msg);
            }
            if (msg instanceof HttpContent) {
                onContent((HttpContent) msg);
            }
        } catch (RuntimeException e) {
            failed(e);
        } finally {
            ReferenceCountUtil.release(msg);
        }
    }

    private void onRequest(HttpRequest request) {
        if (state == State.ANSWERING || state == State.CLOSING) {
            if (exchange != null) {
                exchange.pipelined = true; // answered in turn is not offered: closed after
            }
            return;
        }
        state = State.READING;
        exchange = new Exchange(request);
        V2Api.Reply refused = route(exchange);
        if (refused == null) {
            return;
        }
        boolean bodyFollows =
                request.decoderResult().isFailure()
                        || HttpUtil.isTransferEncodingChunked(request)
                        || declaredLength(request) > 0
                        || declaredLength(request) < -1;
        if (bodyFollows) {
            refuse(refused);
        } else {
            exchange.early = refused;
        }
    }

    /** Null when the request goes on to be read; else the answer that refuses it. */
    private V2Api.Reply route(Exchange ex) {
        HttpRequest request = ex.request;
        if (request.decoderResult().isFailure()) {
            Throwable cause = request.decoderResult().cause();
            return cause instanceof TooLongFrameException
                    ? V2Api.Reply.error(
                            431, "request line or headers too long: " + cause.getMessage())
                    : V2Api.Reply.error(400, "malformed HTTP request");
        }
        if (declaredLength(request) < -1) {
            return V2Api.Reply.error(400, "malformed HTTP request: Content-Length is not a length");
        }
        if (!shared.backend.authorized(request.headers().get(HttpHeaderNames.AUTHORIZATION))) {
            return shared.backend.refusedKey();
        }
        if (!ex.path.equals("/v2") && !ex.path.startsWith("/v2/")) {
            return V2Api.notFound(ex.path);
        }
        List<String> below = V2Api.below(ex.path);
        V2Api.ModelPath target = V2Api.ModelPath.parse(below);
        String method = request.method().name();
        if (target != null && "infer".equals(target.action)) {
            return "POST".equals(method)
                    ? startPrediction(ex, target)
                    : V2Api.Reply.notAllowed(method, "POST", ex.path);
        }
        if (!below.isEmpty() && !below.equals(LIVE) && !below.equals(READY) && target == null) {
            return V2Api.notFound(ex.path);
        }
        if (!"GET".equals(method) && !"HEAD".equals(method)) {
            return V2Api.Reply.notAllowed(method, "GET, HEAD", ex.path);
        }
        return null;
    }

    private V2Api.Reply startPrediction(Exchange ex, V2Api.ModelPath target) {
        long declared = declaredLength(ex.request);
        if (declared > shared.settings.maxBodyBytes) {
            return tooLarge(declared);
        }
        ex.infer = target;
        ex.body = new BodyBuffer(shared.budget, shared.settings.maxBodyBytes, declared);
        if (HttpUtil.is100ContinueExpected(ex.request)) {
            ctx.writeAndFlush(
                    new DefaultFullHttpResponse(HttpVersion.HTTP_1_1, HttpResponseStatus.CONTINUE));
        }
        return null;
    }

    private void onContent(HttpContent content) {
        if (state == State.CLOSING) {
            if (content instanceof LastHttpContent) {
                ctx.close(); // the refused body is all read: the client has its answer
            }
            return;
        }
        if (state != State.READING || exchange == null) {
            return; // a pipelined request's body
        }
        if (exchange.body != null) {
            BodyBuffer.Added added = exchange.body.add(content.content());
            if (added == BodyBuffer.Added.TOO_LARGE) {
                refuse(tooLarge(exchange.body.size() + (long) content.content().readableBytes()));
                return;
            } else if (added == BodyBuffer.Added.NO_ROOM) {
                refuse(
                        retryLater(
                                "the v2 port is receiving all the bodies it has room for"
                                        + " (b4_v2_max_buffered_bytes): retry"));
                return;
            }
        }
        if (content instanceof LastHttpContent) {
            requestArrived();
        }
    }

    private void requestArrived() {
        cancel(readTimer);
        state = State.ANSWERING;
        Exchange ex = exchange;
        if (ex.early != null) {
            answer(ex, ex.early);
        } else if (ex.infer != null) {
            predict(ex);
        } else {
            describe(ex);
        }
    }

    private void predict(Exchange ex) {
        if (shared.requests.incrementAndGet() > shared.settings.maxRequests) {
            shared.requests.decrementAndGet();
            answer(
                    ex,
                    retryLater(
                            "the v2 port is answering its limit of "
                                    + shared.settings.maxRequests
                                    + " predictions at once (b4_v2_max_requests): retry"));
            return;
        }
        ex.holdsSlot = true;
        byte[] body = ex.body.bytes();
        Channel channel = ctx.channel();
        long wait;
        try {
            wait =
                    shared.backend.infer(
                            ex.infer,
                            headers(ex.request),
                            body,
                            ex.id,
                            channel::isActive,
                            reply -> ctx.executor().execute(() -> answer(ex, reply)));
        } finally {
            // queued, the body is a job's: the budget counts the job queue, not this
            ex.body.release();
            ex.body = null;
        }
        if (wait > 0 && !ex.answered) {
            answerTimer =
                    ctx.executor()
                            .schedule(
                                    () ->
                                            answer(
                                                    ex,
                                                    V2Api.Reply.error(
                                                            504,
                                                            "no answer from model "
                                                                    + ex.infer.name
                                                                    + " in time")),
                                    wait,
                                    TimeUnit.MILLISECONDS);
        }
    }

    /** Health at once, here (it reads only memory); metadata (it reads files) in the pool. */
    private void describe(Exchange ex) {
        List<String> below = V2Api.below(ex.path);
        if (below.equals(LIVE) || below.equals(READY) || below.isEmpty()) {
            answer(ex, describedBy(ex, below));
            return;
        }
        try {
            shared.metadata.execute(
                    () -> {
                        V2Api.Reply reply = describedBy(ex, below);
                        ctx.executor().execute(() -> answer(ex, reply));
                    });
        } catch (RejectedExecutionException e) {
            answer(ex, retryLater("the v2 port's metadata readers are all busy: retry"));
        }
    }

    private V2Api.Reply describedBy(Exchange ex, List<String> below) {
        try {
            return shared.backend.get(below, ex.path);
        } catch (IOException | RuntimeException e) {
            log.error("v2 request {} ({} {}) failed", ex.id, ex.request.method(), ex.path, e);
            return internalError(ex);
        }
    }

    /** The answer to the request in progress, once; late or repeated ones are dropped. */
    private void answer(Exchange ex, V2Api.Reply reply) {
        if (ex != exchange || ex.answered || state != State.ANSWERING) {
            return;
        }
        cancel(answerTimer);
        write(ex, V2Api.forClient(reply, ex.id), !ex.keepAlive || ex.pipelined, false);
    }

    /** Answers before the body arrived: then drops the rest of it and closes. */
    private void refuse(V2Api.Reply reply) {
        state = State.CLOSING;
        write(exchange, V2Api.forClient(reply, exchange.id), true, true);
    }

    private void write(Exchange ex, V2Api.Reply reply, boolean close, boolean linger) {
        ex.answered = true;
        release(ex);
        boolean head = "HEAD".equals(ex.request.method().name());
        FullHttpResponse response =
                new DefaultFullHttpResponse(
                        HttpVersion.HTTP_1_1,
                        HttpResponseStatus.valueOf(reply.status),
                        head ? Unpooled.EMPTY_BUFFER : Unpooled.wrappedBuffer(reply.body));
        reply.headers.forEach(
                (name, value) -> {
                    if (!HttpHeaderNames.CONTENT_LENGTH.contentEqualsIgnoreCase(name)
                            && !HttpHeaderNames.CONNECTION.contentEqualsIgnoreCase(name)
                            && !HttpHeaderNames.TRANSFER_ENCODING.contentEqualsIgnoreCase(name)) {
                        response.headers().set(name, value);
                    }
                });
        if (reply.contentType != null && !reply.contentType.isEmpty()) {
            response.headers().set(HttpHeaderNames.CONTENT_TYPE, reply.contentType);
        }
        response.headers().set(HttpHeaderNames.CONTENT_LENGTH, reply.body.length);
        response.headers().set("x-request-id", ex.id);
        if (close) {
            response.headers().set(HttpHeaderNames.CONNECTION, HttpHeaderValues.CLOSE);
        }
        ctx.writeAndFlush(response)
                .addListener(
                        written -> {
                            logAccess(ex, reply.status);
                            if (!close) {
                                idle(ex);
                            } else if (linger && ctx.channel() instanceof DuplexChannel) {
                                // the read timer still runs: it ends the linger at worst
                                ((DuplexChannel) ctx.channel()).shutdownOutput();
                            } else {
                                ctx.close();
                            }
                        });
    }

    private void idle(Exchange answered) {
        if (exchange == answered && state == State.ANSWERING) {
            exchange = null;
            state = State.IDLE;
            armReadTimer(shared.settings.idleTimeoutMillis);
        }
    }

    private void onReadTimeout() {
        if (state == State.READING && exchange != null && !exchange.answered) {
            state = State.CLOSING;
            String seconds = String.valueOf(shared.settings.readTimeoutMillis / 1000);
            write(
                    exchange,
                    V2Api.Reply.error(
                            408,
                            "the request did not arrive whole within "
                                    + seconds
                                    + " s (b4_v2_read_timeout_s)"),
                    true,
                    true);
            armReadTimer(Math.min(LINGER_MILLIS, shared.settings.readTimeoutMillis));
        } else if (state != State.ANSWERING) {
            ctx.close(); // idle, or a slow client's refused body: no more waiting for it
        }
    }

    @Override
    public void channelInactive(ChannelHandlerContext ctx) throws Exception {
        cancel(readTimer);
        cancel(answerTimer);
        if (exchange != null) {
            release(exchange); // a job already queued sees the channel closed (WatchedInput)
            exchange = null;
        }
        super.channelInactive(ctx);
    }

    @Override
    public void exceptionCaught(ChannelHandlerContext ctx, Throwable cause) {
        if (cause instanceof IOException) {
            log.debug("v2 connection {}: {}", ctx.channel().remoteAddress(), cause.toString());
            ctx.close();
        } else {
            failed(cause);
        }
    }

    /** Our own bug: the client gets 500 and the request id, the log gets the detail. */
    private void failed(Throwable cause) {
        Exchange ex = exchange;
        log.error("v2 request {} failed", ex == null ? "(none)" : ex.id, cause);
        if (ex != null && !ex.answered && ctx.channel().isActive()) {
            state = State.CLOSING;
            write(ex, internalError(ex), true, false);
        } else {
            ctx.close();
        }
    }

    private void release(Exchange ex) {
        if (ex.body != null) {
            ex.body.release();
            ex.body = null;
        }
        if (ex.holdsSlot) {
            ex.holdsSlot = false;
            shared.requests.decrementAndGet();
        }
    }

    private void armReadTimer(long millis) {
        cancel(readTimer);
        readTimer = ctx.executor().schedule(this::onReadTimeout, millis, TimeUnit.MILLISECONDS);
    }

    private static void cancel(ScheduledFuture<?> timer) {
        if (timer != null) {
            timer.cancel(false);
        }
    }

    /** Content-Length; -1 when absent, -2 when it is not a number. */
    private static long declaredLength(HttpRequest request) {
        try {
            long length = HttpUtil.getContentLength(request, -1L);
            return length < -1 ? -2 : length;
        } catch (NumberFormatException e) {
            return -2;
        }
    }

    private V2Api.Reply tooLarge(long bytes) {
        return V2Api.Reply.error(
                413,
                "request body of "
                        + bytes
                        + " bytes or more is larger than max_request_size ("
                        + shared.settings.maxBodyBytes
                        + " bytes)");
    }

    private static V2Api.Reply retryLater(String message) {
        V2Api.Reply reply = V2Api.Reply.error(503, message);
        reply.headers.put("Retry-After", "1");
        return reply;
    }

    private static V2Api.Reply internalError(Exchange ex) {
        return V2Api.Reply.error(500, "internal error: the server log has request " + ex.id);
    }

    private static Map<String, String> headers(HttpRequest request) {
        Map<String, String> first = new LinkedHashMap<>();
        request.headers().forEach(header -> first.putIfAbsent(header.getKey(), header.getValue()));
        return first;
    }

    private void logAccess(Exchange ex, int status) {
        access.info(
                "{} \"{} {} {}\" {} {}",
                ctx.channel().remoteAddress(),
                ex.request.method(),
                ex.request.uri(),
                ex.request.protocolVersion(),
                status,
                TimeUnit.NANOSECONDS.toMillis(System.nanoTime() - ex.started));
    }
}
