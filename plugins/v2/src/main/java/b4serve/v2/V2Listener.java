package b4serve.v2;

import io.netty.bootstrap.ServerBootstrap;
import io.netty.buffer.ByteBuf;
import io.netty.channel.Channel;
import io.netty.channel.ChannelHandlerContext;
import io.netty.channel.ChannelInboundHandlerAdapter;
import io.netty.channel.ChannelInitializer;
import io.netty.channel.ChannelOption;
import io.netty.channel.EventLoopGroup;
import io.netty.channel.FixedRecvByteBufAllocator;
import io.netty.channel.nio.NioEventLoopGroup;
import io.netty.channel.socket.SocketChannel;
import io.netty.channel.socket.nio.NioServerSocketChannel;
import io.netty.handler.codec.http.HttpServerCodec;
import io.netty.util.concurrent.DefaultThreadFactory;
import java.net.InetSocketAddress;
import java.net.URI;
import java.util.Properties;
import java.util.concurrent.ArrayBlockingQueue;
import java.util.concurrent.ThreadPoolExecutor;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicBoolean;
import org.pytorch.serve.util.ConfigManager;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * The v2 REST API on a port of its own, in TorchServe's JVM: {@code GET /v2},
 * {@code /v2/health/{live,ready}}, {@code /v2/models/{m}[/versions/{v}][/ready]} and {@code POST
 * .../infer}, all from {@link V2Api}, read and answered by {@link V2Handler} on Netty, as
 * TorchServe serves its own ports.
 *
 * <p>Its address is {@code b4_v2_address} in config.properties, e.g. {@code http://0.0.0.0:8080},
 * or env {@code B4_V2_ADDRESS} where {@code enable_envvars_config=true} (as for TorchServe's TS_*
 * settings); neither set: no listener. Its limits are the b4_v2_* keys ({@link V2Settings}).
 * Token authorization, when TorchServe's is on, takes TorchServe's inference key. Requests are
 * logged in TorchServe's access log, in its format.
 */
final class V2Listener {

    private static final Logger log = LoggerFactory.getLogger(V2Listener.class);
    private static final AtomicBoolean STARTED = new AtomicBoolean();
    // Event loops only read, decode and write: predictions wait in TorchServe's queues, not here.
    private static final int IO_THREADS = 2;
    // Socket reads of at most 64 KiB, copied into the body's own array at once and freed.
    static final int READ_BYTES = 64 << 10;
    // Request line and headers: Netty's defaults for TorchServe's ports, 4 KiB and 8 KiB.
    private static final int MAX_LINE = 4096;
    private static final int MAX_HEADERS = 8192;
    // Metadata reads a file: two threads, and 64 waiting at most (then 503).
    private static final int METADATA_THREADS = 2;
    private static final int METADATA_QUEUE = 64;

    private V2Listener() {}

    static void startOnce() {
        ConfigManager config = ConfigManager.getInstance();
        String address = address(config.getConfiguration());
        if (address == null || address.isEmpty()) {
            return;
        }
        URI uri = URI.create(address);
        if (!"http".equals(uri.getScheme()) || uri.getPort() < 0) {
            throw new IllegalArgumentException(
                    "b4_v2_address must be http://HOST:PORT (TLS belongs at the edge), not "
                            + address);
        }
        // checked before the once-only latch: a bad config fails every try (TorchServe exits)
        V2Settings settings =
                V2Settings.from(
                        config.getConfiguration(), System.getenv(), config.getMaxRequestSize());
        if (!STARTED.compareAndSet(false, true)) {
            return;
        }
        V2Handler.Shared shared =
                new V2Handler.Shared(settings, new TorchServeBackend(), metadataPool());
        try {
            bind(new InetSocketAddress(uri.getHost(), uri.getPort()), shared);
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
            throw new IllegalStateException("interrupted while binding " + address, e);
        } catch (RuntimeException e) {
            // TorchServe would go on without it: fail the start, as a taken port fails TorchServe
            throw new IllegalStateException("cannot listen on " + address + ": " + e, e);
        }
        log.info(
                "v2 REST API (b4serve plugin) listening on {}: read timeout {} ms, idle {} ms,"
                        + " {} bytes of bodies and {} predictions at once",
                address,
                settings.readTimeoutMillis,
                settings.idleTimeoutMillis,
                settings.maxBufferedBytes,
                settings.maxRequests);
    }

    /** Listens on {@code where} (port 0: any free one); returns the bound channel. */
    static Channel bind(InetSocketAddress where, V2Handler.Shared shared)
            throws InterruptedException {
        EventLoopGroup accept =
                new NioEventLoopGroup(1, new DefaultThreadFactory("b4-v2-accept", true));
        EventLoopGroup io =
                new NioEventLoopGroup(IO_THREADS, new DefaultThreadFactory("b4-v2-io", true));
        return new ServerBootstrap()
                .group(accept, io)
                .channel(NioServerSocketChannel.class)
                .option(ChannelOption.SO_BACKLOG, 1024)
                .childOption(
                        ChannelOption.RCVBUF_ALLOCATOR, new FixedRecvByteBufAllocator(READ_BYTES))
                .childHandler(
                        new ChannelInitializer<SocketChannel>() {
                            @Override
                            protected void initChannel(SocketChannel channel) {
                                V2Handler handler = new V2Handler(shared);
                                channel.pipeline()
                                        .addLast(new Arrivals(handler))
                                        .addLast(
                                                new HttpServerCodec(
                                                        MAX_LINE, MAX_HEADERS, READ_BYTES))
                                        .addLast(handler);
                            }
                        })
                .bind(where)
                .sync()
                .channel();
    }

    /** Tells the handler that bytes came, before the decoder waits for a whole line. */
    static final class Arrivals extends ChannelInboundHandlerAdapter {
        private final V2Handler handler;

        Arrivals(V2Handler handler) {
            this.handler = handler;
        }

        @Override
        public void channelRead(ChannelHandlerContext ctx, Object msg) {
            if (msg instanceof ByteBuf && ((ByteBuf) msg).isReadable()) {
                handler.bytesArrived();
            }
            ctx.fireChannelRead(msg);
        }
    }

    static ThreadPoolExecutor metadataPool() {
        return new ThreadPoolExecutor(
                METADATA_THREADS,
                METADATA_THREADS,
                60,
                TimeUnit.SECONDS,
                new ArrayBlockingQueue<>(METADATA_QUEUE),
                new DefaultThreadFactory("b4-v2-metadata", true),
                new ThreadPoolExecutor.AbortPolicy()); // full: 503, never the I/O thread
    }

    /** b4_v2_address, or B4_V2_ADDRESS where the config lets env vars win, as TS_* ones do. */
    static String address(Properties config) {
        return V2Settings.value(config, System.getenv(), "b4_v2_address");
    }
}
