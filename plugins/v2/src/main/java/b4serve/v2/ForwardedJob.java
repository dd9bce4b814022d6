package b4serve.v2;

import java.util.Map;
import java.util.function.BooleanSupplier;
import java.util.function.Consumer;
import org.pytorch.serve.job.RestJob;
import org.pytorch.serve.util.messages.WorkerCommands;

/**
 * A prediction queued for a model the way TorchServe queues its own REST requests, whose answer
 * (status, content type, headers, body) goes to a callback instead of a Netty channel of
 * TorchServe's.
 *
 * <p>A RestJob without a channel is what TorchServe itself uses for workflow steps: it still
 * records the frontend's latency and queue-time metrics, and writes nothing.
 */
final class ForwardedJob extends RestJob {

    private final Consumer<V2Api.Reply> answer;
    private final BooleanSupplier waiting;

    ForwardedJob(
            String modelName,
            String version,
            WatchedInput input,
            BooleanSupplier waiting,
            Consumer<V2Api.Reply> answer) {
        super(null, modelName, version, WorkerCommands.PREDICT, input);
        this.waiting = waiting;
        this.answer = answer;
    }

    @Override
    public void response(
            byte[] body,
            CharSequence contentType,
            int statusCode,
            String statusPhrase,
            Map<String, String> responseHeaders) {
        super.response(body, contentType, statusCode, statusPhrase, responseHeaders);
        String type = contentType == null ? "" : contentType.toString();
        answer.accept(new V2Api.Reply(statusCode, type, responseHeaders, body));
    }

    @Override
    public void sendError(int status, String error) {
        super.sendError(status, error);
        // As RestJob maps it: the worker reports running out of memory as 413.
        int code = status == 413 ? 507 : status;
        answer.accept(V2Api.Reply.error(code, error == null ? "prediction failed" : error));
    }

    /** Whether the client still waits (read by TorchServe's continuous batching). */
    @Override
    public boolean isOpen() {
        return waiting.getAsBoolean();
    }
}
