package b4serve.v2;

import io.netty.buffer.ByteBuf;
import java.util.Arrays;

/**
 * One request's body as it arrives, in a heap array that grows with what came (never with what
 * the headers declare: a client that declares 16 MB and sends a byte a second holds a few
 * bytes), its capacity taken from a {@link BodyBudget} before it is allocated.
 */
final class BodyBuffer {

    enum Added {
        OK,
        TOO_LARGE,
        NO_ROOM
    }

    // Small first: 600 clients sending a byte a second hold 600 x 4 KiB.
    private static final int FIRST = 4 << 10;

    private final BodyBudget budget;
    private final int maxBytes;
    private final long declared; // Content-Length, or -1 when chunked
    private byte[] data = new byte[0];
    private int size;

    BodyBuffer(BodyBudget budget, int maxBytes, long declared) {
        this.budget = budget;
        this.maxBytes = maxBytes;
        this.declared = declared;
    }

    /** Appends the readable bytes of {@code chunk} (not released here). */
    Added add(ByteBuf chunk) {
        int count = chunk.readableBytes();
        if ((long) size + count > maxBytes) {
            return Added.TOO_LARGE;
        }
        if (size + count > data.length) {
            int capacity = grownTo(size + count);
            // old and new arrays live together while the bytes are copied: both are taken
            if (!budget.take(capacity, capacity)) {
                return Added.NO_ROOM;
            }
            byte[] grown = Arrays.copyOf(data, capacity);
            budget.give(data.length);
            data = grown;
        }
        chunk.getBytes(chunk.readerIndex(), data, size, count);
        size += count;
        return Added.OK;
    }

    /**
     * Doubling from 4 KiB; once a small body's size ({@link BodyBudget#SMALL_BODY}) has come,
     * straight to the declared length (one more copy, not a doubling's three arrays at once).
     */
    private int grownTo(int needed) {
        long capacity = Math.max(needed, Math.max(FIRST, 2L * data.length));
        if (declared >= needed && (capacity > declared || needed > BodyBudget.SMALL_BODY)) {
            capacity = declared;
        }
        return (int) Math.min(capacity, Math.max(needed, maxBytes));
    }

    /** The body, exactly; the buffer's budget stays taken until {@link #release()}. */
    byte[] bytes() {
        return size == data.length ? data : Arrays.copyOf(data, size);
    }

    int size() {
        return size;
    }

    /** Gives the budget back (the array may live on as a queued job's body, counted there). */
    void release() {
        budget.give(data.length);
        data = new byte[0];
        size = 0;
    }
}
