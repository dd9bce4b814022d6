package b4serve.v2;

import java.util.Map;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.TimeoutException;
import org.pytorch.serve.job.RestJob;
import org.pytorch.serve.util.messages.RequestInput;
import org.pytorch.serve.util.messages.WorkerCommands;

/**
 * A prediction queued for a model the way TorchServe queues its own REST requests, whose answer
 * (status, content type, headers, body) comes back to the waiting thread instead of a Netty
 * channel.
 *
 * <p>A RestJob without a channel is what TorchServe itself uses for workflow steps: it still
 * records the frontend's latency and queue-time metrics, and writes nothing.
 */
final class ForwardedJob extends RestJob {

    private final CompletableFuture<V2Api.Reply> reply = new CompletableFuture<>();

    ForwardedJob(String modelName, String version, RequestInput input) {
        super(null, modelName, version, WorkerCommands.PREDICT, input);
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
        reply.complete(new V2Api.Reply(statusCode, type, responseHeaders, body));
    }

    @Override
    public void sendError(int status, String error) {
        super.sendError(status, error);
        // As RestJob maps it: the worker reports running out of memory as 413.
        int code = status == 413 ? 507 : status;
        reply.complete(V2Api.Reply.error(code, error == null ? "prediction failed" : error));
    }

    /** No channel to watch: a client that hung up still keeps its place in the batch. */
    @Override
    public boolean isOpen() {
        return true;
    }

    /** The worker's answer, or null if none came within {@code timeoutMillis}. */
    V2Api.Reply await(long timeoutMillis) {
        try {
            return reply.get(timeoutMillis, TimeUnit.MILLISECONDS);
        } catch (TimeoutException | ExecutionException e) {
            return null; // (never completed exceptionally)
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
            return null;
        }
    }
}
