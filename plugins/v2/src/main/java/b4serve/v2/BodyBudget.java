package b4serve.v2;

import java.util.concurrent.atomic.AtomicLong;

/**
 * Bytes of request bodies held while they arrive, all connections together, at most {@code
 * limit} (b4_v2_max_buffered_bytes, which the memory budget counts: b4serve/ops/budget.py).
 *
 * <p>A quarter is kept for small bodies: bytes beyond {@link #SMALL_BODY} of one body are taken
 * only while three quarters are free, so a burst of largest bodies leaves room for ordinary
 * requests beside it.
 */
final class BodyBudget {

    /** A body this size or smaller may use the whole budget (an image of 1 MiB or less). */
    static final long SMALL_BODY = 1L << 20;

    private final long limit;
    private final AtomicLong held = new AtomicLong();

    BodyBudget(long limit) {
        this.limit = limit;
    }

    /**
     * Takes {@code bytes} more for a body that will then hold {@code bodyTotal} bytes; false (and
     * nothing taken) when the budget cannot.
     */
    boolean take(long bytes, long bodyTotal) {
        long ceiling = bodyTotal > SMALL_BODY ? limit - limit / 4 : limit;
        while (true) {
            long now = held.get();
            if (now + bytes > ceiling) {
                return false;
            }
            if (held.compareAndSet(now, now + bytes)) {
                return true;
            }
        }
    }

    void give(long bytes) {
        held.addAndGet(-bytes);
    }

    long held() {
        return held.get();
    }

    long limit() {
        return limit;
    }
}
