package b4serve.v2;

import java.util.function.BooleanSupplier;
import org.pytorch.serve.util.messages.RequestInput;

/**
 * A request's input that expires as soon as its client hangs up. TorchServe 0.12 checks a job's
 * expiry (its clientTimeoutInMills) when it adds the job to a batch after the first, and before
 * it sends any answer: so a job whose client left costs no forward unless it was first in its
 * batch. ({@code Job.isOpen()} is read only by continuous batching.)
 */
final class WatchedInput extends RequestInput {

    private final BooleanSupplier waiting;

    WatchedInput(String requestId, BooleanSupplier waiting) {
        super(requestId);
        this.waiting = waiting;
    }

    @Override
    public long getClientExpireTS() {
        return waiting.getAsBoolean() ? super.getClientExpireTS() : Long.MIN_VALUE;
    }
}
